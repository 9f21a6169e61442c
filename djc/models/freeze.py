"""`model.freeze`: which of the backbone's parameters train, and keeping what does not train in inference mode.

all: nothing trains; none: everything trains; N: only the last N blocks train (djc/models/zoo.py `blocks`:
residual blocks of a ResNet, transformer blocks of a ViT), everything before them and after them (a ViT's final
LayerNorm) stays fixed. That is P2OT's release on DINO ViT-B/16, whose only trained backbone parameters are
block 11's (grad_from_block=11): model.freeze=1.

A frozen module is held in eval mode even while its method trains (`hold_in_eval`, called from
ClusteringMethod.train): its batch norms use their running statistics instead of the batch's and update
nothing, and its dropout and stochastic depth are off, so a frozen backbone computes the same features for an
image whatever batch it is in. That is what lets its features be computed once (djc/features.py).
"""

from __future__ import annotations

from torch import nn

from djc.models.zoo import blocks


def apply(net: nn.Module, freeze: str | int, backbone: str) -> None:
    """Set requires_grad on `net`'s parameters from model.freeze; ValueError naming the keys when N cannot apply."""
    if freeze == "none":
        return
    for p in net.parameters():
        p.requires_grad_(False)
    if freeze == "all":
        return
    units = blocks(net)
    if not units:
        raise ValueError(f"model.freeze={freeze}: djc knows no blocks of model.backbone={backbone}; freeze all or "
                         f"none of it, or use a ResNet or ViT (torchvision:, timm:, resnet18_cifar, resnet50)")
    if freeze > len(units):
        raise ValueError(f"model.freeze={freeze}: model.backbone={backbone} has {len(units)} blocks")
    for block in units[len(units) - freeze:]:
        for p in block.parameters():
            p.requires_grad_(True)


def is_frozen(net: nn.Module) -> bool:
    """No parameter of `net` trains (and it has some)."""
    params = list(net.parameters())
    return bool(params) and not any(p.requires_grad for p in params)


def frozen_modules(net: nn.Module) -> list[nn.Module]:
    """The largest submodules of `net` none of whose parameters train (`net` itself when it is all frozen)."""
    if is_frozen(net):
        return [net]
    if not any(True for _ in net.parameters()):
        return []
    return [m for child in net.children() for m in frozen_modules(child)]


def hold_in_eval(net: nn.Module) -> None:
    """Put the frozen parts of `net` in eval mode (the rest keeps the mode it has)."""
    for m in frozen_modules(net):
        m.eval()

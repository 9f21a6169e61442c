"""Backbones from the ecosystem, by name: `torchvision:<builder>` (its ResNets and ViTs) or `timm:<model>` (any
timm model; `pip install -e '.[timm]'`).

Each is built without weights (djc never downloads: model.weights names the file, djc/models/weights.py) and
without its classifier, so it maps images to features (B, D). It comes with what it expects as input (InputSpec:
ImageNet's mean and std, and the side a ViT's position embeddings were made for) and with its blocks in order, the
unit of `model.freeze=N` (djc/models/freeze.py).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_FAMILIES = ("resnet", "resnext", "wide_resnet", "vit_")  # the builders djc takes from torchvision


class InputSpec(NamedTuple):
    """What a backbone's weights expect: normalisation and, when it needs one, the input side."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    size: int  # square side the network needs (a ViT's position embeddings: 224) or was trained at; 0 = any


class Zoo(NamedTuple):
    net: nn.Module  # images (B, C, H, W) -> features (B, feat_dim)
    feat_dim: int


def library(name: str) -> str:
    """'torchvision' / 'timm' for a library backbone's name, '' for djc's own."""
    lib, sep, _ = name.partition(":")
    return lib if sep else ""


def check_name(name: str) -> None:
    """ValueError (one line, naming model.backbone) for a library name that does not exist or is not supported."""
    lib, _, model = name.partition(":")
    if lib == "torchvision":
        import torchvision

        known = torchvision.models.list_models(module=torchvision.models)
        if model not in known or not model.startswith(TORCHVISION_FAMILIES):
            ok = sorted(m for m in known if m.startswith(TORCHVISION_FAMILIES))
            raise ValueError(f"torchvision:{model} is not one of torchvision's ResNets or ViTs that djc takes "
                             f"({', '.join(ok)})")
    elif lib == "timm":
        timm = _timm()
        if not timm.is_model(model):
            raise ValueError(f"timm:{model} is not a timm model (timm {timm.__version__}; timm.list_models() "
                             f"lists them)")
    else:
        raise ValueError(f"{name!r}: a library backbone is torchvision:<name> or timm:<name>")


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("timm is not installed: `pip install -e '.[timm]'` (or `pip install timm`) to use "
                         "timm:<model> backbones") from None
    return timm


def spec(name: str, in_channels: int) -> tuple[InputSpec, bool]:
    """(what the backbone's published weights expect, whether its input side is fixed), without building it."""
    lib, _, model = name.partition(":")
    check_name(name)
    if lib == "torchvision":  # every torchvision classification weight: ImageNet statistics at 224 px
        return InputSpec(IMAGENET_MEAN, IMAGENET_STD, 224), model.startswith("vit_")
    c = _timm().get_pretrained_cfg(model)  # the tag's own statistics: vit_base_patch16_224.dino is ImageNet's
    mean, std = tuple(c.mean), tuple(c.std)
    if len(mean) != in_channels:  # a grey dataset on an RGB model: the channels' average statistics
        mean, std = (sum(mean) / len(mean),) * in_channels, (sum(std) / len(std),) * in_channels
    return InputSpec(mean, std, int(c.input_size[-1])), bool(c.fixed_input_size)


def build(name: str, in_channels: int, side: int) -> Zoo:
    """The backbone for inputs (B, in_channels, side, side). A ViT's side is fixed by its position embeddings:
    torchvision's must be 224; timm's is built at `side` and its weights' embeddings resampled when loaded."""
    lib, _, model = name.partition(":")
    check_name(name)
    return _torchvision(model, in_channels, side) if lib == "torchvision" else _timm_model(model, in_channels, side)


def _torchvision(model: str, in_channels: int, side: int) -> Zoo:
    import torchvision
    from torchvision.models import ResNet, VisionTransformer

    net = torchvision.models.get_model(model, weights=None)
    if isinstance(net, ResNet):
        if in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 7, 2, 3, bias=False)
        feat_dim = net.fc.in_features
        net.fc = nn.Identity()
        return Zoo(net, feat_dim)
    assert isinstance(net, VisionTransformer)
    if in_channels != 3:
        raise ValueError(f"model.backbone=torchvision:{model} takes RGB images; the dataset has {in_channels} "
                         f"channel(s)")
    if side != net.image_size:
        raise ValueError(f"model.backbone=torchvision:{model} takes {net.image_size} px inputs (its position "
                         f"embeddings); augment.out_size={side} asks for {side} px: leave it 0 or set "
                         f"{net.image_size}")
    net.heads = nn.Identity()  # the class token after the final LayerNorm, (B, hidden_dim)
    return Zoo(net, net.hidden_dim)


def _timm_model(model: str, in_channels: int, side: int) -> Zoo:
    timm = _timm()
    kw = {"img_size": side} if timm.get_pretrained_cfg(model).fixed_input_size else {}
    net = timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_channels, **kw)
    return Zoo(net, int(net.num_features))


def blocks(net: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in forward order, the unit of model.freeze=N: residual blocks of a ResNet, transformer
    blocks of a ViT, the blocks of each stage of timm's staged convnets; [] when djc knows no block structure."""
    if hasattr(net, "encoder") and hasattr(net.encoder, "layers"):  # torchvision ViT
        return list(net.encoder.layers)
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):  # torchvision's and timm's ResNets
        return [b for i in range(1, 5) for b in getattr(net, f"layer{i}")]
    if isinstance(getattr(net, "blocks", None), (nn.Sequential, nn.ModuleList)):  # timm ViT, DeiT, EVA, ...
        return list(net.blocks)
    if isinstance(getattr(net, "stages", None), (nn.Sequential, nn.ModuleList)):  # timm ConvNeXt, RegNet, ...
        out = []
        for stage in net.stages:
            inner = getattr(stage, "blocks", None)
            out += list(inner) if isinstance(inner, (nn.Sequential, nn.ModuleList)) else [stage]
        return out
    return []

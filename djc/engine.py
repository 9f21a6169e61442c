"""The pieces of a training step that do not depend on Ray: method, optimiser, schedule, views, one step.

djc/train.py tells the training story with these; the equivalence tests call `train_step` directly on gloo
process groups, so this module must stay free of Ray.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from djc.config import Config
from djc.data import views
from djc.methods.base import ClusteringMethod, DataInfo, StepOut

# method.name -> "module:class"; imported on use so one method's dependencies never load for another.
METHODS: dict[str, str] = {
    "secu": "djc.methods.secu:SeCu",
    "dcl": "djc.methods.dcl:DCL",
    "statdec": "djc.methods.statdec:StatDEC",
    "aecm": "djc.methods.aecm:AECM",
    "p2ot": "djc.methods.p2ot:P2OT",
}


def build_method(cfg: Config, info: DataInfo) -> ClusteringMethod:
    module, cls = METHODS[cfg.method.name].split(":")
    torch.manual_seed(cfg.seed)  # same initial weights on every worker (DDP also broadcasts rank 0's)
    return getattr(importlib.import_module(module), cls)(cfg, info)


def make_optimizer(cfg: Config, method: ClusteringMethod) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = []
    for g in method.param_groups():
        g = {"lr": o.lr, "weight_decay": o.weight_decay, "fixed_lr": False, **g}
        g["base_lr"] = g["lr"]
        groups.append(g)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.Adam(groups, lr=o.lr, weight_decay=o.weight_decay)


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Encoder lr multiplier at a global step: 0 while frozen, linear warm-up, then cosine to 0."""
    o = cfg.optim
    epoch = step / max(1, steps_per_epoch)
    if epoch < o.frozen_epochs:
        return 0.0
    e = epoch - o.frozen_epochs
    if e < o.warmup_epochs:
        return (e + 1.0 / max(1, steps_per_epoch)) / o.warmup_epochs
    rest = max(1e-9, o.epochs - o.frozen_epochs - o.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (e - o.warmup_epochs) / rest)))


def apply_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] if g["fixed_lr"] else g["base_lr"] * factor


class Views:
    """Two augmented views of a uint8 batch, made on the training device (the loader only decodes)."""

    def __init__(self, cfg: Config, mean: list[float], std: list[float], image_side: int):
        a = cfg.augment
        v1, v2 = views.secu_view_specs("cifar10")
        scale = a.strength

        def adapt(v: views.ViewSpec) -> views.ViewSpec:
            return views.ViewSpec(
                crop_scale_min=a.crop_scale_min, hflip=a.hflip, jitter_p=v.jitter_p,
                brightness=v.brightness * scale, contrast=v.contrast * scale,
                saturation=v.saturation * scale, hue=min(0.5, v.hue * scale),
                gray_p=v.gray_p, blur_p=v.blur_p, solarize_p=v.solarize_p,
            )

        self.specs = (adapt(v1), adapt(v2))
        self.mean, self.std = mean, std
        self.out = a.out_size or image_side
        self.seed = cfg.seed

    def train(self, images: Tensor, step: int, rank: int) -> tuple[Tensor, Tensor]:
        # Seeded by (seed, step, rank): reproducible and resumable without saving generator state.
        g = torch.Generator(device=images.device).manual_seed((self.seed * 1_000_003 + step) * 4099 + rank)
        return views.two_views(images, self.specs, self.mean, self.std, generator=g, out_size=self.out)

    def eval(self, images: Tensor) -> Tensor:
        return views.eval_view(images, self.mean, self.std, out_size=self.out)


def wrap_ddp(method: ClusteringMethod) -> nn.Module:
    """DDP that syncs parameters and buffers once at init and never buffers again: cluster state is identical
    by construction, and re-broadcasting a 1.28M-entry memory every step would cost more than the step."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    # torch >= 2.15 renamed the per-forward switch; the GPU images' torch 2.11 only has the old one.
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return DDP(method, forward_sync_buffers=False)
    return DDP(method, broadcast_buffers=False)


def train_step(model: nn.Module, method: ClusteringMethod, opt: torch.optim.Optimizer,
               index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
    """One optimisation step. `model` is `method` or its DDP wrapper (whose forward averages gradients)."""
    out: StepOut = model(index, x1, x2)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    opt.step()
    method.update_state(out.update)
    return out


def state_tensors(method: ClusteringMethod) -> dict[str, Any]:
    """Every parameter and buffer, by name: what the equivalence test compares."""
    return {k: v.detach().clone() for k, v in method.state_dict().items()}

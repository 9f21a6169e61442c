"""The pieces of a training step that do not depend on Ray: method, optimiser, schedule, views, one step.

djc/train.py tells the training story with these; the equivalence tests call `train_step` directly on gloo
process groups, so this module must stay free of Ray.
"""

from __future__ import annotations

import dataclasses
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
    """`info` describes the dataset; the method is built for the images the views hand it, which are
    augment.out_size square when that is set (an MLP's input width, an autoencoder's output, depend on it)."""
    module, cls = METHODS[cfg.method.name].split(":")
    if cfg.augment.out_size:
        info = dataclasses.replace(info, image_shape=(cfg.augment.out_size, cfg.augment.out_size,
                                                      info.image_shape[2]))
    torch.manual_seed(cfg.seed)  # same initial weights on every worker (DDP also broadcasts rank 0's)
    return getattr(importlib.import_module(module), cls)(cfg, info)


def make_optimizer(cfg: Config, method: ClusteringMethod) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = []
    for g in method.param_groups():
        g = {"lr": o.lr, "weight_decay": o.weight_decay, "fixed_lr": False, **g}
        g["base_lr"] = g["lr"]
        groups.append(g)
    if (own := method.make_optimizer(groups)) is not None:
        return own
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
                gray_p=v.gray_p, blur_p=v.blur_p, solarize_p=v.solarize_p, degrees=a.degrees,
            )

        self.specs = (adapt(v1), adapt(v2))
        self.mean, self.std = mean, std
        self.out = a.out_size or image_side
        self.seed = cfg.seed
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}  # mean, std copied once per device

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))
        return self._stats[device]

    def train(self, images: Tensor, step: int, rank: int) -> tuple[Tensor, Tensor]:
        # Seeded by (seed, step, rank): reproducible and resumable without saving generator state.
        g = torch.Generator(device=images.device).manual_seed((self.seed * 1_000_003 + step) * 4099 + rank)
        return views.two_views(images, self.specs, *self._on(images.device), generator=g, out_size=self.out)

    def eval(self, images: Tensor) -> Tensor:
        return views.eval_view(images, *self._on(images.device), out_size=self.out)

    def for_method(self, method: ClusteringMethod, images: Tensor, step: int, rank: int) -> tuple[Tensor, Tensor]:
        """The two inputs of a training step: augmented views, or the plain view twice for autoencoders."""
        if method.views == "plain":
            x = self.eval(images)
            return x, x
        return self.train(images, step, rank)


# ---------------------------------------------------------------------------------------------------------
# Device placement: precision, memory format, compilation (trainer.precision / memory_format / compile).


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """trainer.precision -> the backbone's autocast dtype; "auto" is bf16 on CUDA (no loss scaling needed, unlike
    fp16) and float32 elsewhere."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def to_device(method: ClusteringMethod, cfg: Config, device: torch.device) -> ClusteringMethod:
    """The method on `device`, with the step's precision, memory format and (optional) compiled backbone."""
    t = cfg.trainer
    if device.type == "cuda":  # fixed shapes every step: let cuDNN time its algorithms once (process-wide)
        torch.backends.cudnn.benchmark = True
    method = method.to(device)
    method.amp_dtype = amp_dtype(t.precision, device)
    backbone = getattr(method, "backbone", None)  # AE-CM's small MLPs have none and stay float32
    if backbone is not None and (t.memory_format == "channels_last" or (t.memory_format == "auto"
                                                                        and device.type == "cuda")):
        # Conv weights in NHWC: cuDNN's bf16 tensor-core kernels want it, and a conv with NHWC weights returns
        # NHWC whatever its input, so the batch is converted by the first conv. 2D tensors are unaffected.
        backbone.to(memory_format=torch.channels_last)
    if backbone is not None and t.compile:
        backbone.compile()  # in place: parameter names, checkpoints and DDP see the same module
    return method


def wrap_ddp(method: ClusteringMethod) -> nn.Module:
    """DDP that syncs parameters and buffers once at init and never buffers again: cluster state is identical
    by construction, and re-broadcasting a 1.28M-entry memory every step would cost more than the step.
    Parameters the method averages itself (`self_reduced_parameters`) are left out of DDP altogether, init
    broadcast included: the method builds them identically on every worker from the seed."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    if ignored := method.self_reduced_parameters():
        DDP._set_params_and_buffers_to_ignore_for_model(method, ignored)
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
    method.reduce_gradients(out.update)
    opt.step()
    method.update_state(out.update)
    return out


def state_bytes(method: ClusteringMethod, num_samples: int) -> dict[str, int]:
    """Bytes every worker holds for the method (all of it is replicated): parameters, per-instance buffers (first
    dimension N, keyed by the dataset index) and the other buffers. Gradients and SGD momentum add the
    parameters' size twice more."""
    out = {"parameters": sum(p.numel() * p.element_size() for p in method.parameters()),
           "per_instance": 0, "other_buffers": 0}
    for b in method.buffers():
        key = "per_instance" if b.dim() >= 1 and b.shape[0] == num_samples else "other_buffers"
        out[key] += b.numel() * b.element_size()
    return out


def state_tensors(method: ClusteringMethod) -> dict[str, Any]:
    """Every parameter and buffer, by name: what the equivalence test compares."""
    return {k: v.detach().clone() for k, v in method.state_dict().items()}

"""The optimiser and the learning-rate schedule: encoder groups follow the schedule, fixed-lr groups (SeCu's
centers) keep theirs; a method may bring its own optimiser (AE-CM's release stages)."""

from __future__ import annotations

import math

import torch

from djc.config import Config
from djc.methods.base import ClusteringMethod


def make_optimizer(cfg: Config, method: ClusteringMethod) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = []
    for g in method.param_groups():
        # What model.freeze fixed has no gradient: leave it out (no momentum or Adam moments kept for it).
        g = {**g, "params": [p for p in g["params"] if p.requires_grad]}
        if not g["params"]:
            continue
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

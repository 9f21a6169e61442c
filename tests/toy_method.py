"""A sixth method, added the way docs/adding-a-method.md says: this module (the method and its config section)
and one registry entry (`register()` below, at run time, because the toy must not ship with djc). Nothing else
in djc names it; tests/test_adding_a_method.py trains it and runs the equivalence test on it.

Online k-means on the normalised projection: each view is trained to predict the cluster the other view is
assigned to (a swapped prediction against fixed centers), and the centers move towards the global mean of their
members by an EMA.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from djc import dist, methods
from djc.methods.base import ClusteringMethod, MethodSettings, Prediction, Setup, StepOut
from djc.models.backbones import build_backbone, projection_head


class ToyConfig(MethodSettings):
    """The toy's section, `method.toy`."""

    temperature: float = Field(0.2, gt=0.0)  # of the cosine logits against the centers
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # EMA of the centers: ~1 / (1 - momentum) steps of members


class ToyUpdate(NamedTuple):
    """A step's state update, the same on every worker."""

    sums: Tensor  # (K, 1 + D) per cluster: [members, sum of their z] over the global batch, all-reduced in forward


class Toy(ClusteringMethod):
    def __init__(self, c: ToyConfig, s: Setup):
        super().__init__()
        self.c, self.k = c, s.num_clusters
        bb = build_backbone(s.model.backbone, s.image_shape, s.model.width)
        self.backbone = bb.net
        self.proj = projection_head(bb.feat_dim, s.model.proj_hidden, s.model.proj_dim)
        g = torch.Generator().manual_seed(s.seed)  # the same centers on every worker, by construction
        self.register_buffer("centers", F.normalize(torch.randn(self.k, s.model.proj_dim, generator=g), dim=1))
        self.register_buffer("sizes", torch.zeros(self.k, dtype=torch.long))  # members assigned so far

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(self.encode(x)), dim=1)

    def forward(self, index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
        b = x1.shape[0]
        z = self.embed(torch.cat([x1, x2]))  # (2b, D)
        logits = z @ self.centers.T / self.c.temperature  # (2b, K)
        y = logits.detach().argmax(dim=1)
        loss = 0.5 * (F.cross_entropy(logits[:b], y[b:]) + F.cross_entropy(logits[b:], y[:b]))
        with torch.no_grad():
            local = torch.zeros(self.k, 1 + z.shape[1], device=z.device).index_add_(
                0, y, torch.cat([torch.ones_like(z[:, :1]), z.detach()], dim=1))
        return StepOut(loss, {"swapped": loss.detach()}, ToyUpdate(dist.all_reduce_sum(local)))

    @torch.no_grad()
    def update_state(self, update: ToyUpdate) -> None:
        n, total = update.sums[:, :1], update.sums[:, 1:]
        moved = F.normalize(torch.lerp(total / n.clamp_min(1), self.centers, self.c.momentum), dim=1)
        self.centers.copy_(torch.where(n > 0, moved, self.centers))
        self.sizes.add_(n.squeeze(1).round().long())

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        z = self.embed(x)
        conf, y = F.softmax(z @ self.centers.T / self.c.temperature, dim=1).max(dim=1)
        return Prediction(y[:, None], conf, z)

    def health_counts(self) -> Tensor:
        return self.sizes


def register() -> None:
    """The toy's registry entry (idempotent: gloo workers call it in their own process)."""
    if "toy" not in methods.REGISTRY:
        methods.register("toy", methods.Entry(Toy, ToyConfig))

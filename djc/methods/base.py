"""What every clustering method gives the training loop.

A method is one nn.Module holding the encoder, its clustering heads and its cluster state (buffers). The loop
calls it through DDP as `method(index, view1, view2) -> StepOut`, runs backward, `reduce_gradients(out.update)`
(the gradients DDP leaves to the method), steps the optimiser, then calls `update_state(out.update)`, which
changes the buffers from GLOBAL data (dist helpers), so every worker keeps identical cluster state by
construction. Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn


class StepOut(NamedTuple):
    loss: Tensor  # scalar; a LOCAL mean, so DDP's gradient average equals the global-batch gradient
    logs: dict[str, Tensor]  # detached scalars, synced to the host only every log_every steps
    # no-grad inputs of reduce_gradients and update_state (labels, statistics): local, or already global where
    # the method gathers them in forward (SeCu's (index, labels) pairs)
    update: Any


class Prediction(NamedTuple):
    clusters: Tensor  # (B, H) int64, column 0 is the evaluated head
    confidence: Tensor  # (B,) in [0, 1]
    features: Tensor  # (B, D) the representation k-means on learned features uses
    ood: Tensor | None = None  # (B,) out-of-distribution score, higher = more unusual


@dataclass(frozen=True)
class DataInfo:
    """What a method needs to know about the training set, read from its manifest."""

    num_samples: int  # N, the size of the per-instance memory
    image_shape: tuple[int, int, int]  # (H, W, C)
    num_classes: int  # from the manifest; 0 when unlabelled


@dataclass(frozen=True)
class EpochContext:
    """What a method may use at an epoch boundary."""

    epoch: int  # the epoch about to start (0-based)
    epochs: int  # total epochs of the run
    steps_per_epoch: int
    # Runs fn(x, index) over THIS worker's slice of the training set (non-augmented view, eval mode, no grad)
    # and returns (concatenated outputs, indices). For data passes such as k-means on codes at an init stage.
    map_train: Callable[[Callable[[Tensor, Tensor], Tensor]], tuple[Tensor, Tensor]]


def cluster_counts(y: Tensor, k: int, keep: Tensor | None = None) -> Tensor:
    """(K,) int64 counts of the labels y (B,) in [0, K), only where `keep` (B,) is true if given.

    bincount without its host syncs: CUDA's bincount reads y.max() to size its output, and `y[y >= 0]` needs the
    mask's count, so both stall the step; index_add_ into a (K,) tensor does not (integer adds: deterministic)."""
    ones = torch.ones_like(y, dtype=torch.long) if keep is None else keep.long()
    return torch.zeros(k, dtype=torch.long, device=y.device).index_add_(0, y, ones)


def both_views(fn: Callable[[Tensor], Any], x1: Tensor, x2: Tensor, separate: bool) -> Any:
    """fn on the 2B images [view 1; view 2], its output (a tensor or a tuple of tensors) in that order. In one
    pass, batch norm normalises both views with their joint statistics; with `separate`, each view is its own
    pass with its own statistics, as the releases' encoder(view1), encoder(view2)."""
    if not separate:
        return fn(torch.cat([x1, x2]))
    o1, o2 = fn(x1), fn(x2)
    return tuple(torch.cat(p) for p in zip(o1, o2)) if isinstance(o1, tuple) else torch.cat([o1, o2])


class ClusteringMethod(nn.Module):
    # "two": the loop passes two augmented views; "plain": both arguments are the same non-augmented view
    # (autoencoder methods that reconstruct the input).
    views: str = "two"
    # The backbone's autocast dtype (torch.bfloat16 on GPUs), set by engine.to_device; None = float32.
    # Only `encode` uses it: projection heads, cluster statistics, Sinkhorn and every loss stay float32/64.
    amp_dtype: torch.dtype | None = None

    def encode(self, x: Tensor) -> Tensor:
        """backbone(x) under autocast at `amp_dtype` (one code path: the device type comes from x), returned as
        float32, so what the method computes from the features is full precision whatever the step's dtype."""
        if self.amp_dtype is None:
            return self.backbone(x)
        with torch.autocast(x.device.type, dtype=self.amp_dtype):
            return self.backbone(x).float()

    def forward(self, index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:  # pragma: no cover - interface
        raise NotImplementedError

    def update_state(self, update: Any) -> None:
        """No-grad update of the cluster state from global data, after the optimiser step."""

    def self_reduced_parameters(self) -> list[str]:
        """Names of the parameters DDP must skip because `reduce_gradients` averages their gradients itself."""
        return []

    def reduce_gradients(self, update: Any) -> None:
        """After backward, before the optimiser step: average over workers the gradients of
        `self_reduced_parameters` (through djc.dist), given the step's `update`."""

    def on_epoch_start(self, ctx: EpochContext) -> None:
        """Snapshots and stage changes taken once per epoch (SeCu's W_prev, AE-CM's pretraining stages)."""

    def on_train_end(self) -> None:
        """After the last step, before evaluation (AE-CM swaps in its averaged weights here)."""

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups; a group with `fixed_lr=True` keeps its lr (the schedule scales the others)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer | None:
        """The method's own optimiser over `groups` (param_groups with the run's lr, weight decay and schedule
        keys filled in), or None for optim.name's SGD / Adam. AE-CM's release settings use it."""
        return None

    def predict(self, x: Tensor) -> Prediction:  # pragma: no cover - interface
        raise NotImplementedError

    def health_counts(self) -> Tensor | None:
        """Cluster sizes of the evaluated head from the replicated state (no host sync), if the method has them."""
        return None

"""What every clustering method gives the training loop, and what it is built with.

A method is one nn.Module holding the encoder, its clustering heads and its cluster state (buffers), built from
its own config section (a `MethodSettings`) and a `Setup` of the run's shared settings. The loop calls it through
DDP as `method(index, view1, view2) -> StepOut`, runs backward, `reduce_gradients(out.update)` (the gradients
DDP leaves to the method), steps the optimiser, then calls `update_state(out.update)`.

The rule for cluster state: `forward` makes every collective the step's state update needs, so `out.update` is
a typed record of GLOBAL no-grad data (gathered (index, label) pairs, all-reduced sums), the same on every
worker; `update_state` then changes the buffers from it without any collective, so every worker keeps identical
cluster state by construction. `reduce_gradients` is the one other place with collectives: gradient averaging.
Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from djc.confignode import Node
from djc.models import freeze


class MethodSettings(Node):
    """The base of a method's config section, `method.<name>`: typed fields with defaults that are the
    recommended values, checked on their own by validators, and against the rest of the run by `check_run`."""

    # Whether every cluster must be reachable in one global batch (K <= data.batch_size); checked before any
    # worker starts.
    needs_k_le_batch: ClassVar[bool] = False

    def check_run(self, cfg: Any) -> None:
        """Checks against the rest of the run's config (a djc.config.Config: the tree is assembled from the
        methods' sections, so they do not import it), for the selected method only; ValueError naming keys."""


@dataclass(frozen=True)
class Setup:
    """What a method is built with besides its own section: the run's shared settings, passed in so that no
    method reads another section of the config."""

    num_clusters: int  # K of the evaluated head (method.num_clusters)
    num_samples: int  # N, the size of the per-instance memory
    image_shape: tuple[int, int, int]  # (H, W, C) of the images the views hand the method (augment.out_size)
    num_classes: int  # from the manifest; 0 when unlabelled
    global_batch: int  # data.batch_size, over all workers
    epochs: int  # optim.epochs
    seed: int  # the same on every worker: initial state is built identically everywhere
    model: Any  # the model section (djc.config.ModelConfig): backbone, width, proj_hidden, proj_dim
    kmeans: Any  # method.kmeans (djc.config.KMeansConfig), for methods that seed their state with k-means


class StepOut(NamedTuple):
    loss: Tensor  # scalar; a LOCAL mean, so DDP's gradient average equals the global-batch gradient
    logs: dict[str, Tensor]  # detached scalars, synced to the host only every log_every steps
    update: Any  # the method's typed record of GLOBAL no-grad data for reduce_gradients and update_state


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
    mean: tuple[float, ...] = ()  # per-channel statistics of the images in [0, 1] (the views normalise with them
    std: tuple[float, ...] = ()  # unless the backbone's weights bring their own: djc/data/inputs.py)


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


def profile_shares(k: int, imbalance: float) -> list[float]:
    """Cluster shares of an exponential long-tail profile at this largest/smallest ratio, largest first
    (methods.md s6): s_c ~ r^(c / (K - 1)), r = 1 / imbalance. A ratio of 1 gives equal shares. The size priors of
    SeCu, P2OT and AE-CM pull the cluster sizes towards it."""
    r = 1.0 / imbalance
    w = [r ** (c / max(1, k - 1)) for c in range(k)]
    return [v / sum(w) for v in w]


def size_rank(size: Tensor) -> Tensor:
    """(K,) rank of each cluster by `size` (K,), 0 = the largest; ties keep the lower index first. A size profile
    (largest share first) indexed by it gives each cluster the share of its rank: the profile matched to the
    clusters by size, whichever clusters the data made big."""
    return torch.argsort(torch.argsort(size, descending=True, stable=True))


def both_views(fn: Callable[[Tensor], Any], x1: Tensor, x2: Tensor, separate: bool) -> Any:
    """fn on the 2B images [view 1; view 2], its output (a tensor or a tuple of tensors) in that order. In one
    pass, batch norm normalises both views with their joint statistics; with `separate`, each view is its own
    pass with its own statistics, as the releases' encoder(view1), encoder(view2)."""
    if not separate:
        return fn(torch.cat([x1, x2]))
    o1, o2 = fn(x1), fn(x2)
    return tuple(torch.cat(p) for p in zip(o1, o2)) if isinstance(o1, tuple) else torch.cat([o1, o2])


class ClusteringMethod(nn.Module):
    # True: the loop passes two augmented views; False: both arguments are the same non-augmented view
    # (autoencoder methods that reconstruct the input).
    augmented: bool = True

    @classmethod
    def takes_augmented(cls, settings: MethodSettings) -> bool:
        """`augmented` as a run with these settings will have it, before the method is built (a setting may
        turn it on, as AE-CM's augment does)."""
        return cls.augmented
    # The backbone's autocast dtype (torch.bfloat16 on GPUs), set by djc.step.to_device; None = float32.
    # Only `encode` uses it: projection heads, cluster statistics, Sinkhorn and every loss stay float32/64.
    amp_dtype: torch.dtype | None = None
    # True while the inputs are the frozen backbone's features computed once (djc/features.py), not images:
    # `encode` hands them on as they are. Set by the training loop.
    features_in: bool = False

    def encode(self, x: Tensor) -> Tensor:
        """backbone(x) under autocast at `amp_dtype` (one code path: the device type comes from x), returned as
        float32, so what the method computes from the features is full precision whatever the step's dtype.

        A frozen backbone (model.freeze=all) runs under no_grad, in eval mode (`train` keeps it there), and its
        features are rounded to `amp_dtype` as the feature cache stores them, so a step on cached features and a
        step that recomputes them see the same numbers."""
        if self.features_in:
            return x
        if not freeze.is_frozen(self.backbone):
            return self._backbone(x)
        with torch.no_grad():
            f = self._backbone(x)
            return f if self.amp_dtype is None else f.to(self.amp_dtype).float()

    def _backbone(self, x: Tensor) -> Tensor:
        if self.amp_dtype is None:
            return self.backbone(x)
        with torch.autocast(x.device.type, dtype=self.amp_dtype):
            return self.backbone(x).float()

    def train(self, mode: bool = True) -> ClusteringMethod:
        """nn.Module.train, except that what model.freeze fixed stays in eval mode (djc/models/freeze.py)."""
        super().train(mode)
        if mode and getattr(self, "backbone", None) is not None:
            freeze.hold_in_eval(self.backbone)
        return self

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

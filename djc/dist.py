"""Every collective djc uses, in one place. Each helper is the identity on one process.

No other module asks whether torch.distributed is initialised. Helpers say in their name whether the result
carries gradients: `*_with_grad` ones are autograd functions whose backward all-reduces (sums) the incoming
gradient, so that with per-worker losses that are local means and DDP's gradient averaging, W workers compute
exactly the gradient of one worker on the concatenated batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------------------------------------
# Accounting: the payload each worker puts into collectives, per helper, for `djc bench throughput`.

_traffic: dict[str, int] | None = None


@contextmanager
def count_traffic() -> Iterator[dict[str, int]]:
    """Within the block, bytes each worker contributes per helper name: an all-reduce counts its tensor, a gather
    this worker's rows, a with-gradient helper its forward and its backward. Counted on one process too, where
    the helpers are identities: what W > 1 workers would send."""
    global _traffic
    outer, _traffic = _traffic, {}
    try:
        yield _traffic
    finally:
        _traffic = outer


def count_payload(name: str, nbytes: int) -> None:
    """Adds to `count_traffic`'s tally; for a fast path that skips a helper on one process (GlobalBatchNorm)."""
    if _traffic is not None:
        _traffic[name] = _traffic.get(name, 0) + nbytes


def _count(name: str, x: Tensor, times: int = 1) -> None:
    count_payload(name, times * x.numel() * x.element_size())


def _comm_device(x: Tensor) -> torch.device:
    """Where the backend can read `x`: NCCL only moves CUDA tensors, so CPU results (metrics, predictions that
    were moved off the GPU) travel through the GPU; gloo takes them where they are."""
    if x.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return x.device


# --------------------------------------------------------------------------------------------------------
# No-gradient collectives: cluster statistics, per-instance memory, metrics.


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over workers (a new tensor; no gradient). Pack several statistics into one tensor to pay one call."""
    _count("all_reduce_sum", x)
    if not is_distributed():
        return x.clone()
    y = x.to(_comm_device(x), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


@torch.no_grad()
def all_reduce_max(x: Tensor) -> Tensor:
    _count("all_reduce_max", x)
    if not is_distributed():
        return x.clone()
    y = x.to(_comm_device(x), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y.to(x.device)


@torch.no_grad()
def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate every worker's `x` along dim 0, in rank order (no gradient).

    Local sizes may differ: sizes are exchanged first (a host sync) and rows padded, so any split works. For
    per-step state updates, where every worker holds the same batch size, use `all_gather_same_size`.
    """
    _count("all_gather_cat", x)
    if not is_distributed():
        return x.clone()
    w, dev = world_size(), _comm_device(x)
    n = torch.tensor([x.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(w)]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    m = max(counts)
    padded = x.new_zeros((m, *x.shape[1:]), device=dev)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0).to(x.device)


@torch.no_grad()
def all_gather_same_size(x: Tensor) -> Tensor:
    """Concatenate every worker's `x` along dim 0, in rank order (no gradient), when every worker's `x` has the
    same shape (the training loop's equal local batches): one collective and no host sync, so it can run every
    step. This worker's rows start at `rank() * x.shape[0]`."""
    _count("all_gather_same_size", x)
    if not is_distributed():
        return x.clone()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def broadcast_(x: Tensor, src: int = 0) -> Tensor:
    """In place: every worker receives rank `src`'s values (used to make replicated state identical at init)."""
    _count("broadcast", x)
    if is_distributed():
        y = x if _comm_device(x) == x.device else x.to(_comm_device(x))
        dist.broadcast(y, src=src)
        if y is not x:
            x.copy_(y)
    return x


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------------------------
# Collectives that carry gradients.


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y = x.clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        # Every worker's loss depends on the sum, so d(sum_v L_v)/dx_w = sum_v dL_v/dsum.
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


class _AllGatherCat(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        w = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(w)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        # Other workers' losses also read our rows: sum their gradients before taking our slice.
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Sum over workers; the backward sums gradients over workers too. Identity on one process."""
    _count("all_reduce_sum_with_grad", x, 2 if x.requires_grad else 1)
    return _AllReduceSum.apply(x) if is_distributed() else x


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate equal-sized local batches in rank order, keeping gradients to every worker's rows.

    Row offset of this worker's samples in the result is `rank() * x.shape[0]` (offset contrastive labels by it).
    """
    _count("all_gather_with_grad", x, 2 if x.requires_grad else 1)
    return _AllGatherCat.apply(x) if is_distributed() else x


# --------------------------------------------------------------------------------------------------------
# Gradients a method averages itself (DDP skips them): see ClusteringMethod.self_reduced_parameters.


@torch.no_grad()
def average_gradients_(grads: list[Tensor], columns: list[Tensor | None]) -> None:
    """In place, the mean over workers of each (D, K) gradient: all of it where `columns` is None, else only its
    columns `columns[i]` (M,), whose other columns must be zero on every worker. One all-reduce for all of them.

    A gradient that only a batch's labels touch (SeCu's centers, K up to 10,000 per head) sends D x M numbers
    instead of D x K. `columns` may repeat a column (two samples with one label): it is sent twice, reduced to
    the same value twice and written back with it, so the result does not depend on which copy lands last.
    M is the global batch, a fixed size: no host sync.
    """
    parts = [g.flatten() if c is None else g.index_select(1, c).flatten() for g, c in zip(grads, columns)]
    if not parts:
        return
    flat = torch.cat(parts)
    _count("average_gradients", flat)
    if not is_distributed():
        return
    y = flat.to(_comm_device(flat))
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    y = y.to(flat.device).div_(world_size())
    for g, c, part in zip(grads, columns, y.split([p.numel() for p in parts])):
        if c is None:
            g.copy_(part.view_as(g))
        else:
            g.index_copy_(1, c, part.view(g.shape[0], c.shape[0]))

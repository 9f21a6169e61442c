"""k-means in torch, with the data sharded over workers: the baseline, and clustering of learned features.

Each worker holds only its rows. Lloyd steps all-reduce per-cluster sums and counts (one packed collective),
so every worker computes the same centers. k-means++ seeding runs on rank 0 over a gathered sample (at most
`init_sample` rows) and is broadcast, so the full data never sits on one worker.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from djc import dist


class KMeansResult(NamedTuple):
    centers: Tensor  # (K, d)
    inertia: float  # global sum of squared distances to the nearest center


def _sq_dists(x: Tensor, c: Tensor) -> Tensor:
    # |x|^2 - 2 x.c + |c|^2 in chunks-free form: (n, K); clamp the cancellation error at 0.
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).clamp_min(0.0)


def assign(x: Tensor, centers: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Nearest center and squared distance per row, in chunks so (n, K) never exceeds chunk x K."""
    labels, d2 = [], []
    for part in x.split(chunk):
        d = _sq_dists(part, centers)
        m, a = d.min(dim=1)
        labels.append(a)
        d2.append(m)
    if not labels:
        return x.new_zeros(0, dtype=torch.long), x.new_zeros(0)
    return torch.cat(labels), torch.cat(d2)


def kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding on one process (D^2 sampling)."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least K={k} samples, got {n}")
    first = torch.randint(n, (1,), generator=generator).item()
    centers = [x[first]]
    d2 = _sq_dists(x, x[first : first + 1]).squeeze(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        i = torch.multinomial(p, 1, generator=generator).item()
        centers.append(x[i])
        d2 = torch.minimum(d2, _sq_dists(x, x[i : i + 1]).squeeze(1))
    return torch.stack(centers)


def lloyd(x: Tensor, centers: Tensor, iters: int, tol: float = 1e-6) -> KMeansResult:
    """Lloyd iterations from given (identical on every worker) centers; x is this worker's shard."""
    k, d = centers.shape
    c = centers.clone()
    for _ in range(iters):
        labels, d2 = assign(x, c)
        # One collective: per-cluster sums (K, d), counts (K, 1) and the inertia, packed together.
        packed = torch.zeros(k, d + 1, dtype=x.dtype, device=x.device)
        packed[:, :d].index_add_(0, labels, x)
        packed[:, d].index_add_(0, labels, torch.ones_like(d2))
        glob = dist.all_reduce_sum(torch.cat([packed.flatten(), d2.sum().reshape(1)]))
        sums = glob[:-1].view(k, d + 1)
        counts = sums[:, d:]
        new = torch.where(counts > 0, sums[:, :d] / counts.clamp_min(1), c)  # an empty cluster keeps its center
        shift = (new - c).pow(2).sum()
        c = new
        if shift <= tol * (c * c).sum().clamp_min(1e-12):
            break
    _, d2 = assign(x, c)
    inertia = float(dist.all_reduce_sum(d2.sum().reshape(1)).item())
    return KMeansResult(c, inertia)


def kmeans(x: Tensor, k: int, *, iters: int = 50, restarts: int = 3, seed: int = 0,
           init_sample: int = 100_000) -> KMeansResult:
    """Distributed k-means: x is this worker's shard (n_local, d); returns identical centers on every worker."""
    x = x.float()
    w = dist.world_size()
    # A sample of the global data for seeding: each worker contributes its share of init_sample rows.
    per = max(1, init_sample // w)
    g = torch.Generator().manual_seed(seed * 7919 + dist.rank())
    take = torch.randperm(x.shape[0], generator=g)[:per]
    sample = dist.all_gather_cat(x[take].cpu())
    best: KMeansResult | None = None
    for r in range(restarts):
        gen = torch.Generator().manual_seed(seed * 1000 + r)
        init = kmeans_pp(sample, k, gen) if dist.is_main() else torch.zeros(k, x.shape[1])
        init = dist.broadcast_(init.contiguous(), src=0).to(x.device)
        res = lloyd(x, init, iters)
        if best is None or res.inertia < best.inertia:
            best = res
    assert best is not None
    return best

"""k-means in torch, with the data sharded over workers: the baseline, and clustering of learned features.

Each worker holds only its rows. Lloyd steps all-reduce per-cluster sums and counts (one packed collective),
so every worker computes the same centers. k-means++ seeding runs on rank 0 over a gathered sample (at most
`init_sample` rows) and is broadcast, so the full data never sits on one worker.

Memory, per worker, for n_local rows of dimension d and K centers (float32):
  its own shard n_local x d and a copy of it moved to the data's mean (kmeans, below); one distance block of
  at most MAX_ELEMS entries (2^25 = 128 MiB, i.e. 3,355 rows at K = 10,000); the packed sums K x (d + 1) (82
  MiB at K = 10,000, d = 2,048); the gathered seeding sample init_sample x d (100,000 x 2,048 = 820 MiB;
  all_gather puts it on every worker, rank 0 uses it) and 4 bytes per global row for the sampling priorities
  (5 MB at 1.3M rows).
ImageNet (1.3M rows, d = 2,048) over 8 workers is 1.3 GB of features each (2.6 GB with the copy); seeding
K = 10,000 costs K x init_sample x d = 2e12 multiply-adds on rank 0 (seconds on a GPU, minutes on a CPU).

The seeding sample depends only on the rows' global indices (not on how the rows are split over workers), so
k-means on W workers starts from the same centers as on 1 worker holding everything.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from djc import dist

MAX_ELEMS = 2**25  # entries of one (rows x K) distance block


class KMeansResult(NamedTuple):
    centers: Tensor  # (K, d)
    inertia: float  # global sum of squared distances to the nearest center


def _sq_dists(x: Tensor, c: Tensor, xx: Tensor | None = None) -> Tensor:
    # |x|^2 - 2 x.c + |c|^2: (n, K); clamp the cancellation error at 0. `xx`: the rows' |x|^2 (n, 1), if known.
    xx = (x * x).sum(1, keepdim=True) if xx is None else xx
    return (xx - 2 * x @ c.T + (c * c).sum(1)).clamp_min(0.0)


def assign(x: Tensor, centers: Tensor, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Nearest center and squared distance per row, in row chunks so one (rows, K) block stays under
    MAX_ELEMS entries (chunk = MAX_ELEMS // K rows unless given)."""
    rows = chunk or max(1, MAX_ELEMS // max(1, centers.shape[0]))
    labels, d2 = [], []
    for part in x.split(rows):
        m, a = _sq_dists(part, centers).min(dim=1)
        labels.append(a)
        d2.append(m)
    if not labels:
        return torch.zeros(0, dtype=torch.long, device=x.device), x.new_zeros(0)
    return torch.cat(labels), torch.cat(d2)


def kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding on one process (D^2 sampling); `generator` is a CPU generator."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"k-means needs at least K={k} samples, got {n}")
    first = int(torch.randint(n, (1,), generator=generator).item())
    centers = [x[first]]
    # |x|^2 once: recomputing it for each of the K centers read x twice more per center and made an (n, d)
    # temporary each time (307 MB for the 100,000 x 768 pixel sample; djc bench scale).
    xx = (x * x).sum(1, keepdim=True)
    d2 = _sq_dists(x, x[first : first + 1], xx).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        p = (d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)).cpu()
        i = int(torch.multinomial(p, 1, generator=generator).item())
        centers.append(x[i])
        d2 = torch.minimum(d2, _sq_dists(x, x[i : i + 1], xx).squeeze(1))
    return torch.stack(centers)


def lloyd(x: Tensor, centers: Tensor, iters: int, tol: float = 1e-6, origin: Tensor | None = None) -> KMeansResult:
    """Lloyd iterations from given (identical on every worker) centers; x is this worker's shard. `origin`: the
    point x's rows were moved from (kmeans centers them); the stopping tolerance stays relative to the centers'
    size where the caller's rows sit, so moving them changes no stopping decision."""
    k, d = centers.shape
    origin = torch.zeros_like(centers[0]) if origin is None else origin
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
        shift = (new - c).pow(2).sum()  # from global sums: the same stopping decision on every worker
        c = new
        if shift <= tol * (c + origin).pow(2).sum().clamp_min(1e-12):
            break
    _, d2 = assign(x, c)
    inertia = float(dist.all_reduce_sum(d2.sum().reshape(1)).item())
    return KMeansResult(c, inertia)


def seeding_sample(x: Tensor, index: Tensor, size: int, seed: int) -> Tensor:
    """The rows whose global index has one of the `size` smallest seeded priorities, gathered on every worker
    and sorted by index: the same sample whatever the sharding."""
    index = index.to(x.device)  # collectives run on the data's device (NCCL refuses CPU tensors)
    n_total = int(dist.all_reduce_max(index.max().reshape(1) if len(index) else index.new_full((1,), -1)).item()) + 1
    prio = torch.rand(n_total, generator=torch.Generator().manual_seed(seed))  # 4 bytes per global row
    if size < n_total:
        threshold = prio.kthvalue(size).values
        keep = (prio[index.cpu()] <= threshold).to(x.device)
    else:
        keep = torch.ones(len(index), dtype=torch.bool, device=x.device)
    glob_index = dist.all_gather_cat(index[keep])
    glob = dist.all_gather_cat(x[keep])
    return glob[glob_index.argsort()]  # indices are unique: a total order


def kmeans(x: Tensor, k: int, *, iters: int = 50, restarts: int = 3, seed: int = 0,
           init_sample: int = 100_000, index: Tensor | None = None) -> KMeansResult:
    """Distributed k-means: x is this worker's shard (n_local, d); returns identical centers on every worker.

    `index` (n_local,) are the rows' global indices (e.g. from EpochContext.map_train); without it a row's index is
    its position in the rank-order concatenation of the shards. Seeding depends only on (seed, indices, rows).
    """
    x = x.float()
    if index is None:
        sizes = dist.all_gather_cat(torch.tensor([x.shape[0]], device=x.device))
        offset = int(sizes[: dist.rank()].sum().item())
        index = torch.arange(offset, offset + x.shape[0], device=x.device)
    sample = seeding_sample(x, index, init_sample, seed)
    # Distances are |x|^2 - 2 x.c + |c|^2. Rows far from the origin next to their spread (a random net's unit
    # features in tests/test_secu.py lie a median 0.007 apart) leave their differences to that cancellation's
    # fp32 rounding, and another worker count's matmul shapes then flip near rows between centers (there, 2
    # workers' centers came out 3e-4 from one process's; moved, the same bits). k-means is translation invariant,
    # so it runs on the rows moved to the seeding sample's mean: the sample is gathered in index order, so its mean
    # is the same bits on every worker and for any sharding. The moved rows are a copy of the shard.
    origin = sample.mean(0)
    x, sample = x - origin, sample - origin
    best: KMeansResult | None = None
    for r in range(restarts):
        gen = torch.Generator().manual_seed(seed * 1000 + r)
        init = kmeans_pp(sample, k, gen) if dist.is_main() else x.new_zeros(k, x.shape[1])
        init = dist.broadcast_(init.contiguous(), src=0)  # rank 0's seeds, bit-identical everywhere
        res = lloyd(x, init, iters, origin=origin)
        if best is None or res.inertia < best.inertia:
            best = res
    assert best is not None
    return KMeansResult(best.centers + origin, best.inertia)

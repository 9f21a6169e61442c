"""Greedy agglomeration of cluster pieces, from their sufficient statistics (count, sum z, sum z^2).

Used where a method over-clusters and then merges: StatDEC's init (k-means pieces merged to K) and SeCu's
merged prediction (an over-clustered head's centers merged to K, one piece per center).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Merge = Literal["bhattacharyya", "ward", "average"]
BLOCK_ELEMS = 2**23  # entries of one (rows, K', D) float64 temporary of the distances: 64 MB


def _moments(sums: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    d = (sums.shape[1] - 1) // 2
    n = sums[:, 0]
    mean = sums[:, 1 : 1 + d] / n.clamp_min(1e-12)[:, None]
    return n, mean, (sums[:, 1 + d :] / n.clamp_min(1e-12)[:, None] - mean * mean).clamp_min(0.0)


def bhattacharyya(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> Tensor:
    """Bhattacharyya distance between diagonal Gaussians, (A, D) x (C, D) -> (A, C). It ignores the sizes:
    two halves of a 1000-point cluster are ~1 apart, two 10-point clusters 8 sigma apart ~8."""
    v = 0.5 * (var_a[:, None] + var_b[None])  # (A, C, D)
    diff = mean_a[:, None] - mean_b[None]
    return (0.125 * (diff * diff / v).sum(-1) + 0.5 * v.log().sum(-1)
            - 0.25 * (var_a.log().sum(-1)[:, None] + var_b.log().sum(-1)[None]))


def merge_clusters(sums: Tensor, k: int, criterion: Merge = "bhattacharyya",
                   kappa: float = 2.0) -> tuple[Tensor, Tensor]:
    """Greedy agglomeration of K' > k pieces (raw sufficient statistics (K', 1 + 2D)) down to k clusters: merge
    the closest pair, whose statistics are the sum of theirs. Returns (merged sums (k, 1 + 2D), cluster of each
    piece (K',)).
      bhattacharyya  size-free: every tail cluster that got a piece survives; variances shrunk towards the mean
                     piece variance with `kappa` pseudo-samples, so a 1-point piece is not infinitely far
      ward           n_a n_b / (n_a + n_b) |mu_a - mu_b|^2, the k-means cost of the merge: size-biased like
                     k-means, but does not chain pieces of different classes into one giant cluster
      average        -mu_a . mu_b, the mean dot product between the members of a and of b: average linkage
                     (UPGMA) on cosine similarity when z is normalised, exact from the sums. Size-free like
                     Bhattacharyya, but a chain of pieces is not closer than its two ends"""
    s = sums.double().clone()
    n, mean, var = _moments(s)
    alive = n > 0
    vbar = (n[:, None] * var).sum(0) / n.sum()  # (D,) mean within-piece variance, fixed during the merges
    v = (n[:, None] * var + kappa * vbar) / (n[:, None] + kappa)

    def dist_to(rows: Tensor) -> Tensor:  # (R, K') distances of pieces `rows` to every piece
        if criterion == "average":
            d = -(mean[rows] @ mean.T)
        elif criterion == "ward":
            nr = n[rows][:, None]
            d = nr * n / (nr + n).clamp_min(1e-12) * torch.cdist(mean[rows], mean).square()
        else:
            d = bhattacharyya(mean[rows], v[rows], mean, v)
        d[:, ~alive] = torch.inf
        d[torch.arange(len(rows)), rows] = torch.inf
        return d

    idx = torch.arange(s.shape[0], device=s.device)
    # (K', K'), rows in chunks whose (rows, K', D) temporaries stay at BLOCK_ELEMS: a fixed 256 rows took
    # 256 x 3000 x 128 x 8 B = 786 MB per temporary at StatDEC's init of K = 1000 (3000 pieces), ~4 GB at peak.
    rows = max(1, BLOCK_ELEMS // max(1, s.shape[0] * mean.shape[1]))
    dm = torch.cat([dist_to(r) for r in idx.split(rows)])
    dm[~alive] = torch.inf
    best, arg = dm.min(dim=1)  # per-row nearest piece, so each merge costs O(K' D) instead of O(K'^2 D)
    label = idx.clone()
    for _ in range(int(alive.sum()) - k):
        a = int(best.argmin())
        b = int(arg[a])
        s[a] += s[b]
        alive[b] = False
        label[label == b] = a
        n[a], mean[a], var_a = (t[0] for t in _moments(s[a : a + 1]))
        v[a] = (n[a] * var_a + kappa * vbar) / (n[a] + kappa)
        row = dist_to(idx[a : a + 1])[0]
        dm[a], dm[:, a], dm[b], dm[:, b] = row, row, torch.inf, torch.inf
        stale = (arg == a) | (arg == b)
        best[stale], arg[stale] = dm[stale].min(dim=1)
        closer = row < best
        best[closer], arg[closer] = row[closer], a
        best[a], arg[a] = row.min(dim=0)
        best[b] = torch.inf
    keep = idx[alive]
    return s[keep].to(sums.dtype), torch.searchsorted(keep, label)

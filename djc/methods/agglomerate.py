"""Greedy agglomeration of cluster pieces, from their sufficient statistics (count, sum z, sum z^2).

Used where a method over-clusters and then merges: StatDEC's init (k-means pieces merged to K), SeCu's merged
prediction (an over-clustered head's centers merged to K, one piece per center), and DCL's over-clustered head
(method.dcl.pieces: `PieceStats` keeps the pieces' statistics during training, `merge_groups` merges them).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

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


def merge_groups(sums: Tensor, k: int, criterion: Merge = "average") -> Tensor:
    """(M,) group in [0, k) of each piece whose raw sufficient statistics are `sums` (M, 1 + 2D), by the greedy
    merge above, in float64 on the host (deterministic: every worker gets the same groups from the same sums).
    Groups are numbered by their first piece, so float ties that workers break differently cannot renumber them.
    Empty pieces (count 0) join group 0; callers keep them from being predicted."""
    s = sums.detach().double().cpu()
    alive = s[:, 0] > 0
    if int(alive.sum()) <= k:  # nothing to merge: one group per live piece
        group = torch.cumsum(alive.long(), 0) - 1
        return group.clamp_min(0).to(sums.device)
    live = alive.nonzero().squeeze(1)
    _, label = merge_clusters(s[live], k, criterion)
    _, inv = torch.unique(label, return_inverse=True)
    first = torch.full((int(inv.max()) + 1,), len(inv)).scatter_reduce(0, inv, torch.arange(len(inv)), "amin")
    group = torch.zeros(s.shape[0], dtype=torch.long)
    group[live] = torch.argsort(torch.argsort(first))[inv]
    return group.to(sums.device)


class PieceStats(nn.Module):
    """Statistics of an over-clustered head's pieces, for merging them into K clusters at prediction.

    Holds an EMA of the global, normalised sufficient statistics (count, sum u, sum u^2) of each piece, from the
    features u the merge reads (e.g. normalised backbone features) and the head's hard assignments. The method
    all-reduces `local_sums` in its forward; `update_global` divides them by their total count before the EMA, so
    the count column is the pieces' share. The groups are recomputed only when the sums change.
    """

    def __init__(self, num_pieces: int, dim: int, ema: float = 0.9):
        super().__init__()
        self.ema = ema
        self.register_buffer("sums", torch.zeros(num_pieces, 1 + 2 * dim))

    @staticmethod
    def local_sums(u: Tensor, pieces: Tensor, num_pieces: int) -> Tensor:
        """(M, 1 + 2D) sums of this worker's features u (B, D) under the pieces (B,) they are assigned to."""
        w = torch.zeros(u.shape[0], num_pieces, dtype=u.dtype, device=u.device)
        w.scatter_(1, pieces[:, None], 1.0)
        return torch.cat([w.sum(0)[:, None], w.T @ u, w.T @ (u * u)], dim=1)

    @torch.no_grad()
    def update_global(self, glob: Tensor) -> None:
        """EMA of the global sums (identical on every worker), normalised by their total count; no collective."""
        self.sums.lerp_(glob / glob[:, 0].sum().clamp_min(1e-12), 1.0 - self.ema)

    def groups(self, k: int, alive: Tensor, criterion: Merge = "average") -> Tensor:
        """(M,) group of each piece; only the pieces marked `alive` (M,) bool, those that hold instances by the
        method's own exact count, take part. The EMA never reaches 0, so an emptied piece keeps a vanishing share,
        and a size-free merge would weigh it like a full one (DCL on digits-LT: 0.60 with them, 0.74 without)."""
        key = (self.sums._version, alive._version, self.sums.device, k, criterion)
        if getattr(self, "_cache", (None,))[0] != key:
            self._cache = (key, merge_groups(torch.where(alive[:, None], self.sums, 0.0), k, criterion))
        return self._cache[1]

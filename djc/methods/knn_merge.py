"""Over-cluster, then merge by the neighbourhood graph: a label-free clustering of learned features that reads
their neighbourhoods rather than their distance to K centres.

k-means to M = pieces x K pieces, then greedy average linkage of the pieces on the kNN graph: the similarity of two
groups A and B is the number of kNN edges between their members over |A| |B|, so two pieces merge when their
members are each other's neighbours, whatever their shapes and sizes. Contrastive features hold the class locally
(the shapes reference: 20-NN accuracy 0.52-0.73, k-means 0.31-0.39) but the classes are not K round blobs of
similar size, which is what k-means assumes; the pieces are small enough to be round, and the graph joins them.

Distributed like djc.methods.kmeans: each worker holds only its rows. The pieces are k-means on the shards; the
neighbours are searched in a reference sample of at most `rows` rows (chosen by global index, so the same on W
workers as on one; all rows when N <= rows, which makes the graph the exact kNN graph), gathered on every worker;
each worker counts the edges of its own rows, and one all-reduce sums the (M, M) counts. The merge runs in
float64 on the host from the summed counts, identical on every worker. Memory: the reference sample
rows x (D + 2) float64 on every worker (20,000 x 770 x 8 B = 123 MB at D = 768) and two (M, M) float64 matrices
(MAX_PIECES = 4,096: 134 MB each).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from djc import dist
from djc.methods.kmeans import assign, kmeans, seeding_sample

MAX_PIECES = 4096  # the (M, M) edge counts and similarities, float64: 134 MB each
MIN_ROWS_PER_PIECE = 4  # fewer pieces than this allows on a small split: a piece of 1-2 rows has no neighbourhood
BLOCK = 1024  # local rows per block of the (rows, reference) similarities


class KnnMerge(NamedTuple):
    """A fitted over-cluster-and-merge: the pieces' centers and the cluster of each piece."""

    centers: Tensor  # (M, D) k-means centers of the pieces, in the normalised feature space
    group: Tensor  # (M,) cluster in [0, K) of each piece

    def predict(self, z: Tensor) -> Tensor:
        """(n,) cluster of each row of z (n, D): its nearest piece's group."""
        return self.group[assign(F.normalize(z.float(), dim=1), self.centers)[0]]


def num_pieces(k: int, pieces_per_cluster: int, n_total: int) -> int:
    return max(k, min(pieces_per_cluster * k, MAX_PIECES, n_total // MIN_ROWS_PER_PIECE))


def fit(z: Tensor, index: Tensor, k: int, *, pieces: int = 10, neighbors: int = 10, rows: int = 20_000,
        iters: int = 50, restarts: int = 3, seed: int = 0) -> KnnMerge:
    """Fit on this worker's rows z (n_local, D) with global indices `index` (n_local,); every worker gets the
    same result. `pieces` per cluster (M = pieces x K, bounded as in `num_pieces`), `neighbors` per row."""
    z = F.normalize(z.float(), dim=1)
    index = index.to(z.device).long()
    n_total = int(dist.all_reduce_sum(torch.tensor([len(z)], device=z.device)).item())
    m = num_pieces(k, pieces, n_total)
    centers = kmeans(z, m, iters=iters, restarts=restarts, seed=seed, index=index).centers
    piece = assign(z, centers)[0]
    edges, sizes = piece_edges(z, index, piece, m, neighbors=neighbors, rows=rows, seed=seed)
    return KnnMerge(centers, merge_by_edges(edges, sizes, k).to(z.device))


def piece_edges(z: Tensor, index: Tensor, piece: Tensor, m: int, *, neighbors: int = 10, rows: int = 20_000,
                seed: int = 0) -> tuple[Tensor, Tensor]:
    """The global (M, M) kNN edge counts between the pieces of unit-length rows z (n_local, D), this worker's
    rows' pieces `piece` (n_local,) in [0, M), and the pieces' sizes (M,): identical on every worker."""
    index = index.to(z.device).long()
    # The reference rows, with their piece and global index packed beside them (exact in float64).
    packed = torch.cat([z.double(), piece[:, None].double(), index[:, None].double()], dim=1)
    ref = seeding_sample(packed, index, rows, seed)
    rz, rp, ri = ref[:, :-2].to(z.dtype), ref[:, -2].long(), ref[:, -1].long()
    nn = min(neighbors, len(rz) - 1)
    edges = torch.zeros(m, m, dtype=torch.float64, device=z.device)
    for lo in range(0, len(z), BLOCK):
        blk = slice(lo, lo + BLOCK)
        s = z[blk] @ rz.T
        s[index[blk, None] == ri[None]] = -torch.inf  # a row is not its own neighbour
        near = s.topk(nn, dim=1).indices
        src = piece[blk, None].expand_as(near).reshape(-1)
        edges.index_put_((src, rp[near].reshape(-1)), torch.ones(near.numel(), dtype=torch.float64,
                                                                  device=z.device), accumulate=True)
    sizes = torch.bincount(piece, minlength=m).double()
    packed_counts = dist.all_reduce_sum(torch.cat([edges, sizes[None]]))  # one collective
    return packed_counts[:m], packed_counts[m]


def merge_pieces(z: Tensor, index: Tensor, piece: Tensor, piece_sums: Tensor, k: int, *, neighbors: int = 10,
                 rows: int = 20_000, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Pieces found elsewhere (StatDEC's init: k-means at over x K) merged to k by their kNN edges, in the form of
    agglomerate.merge_clusters: (merged raw sums (k, C) of the groups, (M,) group of each piece). `piece_sums`
    (M, C) are the pieces' global raw statistics; z the rows the edges are counted on (normalised here)."""
    edges, sizes = piece_edges(F.normalize(z.float(), dim=1), index, piece, len(piece_sums), neighbors=neighbors,
                               rows=rows, seed=seed)
    group = merge_by_edges(edges, sizes, k).to(piece_sums.device)
    sums = piece_sums.new_zeros(k, piece_sums.shape[1]).index_add_(0, group, piece_sums)
    return sums, group


def merge_by_edges(edges: Tensor, sizes: Tensor, k: int) -> Tensor:
    """(M,) group in [0, k) of each piece, by greedy average linkage on the kNN edge counts `edges` (M, M)
    (edges[a, b]: rows of piece a with a neighbour in piece b; symmetrised here) between pieces of `sizes` (M,).
    Groups are numbered by their first piece; empty pieces join group 0 (no training row is in them)."""
    w = edges.detach().double().cpu()
    w = w + w.T
    n = sizes.detach().double().cpu().clone()
    alive = n > 0
    live = alive.nonzero().squeeze(1)
    group = torch.zeros(len(n), dtype=torch.long)
    if len(live) <= k:  # nothing to merge: one group per live piece
        group[live] = torch.arange(len(live))
        return group
    label = _average_linkage(w[live][:, live].clone(), n[live], k)
    _, inv = torch.unique(label, return_inverse=True)  # survivors' ids in increasing order: by first piece
    group[live] = inv
    return group


def _average_linkage(w: Tensor, n: Tensor, k: int) -> Tensor:
    """Survivor id of each of M pieces after merging down to k groups: at each step the pair with the largest
    w[a, b] / (n_a n_b). Each row's best partner is cached, so a merge costs O(M) (plus the rows whose best
    partner it changed), not O(M^2): M = 4,096 merges in seconds."""
    m = len(n)
    idx = torch.arange(m)
    alive = torch.ones(m, dtype=torch.bool)

    def row_of(a: int) -> Tensor:
        r = w[a] / (n[a] * n)
        r[~alive] = -torch.inf
        r[a] = -torch.inf
        return r

    sim = w / (n[:, None] * n[None])
    sim.fill_diagonal_(-torch.inf)
    best, arg = sim.max(dim=1)
    label = idx.clone()
    for _ in range(m - k):
        a = int(best.argmax())
        b = int(arg[a])
        a, b = min(a, b), max(a, b)  # the survivor keeps the lower id
        w[a] += w[b]
        w[:, a] += w[:, b]
        n[a] += n[b]
        alive[b] = False
        label[label == b] = a
        row = row_of(a)
        sim[a], sim[:, a] = row, row
        sim[b], sim[:, b] = -torch.inf, -torch.inf
        stale = (arg == a) | (arg == b)
        best[stale], arg[stale] = sim[stale].max(dim=1)
        closer = row > best
        best[closer], arg[closer] = row[closer], a
        best[a], arg[a] = row.max(dim=0)
        best[b] = -torch.inf
    return label

"""The knn-merge baseline (djc/methods/knn_merge.py): it recovers classes that are not round blobs where k-means
cannot, its average linkage merges what a hand count says, and 2 gloo workers == 1 worker."""

from __future__ import annotations

import math

import numpy as np
import torch

from djc import metrics
from djc.methods import knn_merge
from djc.methods.kmeans import assign, kmeans
from tests.gloo import run_gloo


def _rings(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Three long-tailed classes that are circles of latitude on the unit sphere (600 / 180 / 60 points, a
    little noise), the equator's the largest: each class is a thin closed curve, not a round blob, and k-means
    with K = 3 cuts the big ring into arcs instead of separating the rings."""
    g = torch.Generator().manual_seed(seed)
    parts, labels = [], []
    for c, (lat, n) in enumerate(((0.0, 600), (0.9, 180), (-0.9, 60))):
        lon = 2 * math.pi * torch.rand(n, generator=g)
        lat_c = lat + 0.02 * torch.randn(n, generator=g)
        parts.append(torch.stack([lat_c.cos() * lon.cos(), lat_c.cos() * lon.sin(), lat_c.sin()], dim=1))
        labels += [c] * n
    return torch.cat(parts), np.array(labels)


def _bacc(y: np.ndarray, pred: torch.Tensor) -> float:
    return metrics.evaluate(y, pred.numpy(), 3, np.bincount(y))["balanced_acc"]


def test_knn_merge_recovers_rings_that_k_means_cuts_into_arcs():
    z, y = _rings()
    fitted = knn_merge.fit(z, torch.arange(len(z)), 3, pieces=10, neighbors=10, seed=0)
    assert len(fitted.centers) == 30 and set(fitted.group.tolist()) == {0, 1, 2}
    km = assign(z, kmeans(z, 3, seed=0).centers)[0]
    assert _bacc(y, km) < 0.8  # the baseline's failure this test is about
    assert _bacc(y, fitted.predict(z)) > 0.97


def test_average_linkage_joins_the_pieces_whose_members_are_neighbours():
    # Pieces 1-2 share the most edges (50), but between larger pieces: per pair of members (average linkage)
    # 0-1 (30 / 200) and 2-3 are closer than 1-2 (50 / 400), so those merge, not the chain's middle.
    edges = torch.zeros(4, 4, dtype=torch.float64)
    edges[0, 1], edges[2, 3], edges[1, 2] = 30.0, 30.0, 50.0
    sizes = torch.tensor([10.0, 20.0, 20.0, 10.0])
    assert knn_merge.merge_by_edges(edges, sizes, 2).tolist() == [0, 0, 1, 1]
    sizes = torch.tensor([10.0, 1.0, 1.0, 10.0])  # now 1-2 is 50 edges over 1 x 1 members: they merge first
    assert knn_merge.merge_by_edges(edges, sizes, 3).tolist() == [0, 1, 1, 2]
    # An empty piece takes no part and joins group 0; with no more live pieces than K nothing merges.
    assert knn_merge.merge_by_edges(edges, torch.tensor([0.0, 4.0, 4.0, 0.0]), 2).tolist() == [0, 0, 1, 0]


def test_the_number_of_pieces_is_bounded_by_the_rows_and_the_memory():
    assert knn_merge.num_pieces(10, 10, 10_000) == 100
    assert knn_merge.num_pieces(10, 10, 200) == 50  # at least 4 rows per piece
    assert knn_merge.num_pieces(1000, 10, 115_846) == knn_merge.MAX_PIECES
    assert knn_merge.num_pieces(10, 10, 20) == 10  # never fewer than K: a run's end then reports no knn-merge
    assert knn_merge.num_pieces(5000, 10, 115_846) == 5000  # nor beyond 4,096 pieces


def fit_on_shard(rank: int, world: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, _ = _rings()
    mine = torch.arange(rank, len(z), world)  # interleaved: the reference sample must not depend on it
    fitted = knn_merge.fit(z[mine], mine, 3, pieces=10, neighbors=10, rows=rows, seed=1)
    return fitted.centers.numpy(), fitted.group.numpy(), fitted.predict(z).numpy()


def test_two_workers_equal_one_worker_with_all_rows_and_with_a_reference_sample():
    torch.set_num_threads(1)
    for rows in (20_000, 300):  # every row is a reference row; a 300-row sample of the 840
        c1, g1, p1 = fit_on_shard(0, 1, rows)
        (c0, g0, p0), (cw, gw, pw) = run_gloo(fit_on_shard, 2, rows)
        np.testing.assert_array_equal(c0, cw)
        np.testing.assert_allclose(c0, c1, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(g0, g1)
        np.testing.assert_array_equal(gw, g1)
        np.testing.assert_array_equal(p0, p1)

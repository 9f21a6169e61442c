"""Distributed k-means: 2 gloo workers == 1 worker, seeding independent of sharding, chunked assignment."""

from __future__ import annotations

import numpy as np
import torch

from djc.methods import kmeans as km
from tests.gloo import run_gloo


def _blobs(n: int = 600, k: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = 6.0 * torch.randn(k, d, generator=g)
    y = torch.arange(n) % k
    return centers[y] + torch.randn(n, d, generator=g), y


def _shard(rank: int, world: int, n: int) -> torch.Tensor:
    # An interleaved split (not contiguous): the seeding sample must not depend on it.
    return torch.arange(rank, n, world)


def lloyd_on_shard(rank: int, world: int) -> np.ndarray:
    x, _ = _blobs()
    init = x[:6].clone()  # the same init everywhere
    rows = _shard(rank, world, len(x))
    return km.lloyd(x[rows], init, iters=20).centers.numpy()


def kmeans_on_shard(rank: int, world: int) -> tuple[np.ndarray, float]:
    x, _ = _blobs()
    rows = _shard(rank, world, len(x))
    res = km.kmeans(x[rows], 6, iters=30, restarts=2, seed=3, init_sample=200, index=rows)
    return res.centers.numpy(), res.inertia


def test_lloyd_two_workers_equal_one_worker_from_the_same_init():
    torch.set_num_threads(1)
    single = lloyd_on_shard(0, 1)
    w0, w1 = run_gloo(lloyd_on_shard, 2)
    np.testing.assert_array_equal(w0, w1)
    np.testing.assert_allclose(w0, single, rtol=1e-5, atol=1e-5)


def test_kmeans_two_workers_equal_one_worker_whatever_the_sharding():
    # Seeding draws its sample by global index (200 of 600 rows), so an interleaved 2-way split seeds exactly
    # as one process holding every row.
    torch.set_num_threads(1)
    single, inertia = kmeans_on_shard(0, 1)
    (w0, i0), (w1, i1) = run_gloo(kmeans_on_shard, 2)
    np.testing.assert_array_equal(w0, w1)
    np.testing.assert_allclose(w0, single, rtol=1e-5, atol=1e-5)
    assert abs(i0 - inertia) <= 1e-4 * inertia


def test_kmeans_recovers_separated_blobs():
    from sklearn.metrics import adjusted_rand_score

    x, y = _blobs()
    res = km.kmeans(x, 6, seed=0)
    labels, _ = km.assign(x, res.centers)
    assert adjusted_rand_score(y.numpy(), labels.numpy()) > 0.99


def test_kmeans_far_from_the_origin_is_kmeans_moved_there():
    # k-means is translation invariant; its |x|^2 - 2 x.c + |c|^2 distances are not in fp32: at 1e4 from the
    # origin their cancellation error (~1e-7 x 5e8) passes the blobs' own spread. kmeans runs on rows moved to
    # their mean, so the far blobs cluster as the near ones do, at the same inertia and centers moved back.
    from sklearn.metrics import adjusted_rand_score

    x, y = _blobs()
    near = km.kmeans(x, 6, seed=0)
    far = km.kmeans(x + 1e4, 6, seed=0)
    labels, _ = km.assign(x, far.centers - 1e4)
    assert adjusted_rand_score(y.numpy(), labels.numpy()) > 0.99
    assert abs(far.inertia - near.inertia) <= 1e-3 * near.inertia
    torch.testing.assert_close(far.centers - 1e4, near.centers, rtol=0, atol=1e-2)


def test_assign_in_chunks_equals_one_block():
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(3000, 8, generator=g), torch.randn(1000, 8, generator=g)
    ref = torch.cdist(x.double(), c.double()).pow(2)
    labels, d2 = km.assign(x, c, chunk=7)  # 429 blocks of (7, 1000)
    assert torch.equal(labels, ref.argmin(1))
    torch.testing.assert_close(d2.double(), ref.min(1).values, rtol=1e-4, atol=1e-4)


def test_k1000_runs_in_blocks_bounded_by_max_elems(monkeypatch):
    # K = 1000 on 4000 points with blocks of at most 5000 distances (5 rows): same result as one big block, and
    # Lloyd lowers the inertia of the k-means++ seeds. At K = 10,000 the default budget gives 3,355-row blocks.
    x, _ = _blobs(n=4000, k=50, d=8, seed=2)
    big = km.kmeans(x, 1000, iters=5, restarts=1, seed=0, init_sample=4000)
    seen: list[int] = []
    real = km._sq_dists

    def spy(a, b, xx=None):
        seen.append(a.shape[0] * b.shape[0])
        return real(a, b, xx)

    monkeypatch.setattr(km, "MAX_ELEMS", 5000)
    monkeypatch.setattr(km, "_sq_dists", spy)
    small = km.kmeans(x, 1000, iters=5, restarts=1, seed=0, init_sample=4000)
    torch.testing.assert_close(small.centers, big.centers)
    assign_blocks = [s for s in seen if s > 4000]  # k-means++ updates are (4000, 1); the rest are (rows, K) blocks
    assert assign_blocks and max(assign_blocks) <= 5000
    seeds = km.kmeans_pp(x, 1000, torch.Generator().manual_seed(0))
    assert small.inertia < float(km.assign(x, seeds)[1].sum())
    assert max(1, 2**25 // 10_000) == 3355

"""The streaming reader (docs/data.md): exactly once over ranks x loader workers, per-epoch order, resume, retries,
and the local cache. Real shards in tmp_path, real DataLoader worker processes."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

import djc.data.stream as stream_mod
from djc.data.io import FETCH_THREADS, ShardReadError
from djc.data.writer import write_dataset
from djc.data.loader import StreamLoader
from djc.data.stream import ShardStream

N, B = 1003, 16  # uneven on purpose: 1003 = 2 x 501 + 1, and 501 is not a multiple of 16


def write_toy(url: str, n: int = N, **kw):
    """n 4x4 grayscale images whose first two pixels spell their source id i, labelled i % 7."""
    x = np.random.default_rng(0).integers(0, 256, size=(n, 4, 4, 1), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 1, 0] = np.arange(n) // 256, np.arange(n) % 256
    return write_dataset(url, list(x), np.arange(n) % 7, name="toy", class_names=[str(c) for c in range(7)],
                         provenance={}, **{"rows_per_shard": 200, "rows_per_group": 32, **kw})


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("stream") / "ds")
    write_toy(out)
    return out


@pytest.fixture(scope="module")
def s3_url(s3_server) -> str:
    """The same dataset on the loopback S3 server (tests/conftest.py)."""
    out = f"{s3_server.new_bucket()}/toy"
    write_toy(out)
    return out


@pytest.fixture(params=["local", "s3"])
def any_url(request) -> str:
    """The contract-3 properties hold whatever the store: run the test on a local path and on S3."""
    return request.getfixturevalue("url" if request.param == "local" else "s3_url")


def epoch_indices(loader: StreamLoader) -> list[list[int]]:
    return [b["index"].tolist() for b in loader]


def test_exactly_once_over_ranks_and_workers(any_url):
    seen = []
    for rank in range(2):
        s = ShardStream(any_url, batch_size=B, rank=rank, world_size=2, seed=3)
        s.set_epoch(1)
        batches = list(StreamLoader(s, loader_workers=2))
        assert [b["batch_id"] for b in batches] == list(range(s.num_batches()))  # in order despite 2 workers
        assert [len(b["index"]) for b in batches[:-1]] == [B] * (len(batches) - 1)
        assert sum(len(b["index"]) for b in batches) == s.num_samples() == (502 if rank == 0 else 501)
        assert all(b["image"].shape[1:] == (1, 4, 4) and b["image"].dtype == torch.uint8 for b in batches)
        for b in batches:  # label and image travel together (source id i has label i % 7)
            ids = b["image"][:, 0, 0, 0].long() * 256 + b["image"][:, 0, 0, 1].long()
            assert torch.equal(b["label"], ids % 7)
        seen += [i for b in batches for i in b["index"].tolist()]
    assert len(seen) == N and sorted(seen) == list(range(N))


def test_order_is_a_function_of_seed_and_epoch(url):
    def order(epoch: int, seed: int = 0, workers: int = 0) -> list[int]:
        s = ShardStream(url, batch_size=B, seed=seed)
        s.set_epoch(epoch)
        return [i for b in StreamLoader(s, loader_workers=workers) for i in b["index"].tolist()]

    e0 = order(0)
    assert e0 == order(0, workers=2)  # same epoch, same order, however many loader workers
    assert e0 != order(1) and sorted(order(1)) == sorted(e0) == list(range(N))
    assert e0 != order(0, seed=1)
    assert order(0) == e0  # a fresh stream object agrees
    # Rows are mixed across row groups: a batch is not one 32-row group's worth of neighbours.
    first = e0[:B]
    assert max(first) - min(first) > 32
    s = ShardStream(url, batch_size=B, shuffle=False)
    assert [i for b in s for i in b["index"].tolist()] == list(range(N))  # natural order when not shuffling


@pytest.mark.parametrize("k", [5, 29])  # mid-epoch, and 3 batches before the end of epoch 0 (32 batches)
def test_resume_yields_the_same_next_batches(any_url, k):
    def fresh() -> StreamLoader:
        return StreamLoader(ShardStream(any_url, batch_size=B, rank=1, world_size=2, seed=7), loader_workers=2)

    full = fresh()
    reference = epoch_indices(full)
    full.set_epoch(1)
    reference += epoch_indices(full)

    first = fresh()
    consumed = []
    for batch in first:
        consumed.append(batch["index"].tolist())
        if len(consumed) == k:
            break
    state = first.state_dict()
    assert state == {"epoch": 0, "batch": k, "seed": 7}

    resumed = fresh()
    resumed.load_state_dict(state)
    assert resumed.position == k
    rest = epoch_indices(resumed)
    resumed.set_epoch(1)
    rest += epoch_indices(resumed)
    assert consumed + rest == reference


def test_state_at_the_end_of_an_epoch_resumes_to_nothing_left(url):
    loader = StreamLoader(ShardStream(url, batch_size=B), loader_workers=0)
    n = len(epoch_indices(loader))
    again = StreamLoader(ShardStream(url, batch_size=B))
    again.load_state_dict(loader.state_dict())
    assert loader.state_dict()["batch"] == n and epoch_indices(again) == []
    with pytest.raises(ValueError, match="seed 0"):
        StreamLoader(ShardStream(url, batch_size=B, seed=1)).load_state_dict(loader.state_dict())


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_full_batches_all_ranks(url, world):
    streams = [ShardStream(url, batch_size=B, rank=r, world_size=world) for r in range(world)]
    sizes = [s.num_samples() for s in streams]
    assert sum(sizes) == N and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the remainder goes to the first N % W ranks
    steps = streams[0].full_batches_all_ranks()
    assert steps == min(n // B for n in sizes)
    assert all(s.full_batches_all_ranks() == steps <= s.num_batches() for s in streams)
    assert StreamLoader(streams[-1]).steps_per_epoch == steps


class _FlakyFS:
    """Wraps a filesystem: every file's first `fail` reads raise a transient ConnectionError."""

    def __init__(self, fs, fail: int):
        self.fs, self.fail = fs, fail

    def open(self, path, mode="rb", **kw):
        f, outer = self.fs.open(path, mode, **kw), self

        class File:
            def read(self, n=-1):
                if outer.fail > 0:
                    outer.fail -= 1
                    raise ConnectionError("connection reset by peer")
                return f.read(n)

            def __getattr__(self, name):
                return getattr(f, name)

        return File()


class _FastRetry(ShardStream):
    RETRY_BASE_S = 0.001


def test_transient_errors_are_retried_then_named(url, monkeypatch):
    real = stream_mod.fs_path

    monkeypatch.setattr(stream_mod, "fs_path", lambda u: (_FlakyFS(real(u)[0], fail=3), real(u)[1]))
    got = [i for b in _FastRetry(url, batch_size=B, retries=5) for i in b["index"].tolist()]
    assert sorted(got) == list(range(N))

    monkeypatch.setattr(stream_mod, "fs_path", lambda u: (_FlakyFS(real(u)[0], fail=10**9), real(u)[1]))
    with pytest.raises(ShardReadError, match=f"reading shard {url}/shard-0000\\d.parquet failed 3 times"):
        list(_FastRetry(url, batch_size=B, retries=3))


def test_cache_serves_later_epochs(url, tmp_path):
    ds, cache = str(tmp_path / "ds"), tmp_path / "cache"
    shutil.copytree(url, ds)  # a private copy: this test damages it
    s = ShardStream(ds, batch_size=B, cache_dir=str(cache))
    first = [i for b in s for i in b["index"].tolist()]
    assert sorted(os.listdir(cache)) == sorted(f"{sh.sha256}.parquet" for sh in s.manifest.shards)  # no temps

    later = ShardStream(ds, batch_size=B, cache_dir=str(cache))
    for sh in later.manifest.shards:  # the remote copies go bad: only the cache can serve the next epoch
        with open(os.path.join(ds, sh.path), "r+b") as f:
            f.truncate(10)
    assert [i for b in later for i in b["index"].tolist()] == first

    # Reads one at a time (no prefetch): the bound is then exact; each prefetch thread may add one shard.
    small = ShardStream(url, batch_size=B, cache_dir=str(tmp_path / "small"), cache_max_bytes=1, prefetch_batches=0)
    assert sorted(i for b in small for i in b["index"].tolist()) == list(range(N))
    assert len(os.listdir(tmp_path / "small")) == 1  # bounded: only the most recent copy is kept
    threaded = ShardStream(url, batch_size=B, cache_dir=str(tmp_path / "threaded"), cache_max_bytes=1)
    assert sorted(i for b in threaded for i in b["index"].tolist()) == list(range(N))
    assert 1 <= len(os.listdir(tmp_path / "threaded")) <= FETCH_THREADS


def test_racing_evictions_keep_the_newest_copy(url, tmp_path):
    """Two fetchers publish a then b, then evict in the opposite order: each used to keep only its own copy
    and remove the other's, leaving nothing (seen once in CI with prefetch threads)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    s = ShardStream(url, batch_size=B, cache_dir=str(cache), cache_max_bytes=1)
    a, b = str(cache / "a.parquet"), str(cache / "b.parquet")
    for path, mtime in ((a, 1000), (b, 2000)):
        with open(path, "wb") as f:
            f.write(b"x" * 8)
        os.utime(path, (mtime, mtime))
    s._evict(keep=a)  # the older publisher must not remove the newer copy ...
    s._evict(keep=b)  # ... which then evicts the older one
    assert os.listdir(cache) == ["b.parquet"]

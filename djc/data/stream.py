"""The streaming reader (docs/data.md): shards -> decoded batches, split over ranks x loader workers.

The order of an epoch is a pure function of (seed, epoch) and the manifest; no I/O decides it:
  1. units = the Parquet row groups of every shard, permuted by rng(seed, epoch) (shuffle=False: as written);
  2. consecutive permuted units form windows of `window` units, and rows are permuted inside each window by
     rng(seed, epoch, window id). With row groups about a batch long, a batch would otherwise hold the same
     rows every epoch; a window of 16 units mixes 16 groups into every batch for 16 groups of memory;
  3. rank r of W takes a contiguous slice of that sequence: the first N % W ranks get ceil(N / W) samples, the
     rest floor(N / W), so every sample is read exactly once per epoch over the job, and a rank reads only
     the windows its slice touches;
  4. the slice is cut into batches j = 0, 1, ... of `batch_size` (the last may be partial). DataLoader worker
     w of D builds the batches j >= start with (j - start) % D == w, in increasing j. The DataLoader
     (batch_size=None, in order) round-robins its workers, so it yields start, start + 1, ... exactly; a
     worker with a smaller w never has fewer batches, so this holds at the end of the epoch too.
Resuming is therefore just (epoch, next batch): nothing about the loader's processes needs saving.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from djc.data.cache import ShardCache
from djc.data.io import Group, Prefetcher, RetryingFile, ShardReadError
from djc.data.shards import CorruptDataError, DatasetError, Manifest, decode_image, fs_path, read_manifest

log = logging.getLogger(__name__)

_COLUMNS = ["index", "label", "image"]

class ShardStream(IterableDataset):
    """Batches {index (B,) int64, label (B,) int64, image (B, C, H, W) uint8, batch_id int, skipped int} of
    rank `rank`'s slice of an epoch (order: module docstring). Call set_epoch(e) before each epoch.

    Reads fetch only the row groups a worker's batches need, straight from the store: per shard its footer
    once, then one ranged read per row group (one GET on S3; nothing is downloaded first). The groups of the
    next `prefetch_batches` batches are read in background threads while the current batch decodes
    (Prefetcher). Transient errors are retried `retries` times with backoff 0.2 s, 0.4 s, ...; a corrupt
    shard raises CorruptDataError naming it; an undecodable image raises CorruptDataError naming shard and
    row, or with on_corrupt="skip" is dropped from its batch and counted (batch["skipped"], self.skipped).

    cache_dir: a local copy of each shard is made on its first read (in the prefetch threads) and later reads
    use it, under cache_max_bytes (djc/data/cache.py).

    order: the dataset index of every row in the shards' order (N,). Given it, batches are {index, batch_id,
    skipped} of the same rows in the same order, computed without reading or decoding anything: a run on cached
    features (djc/features.py) looks its inputs up by index.
    """

    RETRY_BASE_S = 0.2

    def __init__(self, url_or_manifest: str | Manifest, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, window: int = 16, on_corrupt: str = "error",
                 cache_dir: str | None = None, cache_max_bytes: int = 20 << 30, retries: int = 5,
                 prefetch_batches: int = 4, order: np.ndarray | None = None):
        m = url_or_manifest if isinstance(url_or_manifest, Manifest) else read_manifest(url_or_manifest)
        if batch_size < 1 or window < 1 or retries < 1 or seed < 0 or prefetch_batches < 0:
            raise ValueError(f"need batch_size, window, retries >= 1 and seed, prefetch_batches >= 0; got "
                             f"{batch_size}, {window}, {retries}, {seed}, {prefetch_batches}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.manifest, self.batch_size, self.rank, self.world_size = m, batch_size, rank, world_size
        self.seed, self.shuffle, self.window, self.on_corrupt = seed, shuffle, window, on_corrupt
        self.cache_dir, self.cache_max_bytes, self.retries = cache_dir, cache_max_bytes, retries
        self._cache = ShardCache(cache_dir, cache_max_bytes, retries, self.RETRY_BASE_S) if cache_dir else None
        self.prefetch_batches = prefetch_batches
        # Unit u = row group (shard[u], group[u]) of sizes[u] rows, starting at row first[u] of its shard.
        self._shard = np.array([s for s, sh in enumerate(m.shards) for _ in sh.row_groups], dtype=np.int64)
        self._group = np.array([g for sh in m.shards for g in range(len(sh.row_groups))], dtype=np.int64)
        self._sizes = np.array([n for sh in m.shards for n in sh.row_groups], dtype=np.int64)
        self._first = np.concatenate([np.cumsum([0, *sh.row_groups[:-1]]) for sh in m.shards]).astype(np.int64)
        if order is not None and len(order) != m.num_samples:
            raise ValueError(f"order has {len(order)} rows, the dataset {m.num_samples}")
        self.order = order
        self._epoch, self._start, self.skipped = 0, 0, 0
        self._plan: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self._pid = -1  # per-process readers, made on first use: never shared across a fork

    # --- the deterministic order --------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """The first batch the next iteration yields."""
        return self._start

    def set_epoch(self, epoch: int) -> None:
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, batch: int) -> None:
        if epoch < 0 or not 0 <= batch <= self.num_batches():
            raise ValueError(f"position (epoch {epoch}, batch {batch}) is outside [0, {self.num_batches()}]")
        self._epoch, self._start = int(epoch), int(batch)

    def _bounds(self, rank: int) -> tuple[int, int]:
        base, extra = divmod(self.manifest.num_samples, self.world_size)
        lo = rank * base + min(rank, extra)
        return lo, lo + base + (rank < extra)

    def num_samples(self, rank: int | None = None) -> int:
        lo, hi = self._bounds(self.rank if rank is None else rank)
        return hi - lo

    def num_batches(self, rank: int | None = None) -> int:
        return -(-self.num_samples(rank) // self.batch_size)

    def full_batches_all_ranks(self) -> int:
        """min over ranks of floor(n_r / batch_size): the steps per epoch every rank can take with full batches,
        so DDP ranks stay in lockstep (the smallest rank holds floor(N / W) samples)."""
        return (self.manifest.num_samples // self.world_size) // self.batch_size

    def positions(self, epoch: int, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(unit ids, rows within unit) of rank's slice of the epoch, computed only for the windows it touches."""
        if self._plan is not None and self._plan[0] == (epoch, rank):
            return self._plan[1], self._plan[2]
        U, K, sizes = len(self._sizes), self.window, self._sizes
        order = np.random.default_rng([self.seed, epoch]).permutation(U) if self.shuffle else np.arange(U)
        win_start = np.concatenate([[0], np.cumsum(np.add.reduceat(sizes[order], np.arange(0, U, K)))])
        lo, hi = self._bounds(rank)
        us, rs = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for k in range(max(0, int(np.searchsorted(win_start, lo, side="right")) - 1), len(win_start) - 1):
            if win_start[k] >= hi:
                break
            units = order[k * K:(k + 1) * K]
            u = np.repeat(units, sizes[units])  # (S,) the window's rows in unit order
            r = np.arange(len(u)) - np.repeat(np.cumsum(sizes[units]) - sizes[units], sizes[units])
            if self.shuffle:
                p = np.random.default_rng([self.seed, epoch, k]).permutation(len(u))
                u, r = u[p], r[p]
            a, b = max(lo, win_start[k]) - win_start[k], min(hi, win_start[k + 1]) - win_start[k]
            us.append(u[a:b])
            rs.append(r[a:b])
        self._plan = ((epoch, rank), np.concatenate(us), np.concatenate(rs))
        return self._plan[1], self._plan[2]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batch": self._start, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:  # another seed is another order: the saved position means nothing
            raise ValueError(f"stream state was saved with seed {state['seed']}, this stream has seed {self.seed}")
        self.set_position(int(state["epoch"]), int(state["batch"]))

    # --- iteration ----------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w, D = (info.id, info.num_workers) if info is not None else (0, 1)
        units, rows = self.positions(self._epoch, self.rank)
        B = self.batch_size
        todo = [(j, units[j * B:(j + 1) * B], rows[j * B:(j + 1) * B])
                for j in range(self._start + w, self.num_batches(), D)]
        if self.order is not None:  # indices only: row (u, r) is row first-of-its-shard + first[u] + r overall
            start = np.concatenate([[0], np.cumsum([sh.num_samples for sh in self.manifest.shards])])
            offset = start[self._shard] + self._first  # (units,)
            for j, u, r in todo:
                yield {"index": torch.from_numpy(self.order[offset[u] + r]), "batch_id": j, "skipped": 0}
            return
        self._readers()
        with Prefetcher(self._row_group, [u for _, u, _ in todo], self.prefetch_batches) as groups:
            for k, (j, u, r) in enumerate(todo):
                yield self._batch(j, u, r, groups.take(k))

    def _batch(self, j: int, units: np.ndarray, rows: np.ndarray, tables: dict[int, Group]) -> dict[str, Any]:
        idx, lab, imgs, skipped, first_where = [], [], [], 0, ""
        for u, r in zip(units.tolist(), rows.tolist()):
            index, label, blobs = tables[u]
            try:
                im = decode_image(blobs[r])
            except CorruptDataError as e:
                err = CorruptDataError(f"undecodable image at {self._where(u, r, index)}: {e}")
                if self.on_corrupt == "error":
                    raise err from e
                skipped += 1
                log.warning("skipped %s", err)
                continue
            if imgs and im.shape != imgs[0].shape:
                raise DatasetError(f"image at {self._where(u, r, index)} is {tuple(im.shape)} (C, H, W) but "
                                   f"{first_where} is {tuple(imgs[0].shape)}: a batch needs one size; resize "
                                   f"the images when preparing the dataset")
            first_where = first_where or self._where(u, r, index)
            idx.append(int(index[r]))
            lab.append(int(label[r]))
            imgs.append(im)
        self.skipped += skipped
        shape = self.manifest.image_shape
        empty = (0, shape[2], shape[0], shape[1]) if shape else (0, 0, 0, 0)  # every image of the batch skipped
        return {"index": torch.tensor(idx, dtype=torch.int64), "label": torch.tensor(lab, dtype=torch.int64),
                "image": torch.stack(imgs) if imgs else torch.zeros(empty, dtype=torch.uint8),
                "batch_id": j, "skipped": skipped}

    def _where(self, u: int, r: int, index: np.ndarray) -> str:
        s = int(self._shard[u])
        return f"shard {self.manifest.shard_url(s)} row {int(self._first[u]) + r} (index {int(index[r])})"

    # --- reading ------------------------------------------------------------------------------------------
    # Called from the prefetch threads: per-shard state is made once under that shard's lock, and every
    # row-group read opens its own file, so no file position is shared between threads.
    def __getstate__(self) -> dict[str, Any]:
        # Filesystems, locks and footers belong to one process; a spawned DataLoader worker makes its own.
        return {k: v for k, v in self.__dict__.items() if k not in ("_fs", "_lock", "_shards")} | {"_pid": -1}

    def _readers(self) -> None:
        if self._pid != os.getpid():  # first use in this process (a fresh DataLoader worker)
            self._pid, self._fs = os.getpid(), fs_path(self.manifest.url)
            self._lock = threading.Lock()  # guards _shards itself
            self._shards: dict[int, tuple[threading.Lock, list[Any]]] = {}  # shard -> (lock, [footer, size])

    def _row_group(self, u: int) -> Group:
        """(index, label, image bytes) of unit u: one ranged read of its row group's bytes."""
        s, g, url = int(self._shard[u]), int(self._group[u]), self.manifest.shard_url(int(self._shard[u]))
        meta, size = self._footer(s)
        f = RetryingFile(self._opener(s, size), url, self.retries, self.RETRY_BASE_S, size=size)
        try:
            # pre_buffer coalesces the row group's column chunks into one read: one GET on S3.
            t = pq.ParquetFile(f, metadata=meta, pre_buffer=True).read_row_group(g, columns=_COLUMNS)
        except (ShardReadError, DatasetError):
            raise
        except Exception as e:  # not a storage error (those are wrapped above): the bytes do not parse
            raise CorruptDataError(f"shard {url} is corrupt: row group {g}: {type(e).__name__}: {e}") from e
        finally:
            f.close()
        if t.num_rows != self._sizes[u]:
            raise CorruptDataError(f"shard {url} row group {g} has {t.num_rows} rows, manifest.json says "
                                   f"{self._sizes[u]}")
        return t.column("index").to_numpy(), t.column("label").to_numpy(), t.column("image").to_pylist()

    def _opener(self, s: int, size: int) -> Callable[[], IO[bytes]]:
        if self.cache_dir:
            return lambda: self._cached(s)[0]
        fs, root = self._fs
        path = f"{root}/{self.manifest.shards[s].path}"
        # cache_type="none": each read is one ranged request of exactly what pyarrow asks for (s3fs' default
        # reads ahead 50 MB, a whole shard of small images); size= spares a HEAD request per row group.
        return lambda: fs.open(path, "rb", cache_type="none", size=size)

    def _footer(self, s: int) -> tuple[pq.FileMetaData, int]:
        """Shard s's Parquet footer and real size, read once per process."""
        with self._lock:
            lock, slot = self._shards.setdefault(s, (threading.Lock(), []))
        with lock:
            if not slot:
                url = self.manifest.shard_url(s)
                if self.cache_dir:
                    f: Any = RetryingFile(lambda: self._cached(s)[0], url, self.retries, self.RETRY_BASE_S)
                else:
                    fs, root = self._fs
                    path = f"{root}/{self.manifest.shards[s].path}"
                    f = RetryingFile(lambda: fs.open(path, "rb", cache_type="none"), url, self.retries,
                                      self.RETRY_BASE_S)
                try:
                    size = f.seek(0, 2)  # the real size, not the manifest's: a replaced file must still parse
                    slot += [pq.ParquetFile(f).metadata, size]
                except (ShardReadError, DatasetError):
                    raise
                except Exception as e:
                    raise CorruptDataError(f"shard {url} is not readable Parquet: {type(e).__name__}: {e}") from e
                finally:
                    f.close()
        return slot[0], slot[1]

    def _cached(self, s: int) -> tuple[IO[bytes], str]:
        """(open file, path) of the local copy of shard s, downloaded first if needed (djc/data/cache.py)."""
        fs, root = self._fs
        return self._cache.open(fs, f"{root}/{self.manifest.shards[s].path}", self.manifest.shards[s],
                                self.manifest.shard_url(s))

    def _evict(self, keep: str) -> None:
        self._cache.evict(keep)

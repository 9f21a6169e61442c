"""The dataset writer: images and labels -> shards and a manifest (the format is djc/data/shards.py's).

The order is shuffled once with the seed before `index` is assigned; shards are written first, the manifest
last through the one atomic writer (djc/runfiles.py), so a half-written dataset is never read as one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from djc.data.shards import (FORMAT, MANIFEST, CorruptDataError, DatasetError, ImageInfo, Manifest, ShardInfo,
                             _strip, as_png_or_jpeg, decode_array, encode_png, fs_path,
                             image_encoding)
from djc.runfiles import write_bytes
from djc.storage import require_bucket


class PixelStats:
    """Per-channel pixel sums as exact Python ints, so mean/std equal numpy's float64 result to rounding.
    A grayscale image in an otherwise RGB set counts as R = G = B."""

    def __init__(self) -> None:
        self.s: dict[int, np.ndarray] = {}  # channels -> (C,) sums of x, x^2 and pixel count
        self.shapes: set[tuple[int, int, int]] = set()

    def add(self, a: np.ndarray) -> None:
        self.shapes.add(a.shape)
        x = a.reshape(-1, a.shape[2]).astype(np.int64)  # (H*W, C)
        acc = np.concatenate([x.sum(0), (x * x).sum(0), [x.shape[0]]]).astype(object)
        self._add_sums(a.shape[2], acc)

    def _add_sums(self, c: int, acc: np.ndarray) -> None:
        self.s[c] = self.s[c] + acc if c in self.s else acc

    def state(self) -> dict[str, Any]:
        """JSON-able (exact ints): what a parallel writer's workers send and a resumable writer stores."""
        return {"sums": {str(c): [int(v) for v in acc] for c, acc in self.s.items()},
                "shapes": sorted(list(s) for s in self.shapes)}

    def merge(self, state: dict[str, Any]) -> None:
        for c, acc in state["sums"].items():
            self._add_sums(int(c), np.array([int(v) for v in acc], dtype=object))
        self.shapes.update(tuple(s) for s in state["shapes"])

    def mean_std(self) -> tuple[list[float], list[float]]:
        if not self.s:
            return [], []
        C = max(self.s)
        tot = sum((np.concatenate([np.repeat(v[:c], C // c), np.repeat(v[c:2 * c], C // c), v[-1:]])
                   for c, v in self.s.items()), start=np.zeros(2 * C + 1, dtype=object))
        n = tot[-1]
        mean = [float(tot[k] / n / 255) for k in range(C)]
        std = [float(((n * tot[C + k] - tot[k] ** 2) / (n * n)) ** 0.5 / 255) for k in range(C)]
        return mean, std


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("djc")
    except Exception:  # running from a source tree that was never pip-installed
        return "dev"


def write_dataset(out_url: str, images: Sequence[Any], labels: Sequence[int] | np.ndarray, *, name: str,
                  class_names: Sequence[str], provenance: dict[str, Any], rows_per_shard: int = 4096,
                  rows_per_group: int = 256, seed: int = 0, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Write `images` (uint8 (H, W, C) arrays or encoded bytes) and `labels` as a dataset at `out_url`.

    The order is shuffled once with `seed` before `index` is assigned. Row groups of 256 rows are about one
    batch: the stream's unit of reading and shuffling. `progress(done, total)` is called after each shard.
    """
    n, C = len(images), len(class_names)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if n == 0 or len(y) != n:
        raise ValueError(f"need as many labels as images (and at least one): {n} images, {len(y)} labels")
    if y.min() < -1 or y.max() >= C:
        raise ValueError(f"labels must be -1 or in [0, {C}) for {C} class names; got {y.min()}..{y.max()}")
    if rows_per_shard < 1 or rows_per_group < 1:
        raise ValueError("rows_per_shard and rows_per_group must be >= 1")
    url = _strip(out_url)
    require_bucket(url)  # before makedirs, which would create a bucket named by a typo
    fs, root = fs_path(url)
    if fs.exists(f"{root}/{MANIFEST}"):
        if not overwrite:
            raise DatasetError(f"a dataset already exists at {url} ({MANIFEST}); pass overwrite=True "
                               f"(djc prepare --overwrite) to replace it")
        fs.rm(f"{root}/{MANIFEST}")  # first, so the directory stops being a dataset before its shards change
    for stale in fs.glob(f"{root}/shard-*.parquet"):  # left by the replaced dataset or a crashed write
        fs.rm(stale)
    fs.makedirs(root, exist_ok=True)

    order = np.random.default_rng(seed).permutation(n)
    stats, encodings, shards = PixelStats(), set(), []
    for s, lo in enumerate(range(0, n, rows_per_shard)):
        rows = order[lo: lo + rows_per_shard]
        blobs = []
        for i in rows:
            item = images[int(i)]
            try:
                if isinstance(item, (bytes, bytearray, memoryview)):
                    blob = as_png_or_jpeg(bytes(item))
                    stats.add(decode_array(blob))  # also proves every stored image decodes
                else:
                    a = np.asarray(item)
                    blob = encode_png(a)
                    stats.add(a[:, :, None] if a.ndim == 2 else a)
            except (ValueError, CorruptDataError) as e:
                where = images.where(int(i)) if hasattr(images, "where") else f"source sample {int(i)}"
                raise DatasetError(f"{where} cannot be stored: {e}") from e
            encodings.add(image_encoding(blob))
            blobs.append(blob)
        path = f"shard-{s:05d}.parquet"
        buf, info = shard_bytes(path, lo, y[rows], blobs, rows_per_group)
        with fs.open(f"{root}/{path}", "wb") as f:
            f.write(buf)
        shards.append(info)
        if progress is not None:
            progress(lo + len(rows), n)

    return write_manifest(url, name=name, class_names=class_names, labels=y, stats=stats, encodings=encodings,
                          shards=shards, provenance=provenance)


def shard_bytes(path: str, first_index: int, labels: np.ndarray, blobs: list[bytes],
                rows_per_group: int) -> tuple[bytes, ShardInfo]:
    """One Parquet shard (index first_index.., label, image) and its manifest entry."""
    table = pa.table({"index": pa.array(np.arange(first_index, first_index + len(blobs)), pa.int64()),
                      "label": pa.array(labels, pa.int64()), "image": pa.array(blobs, pa.binary())})
    sink = pa.BufferOutputStream()
    # Images are compressed already; statistics on them would only bloat the footer.
    pq.write_table(table, sink, row_group_size=rows_per_group, write_statistics=["index", "label"],
                   compression={"index": "snappy", "label": "snappy", "image": "none"})
    buf = sink.getvalue().to_pybytes()
    meta = pq.ParquetFile(pa.BufferReader(buf)).metadata
    groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
    return buf, ShardInfo(path, len(blobs), groups, hashlib.sha256(buf).hexdigest(), len(buf))


def write_manifest(url: str, *, name: str, class_names: Sequence[str], labels: np.ndarray, stats: PixelStats,
                   encodings: set[str | None], shards: list[ShardInfo], provenance: dict[str, Any]) -> Manifest:
    """The manifest of written shards, written last and atomically: until it exists the URL is no dataset."""
    C, y = len(class_names), np.asarray(labels, dtype=np.int64)
    mean, std = stats.mean_std()
    m = Manifest(url=url, format=FORMAT, name=name, num_samples=len(y), num_classes=C,
                 class_names=tuple(class_names),
                 class_counts=tuple(int(c) for c in np.bincount(y[y >= 0], minlength=C)),
                 image=ImageInfo(next(iter(stats.shapes)) if len(stats.shapes) == 1 else None,
                                 next(iter(encodings)) if len(encodings) == 1 else "mixed", tuple(mean), tuple(std)),
                 shards=tuple(shards), provenance=dict(provenance), created_by=f"djc {_version()}")
    write_bytes(f"{url}/{MANIFEST}", m.to_json().encode())
    return m

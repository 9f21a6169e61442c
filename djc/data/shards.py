"""The dataset format (docs/data.md): `manifest.json` + Parquet shards at any fsspec URL.

    <url>/shard-00000.parquet ...   columns: index int64 (global, dense, [0, N)), label int64 (-1 = unknown),
                                    image binary (PNG for arrays; JPEG/PNG file bytes as given)
    <url>/manifest.json             written LAST, via a temp name: a directory without it is not a dataset

`index` is the position in the written order, which is shuffled once at write time, so shards are not
class-sorted and the label of index i never changes: per-instance state (assignment memories) is keyed by it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from djc.runfiles import write_bytes
from djc.storage import StorageError, require_bucket

if TYPE_CHECKING:
    import torch

FORMAT = "djc-dataset/1"
MANIFEST = "manifest.json"
_PNG_SIG, _JPEG_SIG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


class DatasetError(ValueError):
    """A dataset that cannot be used as asked: missing, malformed, or already there. The message names it."""


class CorruptDataError(DatasetError):
    """Bytes that do not decode: an unreadable shard or image. The message names the shard (and row)."""


# --------------------------------------------------------------------------------------------------------
# Images


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 (H, W), (H, W, 1) or (H, W, 3) array."""
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"images must be (H, W, 1) or (H, W, 3), got shape {array.shape}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode_array(data: bytes, where: str = "image") -> np.ndarray:
    """uint8 (H, W, C): grayscale ("L") stays 1 channel, every other mode becomes RGB. `where` names the
    image in the CorruptDataError (e.g. "shard s3://b/ds/shard-00003.parquet row 17")."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im if im.mode == "L" else im.convert("RGB")
            a = np.array(im)  # a writable copy; load() errors (truncation) surface here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... depending on the codec
        raise CorruptDataError(f"cannot decode {where} ({len(data)} bytes): {type(e).__name__}: {e}") from e
    return a[:, :, None] if a.ndim == 2 else a


def decode_image(data: bytes, where: str = "image") -> torch.Tensor:
    """uint8 (C, H, W) tensor of encoded image bytes; CorruptDataError (naming `where`) when they do not decode."""
    import torch  # here, not at the top: `djc prepare`'s encoding processes start without torch (seconds each)

    return torch.from_numpy(decode_array(data, where)).permute(2, 0, 1).contiguous()


def image_encoding(data: bytes) -> str | None:
    """"png" / "jpeg" from the magic bytes, None for anything else."""
    return "png" if data[:8] == _PNG_SIG else "jpeg" if data[:3] == _JPEG_SIG else None


def as_png_or_jpeg(data: bytes) -> bytes:
    """PNG and JPEG bytes unchanged (no generation loss); other formats (BMP, WebP, ...) re-encoded as PNG."""
    return data if image_encoding(data) else encode_png(decode_array(data))


# --------------------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class ImageInfo:
    shape: tuple[int, int, int] | None  # (H, W, C); None when sizes vary
    encoding: str  # "png" | "jpeg" | "mixed"
    mean: tuple[float, ...]  # per channel, pixels scaled to 0..1
    std: tuple[float, ...]  # population std per channel, 0..1 scale


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset URL
    num_samples: int
    row_groups: tuple[int, ...]  # rows per Parquet row group: the stream's unit of reading
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    url: str  # where it was read from / written to (not stored in the file: a dataset can be moved)
    format: str
    name: str
    num_samples: int
    num_classes: int
    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]  # label order; unlabeled samples excluded
    image: ImageInfo
    shards: tuple[ShardInfo, ...]
    provenance: dict[str, Any]  # source, split, profile, imbalance_ratio, seed, ...
    created_by: str

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return self.image.shape

    @property
    def mean(self) -> list[float]:
        return list(self.image.mean)

    @property
    def std(self) -> list[float]:
        return list(self.image.std)

    def shard_url(self, i: int) -> str:
        return f"{self.url}/{self.shards[i].path}"

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        del d["url"]
        return json.dumps(d, indent=1, default=_json_default)

    @classmethod
    def from_dict(cls, url: str, d: dict[str, Any]) -> Manifest:
        img = d["image"]
        shards = tuple(ShardInfo(str(s["path"]), int(s["num_samples"]), tuple(int(g) for g in s["row_groups"]),
                                 str(s["sha256"]), int(s["bytes"])) for s in d["shards"])
        return cls(url=url, format=d["format"], name=str(d["name"]), num_samples=int(d["num_samples"]),
                   num_classes=int(d["num_classes"]), class_names=tuple(d["class_names"]),
                   class_counts=tuple(int(c) for c in d["class_counts"]),
                   image=ImageInfo(tuple(img["shape"]) if img["shape"] is not None else None, str(img["encoding"]),
                                   tuple(float(x) for x in img["mean"]), tuple(float(x) for x in img["std"])),
                   shards=shards, provenance=dict(d["provenance"]), created_by=str(d["created_by"]))


def fs_path(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a plain path, file://, s3://, memory://, ... URL."""
    return fsspec.core.url_to_fs(url)


def _json_default(o: Any) -> Any:
    return o.item() if hasattr(o, "item") else list(o) if isinstance(o, tuple) else str(o)


def _strip(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len(MANIFEST) - 1] if url.endswith("/" + MANIFEST) else url


def read_manifest(url: str) -> Manifest:
    """The manifest at `url` (the dataset directory), after a cheap check that every listed shard exists."""
    url = _strip(url)
    fs, root = fs_path(url)
    murl = f"{url}/{MANIFEST}"
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except FileNotFoundError:
        require_bucket(url)  # a missing bucket is named as such, not as a missing manifest
        raise DatasetError(f"no dataset at {url}: {MANIFEST} not found") from None
    except PermissionError as e:
        raise StorageError(f"access denied reading {murl} (check the AWS credentials / storage.profile): "
                           f"{e}") from None
    try:
        d = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{murl} is not valid JSON: {e}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise DatasetError(f"{murl} has format {got!r}; this djc reads {FORMAT!r}")
    try:
        m = Manifest.from_dict(url, d)
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{murl} is malformed: {type(e).__name__}: {e}") from None
    if sum(s.num_samples for s in m.shards) != m.num_samples or any(
            sum(s.row_groups) != s.num_samples for s in m.shards):
        raise DatasetError(f"{murl} is inconsistent: shard and row-group sizes do not add up to num_samples")
    check_shards(m)
    return m


def check_shards(manifest: Manifest) -> None:
    """DatasetError naming the first listed shard that does not exist, CorruptDataError naming the first whose
    size differs from the manifest's (truncated, or replaced). One listing, not one request per shard: a
    300-shard dataset on S3 is checked in a single LIST call."""
    fs, root = fs_path(manifest.url)
    fs.invalidate_cache(root)  # s3fs caches listings: a dataset written after our last look must be seen
    try:
        present = {e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("size") for e in fs.ls(root, detail=True)}
    except FileNotFoundError:
        present = {}
    for i, s in enumerate(manifest.shards):
        if "/" in s.path:  # a shard in a subfolder: not in the listing
            size = fs.size(f"{root}/{s.path}") if fs.exists(f"{root}/{s.path}") else None
            there = size is not None
        else:
            there, size = s.path in present, present.get(s.path)
        if not there:
            raise DatasetError(f"shard {manifest.shard_url(i)} listed in {manifest.url}/{MANIFEST} is missing")
        if size is not None and s.bytes and size != s.bytes:
            raise CorruptDataError(f"shard {manifest.shard_url(i)} is {size} bytes, but {MANIFEST} says {s.bytes}: "
                                   f"it was truncated or replaced; prepare the dataset again")


def verify_checksums(manifest: Manifest) -> None:
    """Read every shard in full and compare its size and sha256 with the manifest (optional, slow)."""
    fs, root = fs_path(manifest.url)
    for i, s in enumerate(manifest.shards):
        h, n = hashlib.sha256(), 0
        with fs.open(f"{root}/{s.path}", "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
                n += len(chunk)
        if n != s.bytes or h.hexdigest() != s.sha256:
            raise CorruptDataError(f"shard {manifest.shard_url(i)} does not match the manifest: {n} bytes, sha256 "
                                   f"{h.hexdigest()[:16]}..., expected {s.bytes} bytes, {s.sha256[:16]}...")


# --------------------------------------------------------------------------------------------------------
# The writer


class _Stats:
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
    stats, encodings, shards = _Stats(), set(), []
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


def write_manifest(url: str, *, name: str, class_names: Sequence[str], labels: np.ndarray, stats: _Stats,
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

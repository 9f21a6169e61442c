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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
from PIL import Image

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


def square(im: Image.Image, size: int) -> Image.Image:
    """Short side resized to `size` (bicubic, antialiased), then the centre size x size crop: ImageNet's customary
    resize, and how `djc prepare` gives a folder of photos one image shape."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


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

"""Everything djc writes to a run dir, and reads back: one atomic writer for every file kind.

Every path is an fsspec URL (plain path, file://, s3://, memory://). Whole-file writes go to a temporary name
beside the target and are then moved over it, so a reader (`djc eval`, a notebook polling the run dir) sees the
old file or the new one, never half of one. On a local disk the move is a rename (atomic); on an object store a
PUT is already all-or-nothing and the move is a server-side copy. The dataset writer (djc/data/shards.py)
writes its manifest and shards through the same `write_bytes`.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import uuid
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

PLOT_DPI = 100  # PNGs are exactly (width * dpi) x (height * dpi) pixels


# ---- atomic whole-file writes -------------------------------------------------------------------------

def write_bytes(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_text(url: str, text: str) -> None:
    write_bytes(url, text.encode())


def read_text(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "r") as f:
        return f.read()


def write_png(url: str, fig: Any) -> None:
    """A matplotlib Figure as a PNG of exactly its size at PLOT_DPI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)  # no bbox_inches="tight": it would change the pixel size
    write_bytes(url, buf.getvalue())


# ---- assignments --------------------------------------------------------------------------------------

def write_assignments(
    url: str,
    *,
    index: np.ndarray,
    clusters: np.ndarray,
    confidence: np.ndarray,
    split: str | np.ndarray,
    label: np.ndarray | None = None,
    ood: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    """Write assignments.parquet atomically.

    Columns: ``index`` int64, ``split`` string, ``label`` int64 (-1 when unknown), ``cluster`` int64 (the
    evaluated clustering: head 0, or SeCu's merged head), ``cluster_h1`` .. ``cluster_h{H-1}`` for further
    heads, ``confidence`` float32, ``ood_score`` float32 (only when ``ood`` is given), then the ``extra``
    columns as given (e.g. ``kmeans_pixels``, the pixel k-means baseline's cluster per sample).
    """
    index = np.asarray(index, dtype=np.int64).ravel()
    N = index.size
    clusters = np.asarray(clusters, dtype=np.int64)
    if clusters.ndim == 1:
        clusters = clusters[:, None]  # one head: (N,) -> (N, 1)
    if clusters.ndim != 2 or clusters.shape[0] != N:
        raise ValueError(f"clusters must be (N, H) with N = {N}, got {clusters.shape}")

    def column(name: str, values: np.ndarray, dtype: Any) -> np.ndarray:
        values = np.asarray(values).astype(dtype, copy=False).ravel()
        if values.size != N:
            raise ValueError(f"{name} has {values.size} rows, index has {N}")
        return values

    splits = np.full(N, split, dtype=object) if isinstance(split, str) else column("split", split, object)
    cols: dict[str, pa.Array] = {
        "index": pa.array(index, pa.int64()),
        "split": pa.array(splits.tolist(), pa.string()),
        "label": pa.array(np.full(N, -1, np.int64) if label is None else column("label", label, np.int64)),
        "cluster": pa.array(clusters[:, 0]),
    }
    for h in range(1, clusters.shape[1]):
        cols[f"cluster_h{h}"] = pa.array(clusters[:, h])
    cols["confidence"] = pa.array(column("confidence", confidence, np.float32))
    if ood is not None:
        cols["ood_score"] = pa.array(column("ood_score", ood, np.float32))
    for name, values in (extra or {}).items():
        if name in cols:
            raise ValueError(f"extra column {name!r} clashes with a standard column")
        cols[name] = pa.array(column(name, values, np.asarray(values).dtype))

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), sink)
    write_bytes(url, sink.getvalue().to_pybytes())


def read_assignments(url: str) -> dict[str, np.ndarray]:
    """Column name -> numpy array (``split`` as an object array of str)."""
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "rb") as f:
        try:
            table = pq.read_table(f)
        except pa.ArrowException as e:  # truncated or not Parquet: say which file, in one line
            raise ValueError(f"{url} is not readable Parquet ({str(e).splitlines()[0]}); it was cut short or "
                             f"replaced: train the run again (same --out) to rewrite it") from None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def clusters_by_index(table: dict[str, np.ndarray], split: str) -> np.ndarray:
    """A split's evaluated clusters (the ``cluster`` column of read_assignments' table) in sample-index order:
    two runs of one data set line up row by row."""
    on = table["split"] == split
    return table["cluster"][on][np.argsort(table["index"][on])]


# ---- the map's coordinates and the embeddings ----------------------------------------------------------

def write_map(url: str, coords: dict[str, np.ndarray]) -> None:
    """map.parquet: ``index`` int64, ``split`` string, ``x``, ``y`` float32 (a split's 2-D map sample)."""
    table = pa.table({"index": pa.array(np.asarray(coords["index"], np.int64)),
                      "split": pa.array([str(s) for s in coords["split"]], pa.string()),
                      "x": pa.array(np.asarray(coords["x"], np.float32)),
                      "y": pa.array(np.asarray(coords["y"], np.float32))})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(url, sink.getvalue().to_pybytes())


def read_map(url: str) -> dict[str, np.ndarray]:
    """map.parquet's columns (as read_assignments reads a table)."""
    return read_assignments(url)


def write_npy(url: str, array: np.ndarray) -> None:
    """One .npy file (numpy's format: np.load, memory-mappable with mmap_mode="r")."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array))
    write_bytes(url, buf.getvalue())


# ---- JSON and JSON lines ------------------------------------------------------------------------------

def _jsonable(obj: Any) -> Any:
    """numpy scalars / arrays to Python; NaN and inf to null, because strict JSON has no such numbers."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(url: str, obj: Any) -> None:
    """Pretty (indent 2), sorted keys, atomic. Non-finite floats are written as null."""
    text = json.dumps(_jsonable(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_bytes(url, text.encode())


def append_jsonl(url: str, obj: Any) -> None:
    """Append one JSON line.

    On a local disk this is a true append (one small write per line). Object stores cannot append, so there
    the file is read, extended and rewritten atomically: O(file size) per call and not safe for concurrent
    writers, which is fine for a metrics log written by rank 0 only.
    """
    line = (json.dumps(_jsonable(obj), sort_keys=True, allow_nan=False) + "\n").encode()
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        with fs.open(path, "ab") as f:
            f.write(line)
        return
    old = fs.cat_file(path) if fs.exists(path) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_bytes(url, old + line)


def read_json(url: str) -> Any:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "r") as f:
        return json.load(f)


def read_jsonl(url: str) -> list[Any]:
    """All records. A final line cut short (a crash mid-append) is dropped; a bad line elsewhere raises."""
    fs, path = fsspec.core.url_to_fs(url)
    lines = [ln for ln in fs.cat_file(path).decode().splitlines() if ln.strip()]
    records = []
    for i, ln in enumerate(lines):
        try:
            records.append(json.loads(ln))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{url}: line {i + 1} is not valid JSON") from None
    return records

"""Run outputs (design.md contract 7): assignments.parquet, metrics.json, the JSON-lines log and PNG plots.

Every path is an fsspec URL (plain path, file://, s3://, memory://). Whole-file writes go to a temporary
name beside the target and are then moved over it, so a reader (``djc eval``, a notebook polling the run dir)
sees the old file or the new one, never half of one. On a local disk the move is a rename (atomic); on an
object store a PUT is already all-or-nothing and the move is a server-side copy.

Plots draw on a bare ``matplotlib.figure.Figure`` rendered by the Agg canvas: no pyplot, no global backend
switch, no window, safe on a headless worker.
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
from matplotlib.figure import Figure

from djc.metrics import evaluate, match_clusters

# Figure sizes in inches at PLOT_DPI: PNGs are exactly (width * dpi) x (height * dpi) pixels.
PLOT_DPI = 100
SIZES_FIGSIZE = (8.0, 4.5)
CONFUSION_FIGSIZE = (7.0, 6.0)
LOG_SCALE_RATIO = 20  # switch the size plot to log y when the largest bar is > 20x the smallest
MAX_TICK_LABELS = 30  # beyond this many classes, numbered ticks are unreadable


# ---- atomic whole-file writes -------------------------------------------------------------------------

def _write_bytes_atomic(url: str, data: bytes) -> None:
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
    _write_bytes_atomic(url, text.encode())


def read_text(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "r") as f:
        return f.read()


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
    _write_bytes_atomic(url, sink.getvalue().to_pybytes())


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
    _write_bytes_atomic(url, text.encode())


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
    _write_bytes_atomic(url, old + line)


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


# ---- plots --------------------------------------------------------------------------------------------

def _save_png(url: str, fig: Figure) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)  # no bbox_inches="tight": it would change the pixel size
    _write_bytes_atomic(url, buf.getvalue())


def plot_cluster_sizes(
    url: str,
    y_pred: np.ndarray,
    y_true: np.ndarray | None,
    num_clusters: int,
    class_counts: np.ndarray | None = None,
    title: str = "",
) -> None:
    """Bars of cluster sizes and class sizes, each sorted descending, on shared axes.

    Class sizes are ``class_counts`` when given, else the label counts of ``y_true`` (unlabeled -1 dropped;
    no class bars when ``y_true`` is None or has no label). Pass counts of the same split as ``y_pred`` for a
    like-for-like comparison. The y axis is logarithmic when max / min over the bars exceeds 20 (always when
    some cluster is empty).
    """
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    cluster_sizes = np.sort(np.bincount(y_pred, minlength=num_clusters))[::-1]
    if class_counts is not None:
        class_sizes = np.asarray(class_counts).ravel()
    elif y_true is not None:
        y = np.asarray(y_true, dtype=np.int64).ravel()
        class_sizes = np.bincount(y[y >= 0]) if (y >= 0).any() else np.zeros(0, np.int64)
    else:
        class_sizes = np.zeros(0, np.int64)
    class_sizes = np.sort(class_sizes)[::-1]

    fig = Figure(figsize=SIZES_FIGSIZE, dpi=PLOT_DPI, layout="constrained")
    ax = fig.subplots()
    width = 0.4 if class_sizes.size else 0.8
    ax.bar(np.arange(cluster_sizes.size) - (width / 2 if class_sizes.size else 0), cluster_sizes,
           width=width, label=f"clusters (K={num_clusters})", color="tab:blue")
    if class_sizes.size:
        ax.bar(np.arange(class_sizes.size) + width / 2, class_sizes, width=width,
               label=f"classes (C={class_sizes.size})", color="tab:orange", alpha=0.8)
    values = np.concatenate([cluster_sizes, class_sizes])
    if values.size and values.max() > 0 and values.max() > LOG_SCALE_RATIO * values.min():
        ax.set_yscale("log")
    ax.set_xlabel("rank (largest first)")
    ax.set_ylabel("samples")
    ax.set_title(title or "cluster sizes vs class sizes")
    ax.legend()
    _save_png(url, fig)


def plot_confusion(url: str, y_true: np.ndarray, y_pred: np.ndarray, title: str = "") -> None:
    """Row-normalised confusion matrix: rows = true classes, columns = clusters in Hungarian-match order.

    Column j is the cluster matched to row j's class, so a good clustering shows a bright diagonal;
    unmatched clusters (K > C) follow on the right, largest first. Unlabeled samples are dropped.
    """
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    mapping = match_clusters(t, p)
    t, p = t[t >= 0], p[t >= 0]
    classes, ti = np.unique(t, return_inverse=True)
    by_class = {c: k for k, c in mapping.items()}
    matched = [by_class[c] for c in classes.tolist() if c in by_class]
    rest_ids, rest_sizes = np.unique(p[~np.isin(p, matched)], return_counts=True)
    columns = np.array(matched + rest_ids[np.argsort(-rest_sizes, kind="stable")].tolist(), dtype=np.int64)
    col_of = {k: j for j, k in enumerate(columns.tolist())}
    pj = np.array([col_of[k] for k in p.tolist()], dtype=np.int64)
    C, K = classes.size, columns.size
    counts = np.bincount(ti * K + pj, minlength=C * K).reshape(C, K).astype(np.float64)  # (C, K)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)

    fig = Figure(figsize=CONFUSION_FIGSIZE, dpi=PLOT_DPI, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(rates, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of the class")
    if C <= MAX_TICK_LABELS:
        ax.set_yticks(np.arange(C), [str(c) for c in classes.tolist()])
    if K <= MAX_TICK_LABELS:
        ax.set_xticks(np.arange(K), [str(k) for k in columns.tolist()])
    ax.set_xlabel("cluster (matched order)")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion (row-normalised)")
    _save_png(url, fig)


# ---- metrics from a stored table ----------------------------------------------------------------------

# Baseline assignment column -> key of its metrics inside each split's dict.
BASELINE_COLUMNS = {"kmeans_pixels": "baseline", "kmeans_features": "baseline_features"}

def evaluate_assignments(
    table: dict[str, np.ndarray],
    num_clusters: int,
    class_counts: np.ndarray | None = None,
    column: str = "cluster",
) -> dict[str, dict[str, Any]]:
    """split -> djc.metrics.evaluate of ``column`` against ``label`` on that split's rows.

    For each baseline column present (``kmeans_pixels``, ``kmeans_features``), each split's dict also holds the
    same metrics for that column under BASELINE_COLUMNS' key (``baseline``, ``baseline_features``). A table
    without ``split`` is one split named "all"; without ``label``, all unlabeled.
    ``class_counts`` (training counts) rank head / medium / tail for every split.
    """
    N = len(table[column])
    splits = np.asarray(table["split"], dtype=object) if "split" in table else np.full(N, "all", dtype=object)
    labels = np.asarray(table["label"]) if "label" in table else np.full(N, -1, np.int64)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(splits.tolist())):
        rows = splits == name
        metrics: dict[str, Any] = evaluate(labels[rows], np.asarray(table[column])[rows], num_clusters,
                                           class_counts)
        for col, key in BASELINE_COLUMNS.items():
            if col in table:
                metrics[key] = evaluate(labels[rows], np.asarray(table[col])[rows], num_clusters, class_counts)
        out[str(name)] = metrics
    return out

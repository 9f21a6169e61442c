"""The run's plots, drawn on a bare matplotlib Figure rendered by the Agg canvas: no pyplot, no global backend
switch, no window, safe on a headless worker. Each function writes one PNG through djc.runfiles."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from djc.metrics import match_clusters
from djc.runfiles import PLOT_DPI, write_png

# Figure sizes in inches at PLOT_DPI.
SIZES_FIGSIZE = (8.0, 4.5)
CONFUSION_FIGSIZE = (7.0, 6.0)
LOG_SCALE_RATIO = 20  # switch the size plot to log y when the largest bar is > 20x the smallest
MAX_TICK_LABELS = 30  # beyond this many classes, numbered ticks are unreadable


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
    write_png(url, fig)


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
    write_png(url, fig)

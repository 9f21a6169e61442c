"""The run's plots, drawn on a bare matplotlib Figure rendered by the Agg canvas: no pyplot, no global backend
switch, no window, safe on a headless worker. Each function writes one PNG through djc.runfiles.

Readable at any K: cluster and class sizes are bars up to MAX_BARS of them and rank-size lines on log-log axes
beyond (1000 bars of 0.4 px each are a smear); per-class recall is one point per class against its size; the
confusion image is drawn only up to MAX_CONFUSION_CLASSES classes (at 1000 x 1000 each cell would be under a
pixel of a 600-px image). Everything is vectorised over samples: no per-sample Python work."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from djc.metrics import class_recall, match_clusters
from djc.runfiles import PLOT_DPI, write_png

# Figure sizes in inches at PLOT_DPI.
SIZES_FIGSIZE = (8.0, 4.5)
CONFUSION_FIGSIZE = (7.0, 6.0)
RECALL_FIGSIZE = (8.0, 4.5)
LOG_SCALE_RATIO = 20  # switch the size plot to log y when the largest bar is > 20x the smallest
MAX_TICK_LABELS = 30  # beyond this many classes, numbered ticks are unreadable
MAX_BARS = 50  # clusters (or classes) drawn as bars; more are drawn as rank-size lines on log-log axes
MAX_CONFUSION_CLASSES = 50  # at most this many classes get a confusion image: 600 px / 50 = 12 px per cell


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
    if max(cluster_sizes.size, class_sizes.size) > MAX_BARS:
        _rank_size_lines(ax, cluster_sizes, class_sizes, num_clusters)
    else:
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


def _rank_size_lines(ax, cluster_sizes: np.ndarray, class_sizes: np.ndarray, num_clusters: int) -> None:
    """Sizes (sorted, largest first) against rank 1..K on log-log axes; empty clusters cannot sit on a log axis,
    so the legend counts them."""
    empty = int((cluster_sizes == 0).sum())
    full = cluster_sizes[cluster_sizes > 0]
    ax.step(np.arange(1, full.size + 1), full, where="post", color="tab:blue",
            label=f"clusters (K={num_clusters}" + (f", {empty} empty)" if empty else ")"))
    if class_sizes.size:
        ax.step(np.arange(1, class_sizes.size + 1), class_sizes, where="post", color="tab:orange",
                label=f"classes (C={class_sizes.size})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rank (largest first, log)")


def plot_class_recall(url: str, y_true: np.ndarray, y_pred: np.ndarray, class_counts: np.ndarray | None = None,
                      title: str = "") -> None:
    """Each class's recall after the Hungarian match (what balanced ACC averages) against its size: the
    training count when `class_counts` is given, else its count in `y_true`. Log x; a line of the median
    recall per size bin (4 bins per decade) reads how the tail fares at 1000 classes."""
    classes, recall = class_recall(y_true, y_pred)
    y = np.asarray(y_true, dtype=np.int64).ravel()
    sizes = (np.asarray(class_counts).ravel()[classes] if class_counts is not None
             else np.bincount(y[y >= 0])[classes]).astype(np.float64)
    fig = Figure(figsize=RECALL_FIGSIZE, dpi=PLOT_DPI, layout="constrained")
    ax = fig.subplots()
    ax.scatter(sizes, recall, s=6 if classes.size > MAX_BARS else 20, alpha=0.5, color="tab:blue",
               label=f"one class (C={classes.size})")
    if classes.size and sizes.min() > 0:  # medians over bins of equal width in log size, 4 per decade
        bins = int(np.clip(round(4 * np.log10(sizes.max() / sizes.min())), 1, 12))
        edges = np.geomspace(sizes.min(), sizes.max(), bins + 1)
        b = np.clip(np.searchsorted(edges, sizes, side="right") - 1, 0, bins - 1)
        used = np.unique(b)  # at most 12 bins: a loop over bins, not samples
        ax.plot(np.sqrt(edges[used] * edges[used + 1]), [np.median(recall[b == i]) for i in used],
                color="tab:red", marker="o", label="median per size bin")
    ax.set_xscale("log")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("class size (samples, log)" + (" in training" if class_counts is not None else ""))
    ax.set_ylabel("recall after matching")
    ax.set_title(title or "per-class recall against class size")
    ax.legend(loc="lower right")
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
    col_of = np.zeros(int(columns.max(initial=-1)) + 1, dtype=np.int64)  # cluster id -> column, a lookup table
    col_of[columns] = np.arange(columns.size)
    pj = col_of[p]
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

"""Clustering metrics: numpy arrays in, Python numbers out (docs/methods.md, "Evaluation").

Conventions shared by every function here:
- ``y_true`` holds class labels >= 0, or -1 for an unlabeled sample. Metrics that need labels drop the -1
  samples first; cluster health never looks at labels.
- ``y_pred`` holds cluster ids in [0, K). Cluster ids carry no meaning, so every label-based metric goes
  through one Hungarian match of clusters to classes, which makes the results invariant to relabelling.
- With K != C the match is partial: min(K, C) cluster-class pairs. Samples of an unmatched cluster count as
  errors, and a class no cluster was matched to has recall 0.

No torch here: the trainer calls these on gathered numpy arrays at evaluation time only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

HEALTH_KEYS = ("min_cluster_size", "max_cluster_size", "empty_clusters", "size_entropy")
LABEL_KEYS = ("acc", "nmi", "ari", "balanced_acc", "macro_f1", "head_acc", "medium_acc", "tail_acc")
# Head / medium / tail share of the classes, ranked by training frequency (methods.md: 30% / 40% / 30%).
HEAD_FRACTION, TAIL_FRACTION = 0.3, 0.3


def _as_labels(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as int64 1-D arrays of one length, restricted to the labelled samples (label != -1)."""
    y_true = np.asarray(y_true).astype(np.int64, copy=False).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64, copy=False).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} samples but y_pred has {y_pred.size}")
    if (y_true < -1).any():
        raise ValueError("labels must be >= 0, or -1 for unlabeled samples")
    keep = y_true >= 0
    return y_true[keep], y_pred[keep]


def _match(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """Hungarian match on already-filtered labels; see match_clusters."""
    if y_true.size == 0:
        return {}
    clusters, p = np.unique(y_pred, return_inverse=True)
    classes, t = np.unique(y_true, return_inverse=True)
    K, C = clusters.size, classes.size
    contingency = np.bincount(p * C + t, minlength=K * C).reshape(K, C)  # (K, C) sample counts
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    # A pair with zero overlap may be kept: it adds no correct sample, and its class's F1 is 0 either way.
    return {int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols)}


def match_clusters(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """Cluster id -> class label maximising the number of matched samples (Hungarian on the K x C counts).

    Only clusters and classes that occur among the labelled samples take part. When K != C only
    min(K, C) pairs exist; clusters missing from the dict are unmatched and their samples are errors.
    """
    return _match(*_as_labels(y_true, y_pred))


def _mapped(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Predicted class per labelled sample after matching; -1 (never a true label) for unmatched clusters."""
    mapping = _match(y_true, y_pred)
    if not mapping:
        return np.full_like(y_pred, -1)
    ids = np.fromiter(mapping.keys(), np.int64, len(mapping))
    cls = np.fromiter(mapping.values(), np.int64, len(mapping))
    order = np.argsort(ids)
    ids, cls = ids[order], cls[order]
    pos = np.clip(np.searchsorted(ids, y_pred), 0, ids.size - 1)
    return np.where(ids[pos] == y_pred, cls[pos], -1)


def _per_class(t: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(classes present, support, true positives (float), predicted count), each (C,), from labelled classes t and
    their matched predictions m (-1 for an unmatched cluster)."""
    classes, ti, support = np.unique(t, return_inverse=True, return_counts=True)
    tp = np.bincount(ti[m == t], minlength=classes.size).astype(np.float64)  # (C,)
    # Matched clusters map to present classes only, so every m >= 0 is found by searchsorted.
    predicted = np.bincount(np.searchsorted(classes, m[m >= 0]), minlength=classes.size)  # (C,)
    return classes, support, tp, predicted


def class_recall(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes present among the labelled samples, the recall of each after the Hungarian match), each (C,):
    what balanced ACC averages, class by class (djc/plots.py draws it against class size)."""
    t, p = _as_labels(y_true, y_pred)
    classes, support, tp, _ = _per_class(t, _mapped(t, p))
    return classes, tp / np.maximum(support, 1)


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of labelled samples whose matched cluster is their class (NaN with no labelled sample)."""
    y_true, y_pred = _as_labels(y_true, y_pred)
    if y_true.size == 0:
        return math.nan
    return float((_mapped(y_true, y_pred) == y_true).mean())


def cluster_health(y_pred: np.ndarray, num_clusters: int) -> dict[str, float]:
    """Label-free collapse indicators over all samples (logged every epoch too: collapse shows here first).

    ``size_entropy`` is normalised: the entropy of the cluster-size distribution divided by log K, so 1.0 means
    perfectly balanced clusters and 0.0 means everything in one cluster (defined as 1.0 when K == 1, where
    there is nothing to balance). Sizes and counts are ints.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    y_pred = np.asarray(y_pred).astype(np.int64, copy=False).ravel()
    if y_pred.size and (y_pred.min() < 0 or y_pred.max() >= num_clusters):
        raise ValueError(f"cluster ids must lie in [0, {num_clusters}), got [{y_pred.min()}, {y_pred.max()}]")
    return size_health(np.bincount(y_pred, minlength=num_clusters))


def size_health(sizes: np.ndarray) -> dict[str, float]:
    """`cluster_health` from the (K,) cluster sizes themselves: the training loop's replicated counts, which are
    soft (fractional) for some methods; min and max are then truncated to ints, the entropy is exact."""
    sizes = np.asarray(sizes, dtype=np.float64).ravel()
    num_clusters, n = sizes.size, sizes.sum()
    if num_clusters == 1:
        entropy = 1.0
    elif n == 0:
        entropy = 0.0
    else:
        q = sizes[sizes > 0] / n
        entropy = float(-(q * np.log(q)).sum() / math.log(num_clusters))
    return {
        "min_cluster_size": int(sizes.min()),
        "max_cluster_size": int(sizes.max()),
        "empty_clusters": int((sizes == 0).sum()),
        "size_entropy": entropy,
    }


def frequency_groups(
    class_counts: np.ndarray | None, y_true: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Head / medium / tail class labels.

    Classes are ranked by training frequency ``class_counts[c]`` descending, ties broken by the smaller label;
    with ``class_counts=None`` the frequencies are the label counts in ``y_true`` and only labels that occur
    take part. With C ranked classes the boundaries are round(0.3 C) and round(0.7 C) (Python's round, which
    rounds halves to even): C = 10 gives 3 / 4 / 3, C = 100 gives 30 / 40 / 30, C = 5 gives 2 / 2 / 1.
    """
    if class_counts is None:
        y = np.asarray(y_true, dtype=np.int64).ravel()
        counts = np.bincount(y[y >= 0]) if (y >= 0).any() else np.zeros(0, np.int64)
        classes = np.flatnonzero(counts)
    else:
        counts = np.asarray(class_counts).ravel()
        classes = np.arange(counts.size)
    # lexsort sorts by the last key first: count descending, then label ascending.
    ranked = classes[np.lexsort((classes, -counts[classes]))]
    C = ranked.size
    a, b = round(HEAD_FRACTION * C), round((1.0 - TAIL_FRACTION) * C)
    return ranked[:a], ranked[a:b], ranked[b:]


def _mean_or_nan(values: Iterable[float]) -> float:
    values = list(values)
    return float(np.mean(values)) if values else math.nan


def evaluate(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    num_clusters: int,
    class_counts: np.ndarray | None = None,
) -> dict[str, float]:
    """Every metric of docs/methods.md's "Evaluation" for one split: LABEL_KEYS (when any label is known) + HEALTH_KEYS.

    Per-class quantities (balanced ACC, macro-F1, head/medium/tail) average over the classes present in
    ``y_true``; a frequency group with no class present is NaN. ``class_counts`` are the *training* counts
    used to rank classes into head / medium / tail (see frequency_groups); None ranks by ``y_true``.
    """
    health = cluster_health(y_pred, num_clusters)
    t, p = _as_labels(y_true, y_pred)
    if t.size == 0:
        return dict(health)
    if class_counts is not None and t.max() >= np.asarray(class_counts).size:
        raise ValueError(f"label {t.max()} has no entry in class_counts (length {np.asarray(class_counts).size})")

    m = _mapped(t, p)
    classes, support, tp, predicted = _per_class(t, m)
    hits = m == t
    recall = tp / support
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (|predicted c| + |true c|); 0 when the class is never hit.
    f1 = 2.0 * tp / (predicted + support)
    recall_of = dict(zip(classes.tolist(), recall.tolist()))
    head, medium, tail = frequency_groups(class_counts, t)

    def group_acc(group: np.ndarray) -> float:
        return _mean_or_nan(recall_of[c] for c in group.tolist() if c in recall_of)

    out: dict[str, float] = {
        "acc": float(hits.mean()),
        "nmi": float(normalized_mutual_info_score(t, p)),
        "ari": float(adjusted_rand_score(t, p)),
        "balanced_acc": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "head_acc": group_acc(head),
        "medium_acc": group_acc(medium),
        "tail_acc": group_acc(tail),
    }
    out.update(health)
    return out


def format_table(
    rows: Mapping[str, Mapping[str, float]],
    keys: Iterable[str] = LABEL_KEYS + HEALTH_KEYS,
) -> str:
    """Plain-text table, one row per run (e.g. "secu", "kmeans-pixels"), one column per metric key.

    Floats get 3 decimals, ints print as ints, a key a row lacks prints as "-"; nested values are skipped.
    """
    keys = list(keys)

    def cell(v: object) -> str:
        if v is None or isinstance(v, Mapping):
            return "-"
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return str(int(v))
        return f"{float(v):.3f}"  # type: ignore[arg-type]

    header = ["", *keys]
    body = [[name, *(cell(row.get(k)) for k in keys)] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(r, widths)))
             for r in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)

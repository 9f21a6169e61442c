"""The 2-D map of a split's embeddings: a fixed random sample of at most `eval.map_samples` rows
(djc.evaluate.map_sample), projected by scikit-learn's t-SNE (or PCA), drawn coloured by cluster and, when the
split is labelled, by true class in a second panel: a person sees at a glance which clusters are compact, which
classes they split or merge, and where the tail classes went.

Features are brought to unit length first (the methods compare them by cosine). t-SNE of 2,000 points of
dimension 128 takes ~10 s on one core (2-core machine, `eval.map_samples` is its knob); PCA is instant and shows
less. The coordinates are stored in map.parquet, so `djc eval` re-draws the map without projecting again.
"""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from djc.metrics import match_clusters
from djc.runfiles import PLOT_DPI, write_png

PANEL = (6.5, 6.0)  # inches of one panel at PLOT_DPI
LABELLED_CLUSTERS = 30  # the largest clusters get their id written at their median point


def project(z: np.ndarray, how: str, seed: int) -> np.ndarray:
    """(n, 2) coordinates of the rows of z (n, D)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    z = np.asarray(z, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    n = len(z)
    if n < 3:
        return np.zeros((n, 2))
    if how == "pca" or n < 10:
        return PCA(n_components=2, random_state=seed).fit_transform(z)
    # perplexity ~ the neighbours each point keeps; it must stay below n / 3
    return TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3.0), init="pca", learning_rate="auto",
                random_state=seed).fit_transform(z)


def project_splits(samples: dict[str, tuple[np.ndarray, np.ndarray]], how: str, seed: int
                   ) -> dict[str, np.ndarray] | None:
    """map.parquet's columns (index, split, x, y) from each split's (index, features) sample; None if none."""
    parts = [(name, idx, project(z, how, seed)) for name, (idx, z) in samples.items() if len(idx)]
    if not parts:
        return None
    return {"index": np.concatenate([p[1] for p in parts]),
            "split": np.concatenate([np.full(len(p[1]), p[0], dtype=object) for p in parts]),
            "x": np.concatenate([p[2][:, 0] for p in parts]), "y": np.concatenate([p[2][:, 1] for p in parts])}


def palette(n: int) -> ListedColormap:
    """n distinguishable colours: tab10 / tab20, else hues spread around the circle in a shuffled order so that
    clusters of neighbouring ids do not look alike."""
    if n <= 10:
        return ListedColormap(colormaps["tab10"].colors[:max(n, 1)])
    if n <= 20:
        return ListedColormap(colormaps["tab20"].colors[:n])
    colours = colormaps["turbo"](np.linspace(0.05, 0.95, n))
    return ListedColormap(colours[np.random.default_rng(0).permutation(n)])


def _panel(ax, x: np.ndarray, y: np.ndarray, groups: np.ndarray, colour: dict[int, int], n_colours: int,
           title: str) -> None:
    """Points coloured by `colour[group]` out of n_colours, the largest groups' ids written at their median."""
    ids, inv, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    ax.scatter(x, y, c=[colour[int(g)] for g in ids[inv]], cmap=palette(n_colours), vmin=-0.5,
               vmax=n_colours - 0.5, s=float(np.clip(6000 / max(len(x), 1), 2, 30)), linewidths=0, alpha=0.85)
    for j in np.argsort(-sizes)[:LABELLED_CLUSTERS]:
        on = inv == j
        ax.annotate(str(ids[j]), (np.median(x[on]), np.median(y[on])), ha="center", va="center", fontsize=9,
                    weight="bold", bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7})
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_map(url: str, x: np.ndarray, y: np.ndarray, map_index: np.ndarray, index: np.ndarray,
             cluster: np.ndarray, label: np.ndarray, title: str = "") -> None:
    """The map's points (x, y at `map_index`) coloured by the cluster of the same index among the split's rows
    (`index`, `cluster`, `label`), and by true class beside it when any point is labelled."""
    pos = {int(i): r for r, i in enumerate(np.asarray(index).tolist())}
    rows = np.array([pos.get(int(i), -1) for i in np.asarray(map_index).tolist()], dtype=np.int64)
    keep = rows >= 0  # points whose row is gone (a re-evaluated split) are not drawn
    x, y, rows = np.asarray(x)[keep], np.asarray(y)[keep], rows[keep]
    c, t = np.asarray(cluster)[rows], np.asarray(label)[rows]
    labelled = bool((t >= 0).any())
    fig = Figure(figsize=(PANEL[0] * (2 if labelled else 1), PANEL[1]), dpi=PLOT_DPI, layout="constrained")
    axes = fig.subplots(1, 2 if labelled else 1, squeeze=False)[0]
    clusters = np.unique(c).tolist()
    if labelled:  # a cluster takes the colour of the class it is matched to, so both panels read alike
        classes = np.unique(t[t >= 0]).tolist()
        of_class = {k: classes.index(cl) for k, cl in match_clusters(t[t >= 0], c[t >= 0]).items() if cl in classes}
        extra = [k for k in clusters if k not in of_class]
        colour = of_class | {k: len(classes) + j for j, k in enumerate(extra)}
        n = len(classes) + len(extra)
        _panel(axes[1], x[t >= 0], y[t >= 0], t[t >= 0], {cl: j for j, cl in enumerate(classes)}, n,
               f"coloured by true class ({len(classes)})")
    else:
        colour, n = {k: j for j, k in enumerate(clusters)}, len(clusters)
    _panel(axes[0], x, y, c, colour, n, f"coloured by cluster ({len(clusters)} clusters on the map"
                                        f"{'; colours of their matched class' if labelled else ''})")
    fig.suptitle(f"{title} ({len(x)} points)", fontsize=11)
    write_png(url, fig)

"""The end of a run, and the score it is selected by: predict every split, run the k-means baselines, compute
the metrics, write the run dir's outputs; and every epoch, the label-free model-selection score.

Each worker predicts its own slice of every split and k-means runs on the sharded rows (djc.methods.kmeans),
so no worker holds another's features; only the small per-sample results are gathered for rank 0, which writes
assignments.parquet and computes metrics.json and the plots from the same table in memory. `djc eval`
recomputes metrics.json and the plots from a stored assignments.parquet with `write_outputs`. No Ray here.

The selection score (`selection_metrics`) is what `djc tune` ranks trials by. The default is label-free, so it
works on unlabelled data:

    score = R x (K_used / K)

- R = B / T is the share of the feature scatter that the clustering explains: T = sum_i |z_i - mean|^2 (total),
  W = sum_i |z_i - mu_c(i)|^2 (within the predicted clusters), B = T - W (between). R is the Calinski-Harabasz
  criterion brought to [0, 1]: CH = R / (1 - R) x (N - K_used) / (K_used - 1), also reported (`select_ch`).
  Unlike CH, R is comparable across trials whatever the number of used clusters, and unlike silhouette it needs
  no N x N distances: it comes from per-cluster sufficient statistics (count, sum z, sum |z|^2), one all-reduce.
- K_used / K is the cluster-health penalty: a trial that leaves clusters empty on the split loses that share.
  Collapse to one cluster gives R = 0; features that carry no variance (T ~ 0) give 0.

z are the method's `Prediction.features` on the non-augmented view of a split (`eval.select_split`, ideally a
held-out `val` entry of data.eval), and the clusters its evaluated head. R does not look at class sizes, so it
does not push long-tailed data towards equal clusters. What it cannot see: a clustering that is compact and
well separated but disagrees with the classes; that is what the labelled choices (`select_acc`,
`select_balanced_acc`, Hungarian-matched on the same split) are for when the split has labels.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from djc import dist, metrics, plots, runfiles
from djc.config import Config
from djc.data.shards import read_manifest
from djc.data.stream import ShardStream
from djc.methods.base import ClusteringMethod
from djc.methods.kmeans import assign, kmeans

EVAL_BATCH = 512
# Baseline assignment column -> key of its metrics inside each split's dict.
BASELINE_COLUMNS = {"kmeans_pixels": "baseline", "kmeans_features": "baseline_features"}
# djc tune --metric NAME -> the key the training loop reports; all are "higher is better".
METRICS = {"score": "select_score", "acc": "select_acc", "balanced_acc": "select_balanced_acc"}


# ---------------------------------------------------------------------------------------------------------
# Prediction over a split


def local_slice(url: str, on_corrupt: str = "error"):
    """This worker's batches of a dataset, every sample once, in a fixed order (evaluation, data passes); with
    on_corrupt="skip" an undecodable image is left out (and a batch may be empty)."""
    stream = ShardStream(url, batch_size=EVAL_BATCH, rank=dist.rank(), world_size=dist.world_size(), shuffle=False,
                         on_corrupt=on_corrupt)
    stream.set_epoch(0)
    return (batch for batch in stream if len(batch["index"]))


@torch.no_grad()
def map_split(url: str, fn, views, device, on_corrupt: str = "error") -> tuple[Tensor, Tensor]:
    """fn(eval view, index) over this worker's slice of a split -> (concatenated outputs, indices)."""
    outs, idx = [], []
    for batch in local_slice(url, on_corrupt):
        outs.append(fn(views.eval(batch["image"].to(device)), batch["index"].to(device)))
        idx.append(batch["index"])
    return torch.cat(outs), torch.cat(idx)


@torch.no_grad()
def predict_split(url: str, method: ClusteringMethod, views, device, on_corrupt: str = "error") -> dict[str, Tensor]:
    """This worker's slice of a split: index, label, clusters (n, H), confidence, features, ood, pixels."""
    parts: dict[str, list[Tensor]] = {}
    for batch in local_slice(url, on_corrupt):
        x = views.eval(batch["image"].to(device))
        p = method.predict(x)
        cols = {"index": batch["index"], "label": batch["label"], "clusters": p.clusters.cpu(),
                "confidence": p.confidence.float().cpu(), "features": p.features.float().cpu(),
                "pixels": x.flatten(1).float().cpu()}
        if p.ood is not None:
            cols["ood"] = p.ood.float().cpu()
        for k, v in cols.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------------------
# The end of a run


def evaluate_run(cfg: Config, method: ClusteringMethod, views, run_dir: str, device) -> dict[str, Any] | None:
    """Called by every worker at the end of training; rank 0 writes the outputs and returns metrics.json."""
    k, km = cfg.method.num_clusters, cfg.method.kmeans
    clock = _Phases()
    local = {name: predict_split(url, method, views, device, cfg.data.on_corrupt)
             for name, url in cfg.data.splits().items()}
    clock("predict")
    # Baselines fit on the train split's rows (sharded), then assign every split to the nearest center.
    extra_cols: dict[str, str] = {"kmeans_features": "features"}
    if cfg.eval.baseline:
        extra_cols["kmeans_pixels"] = "pixels"
    centers = {}
    for col, src in extra_cols.items():
        centers[col] = kmeans(local["train"][src], k, iters=km.iters, restarts=km.restarts, seed=cfg.seed).centers
        clock(col)
    parts: dict[str, list[np.ndarray]] = {}
    for name, cols in local.items():
        row = {c: cols[c] for c in ("index", "label", "clusters", "confidence") + (("ood",) if "ood" in cols else ())}
        for col, src in extra_cols.items():
            row[col] = assign(cols[src], centers[col])[0]
        for c, v in row.items():
            parts.setdefault(c, []).append(dist.all_gather_cat(v).numpy())
        parts.setdefault("split", []).append(np.full(len(parts["index"][-1]), name))
    clock("gather")
    if not dist.is_main():
        return None
    flat = {c: np.concatenate(v) for c, v in parts.items()}
    runfiles.write_assignments(
        f"{run_dir}/assignments.parquet", index=flat["index"], clusters=flat["clusters"],
        confidence=flat["confidence"], label=flat["label"], split=flat["split"], ood=flat.get("ood"),
        extra={c: flat[c] for c in extra_cols},
    )
    # The table as assignments.parquet holds it, without reading it back.
    table = {"index": flat["index"], "split": flat["split"], "label": flat["label"], "cluster": flat["clusters"][:, 0],
             **{c: flat[c] for c in extra_cols}}
    clock("export")
    result = write_outputs(run_dir, table, k, read_manifest(cfg.data.train).class_counts, cfg.eval.primary)
    clock("metrics and plots")
    print(f"[djc] evaluation: {clock}", flush=True)
    return result


class _Phases:
    """Wall seconds of the evaluation's phases, each call closing one: what an end of run at scale spends on."""

    def __init__(self) -> None:
        self.t, self.parts = time.perf_counter(), []

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.parts.append(f"{name} {now - self.t:.1f} s")
        self.t = now

    def __str__(self) -> str:
        return ", ".join(self.parts)


def write_outputs(run_dir: str, table: dict[str, np.ndarray], num_clusters: int, class_counts,
                  primary: str = "train") -> dict[str, Any]:
    """metrics.json (the primary split's metrics at the top, every split under `splits`) and the plots, from an
    assignments table (`evaluate_run`'s in memory, or `runfiles.read_assignments` of a run dir for djc eval)."""
    per_split = evaluate_table(table, num_clusters, class_counts)
    if primary not in per_split:
        primary = next(iter(per_split))
    result = {"split": primary, **per_split[primary], "splits": per_split}
    runfiles.write_json(f"{run_dir}/metrics.json", result)
    for name in per_split:
        sel = table["split"] == name
        y, c = table["label"][sel], table["cluster"][sel]
        plots.plot_cluster_sizes(f"{run_dir}/plots/cluster_sizes_{name}.png", c, y, num_clusters,
                                 class_counts=class_counts if name == "train" else None,
                                 title=f"{name}: cluster sizes against class sizes")
        if (y >= 0).any():
            plots.plot_class_recall(f"{run_dir}/plots/recall_{name}.png", y, c, class_counts,
                                    title=f"{name}: per-class recall against training class size")
            if len(np.unique(y[y >= 0])) <= plots.MAX_CONFUSION_CLASSES:  # unreadable beyond
                plots.plot_confusion(f"{run_dir}/plots/confusion_{name}.png", y, c, title=f"{name}: confusion")
    return result


def evaluate_table(
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
        m: dict[str, Any] = metrics.evaluate(labels[rows], np.asarray(table[column])[rows], num_clusters,
                                           class_counts)
        for col, key in BASELINE_COLUMNS.items():
            if col in table:
                m[key] = metrics.evaluate(labels[rows], np.asarray(table[col])[rows], num_clusters, class_counts)
        out[str(name)] = m
    return out


def metrics_table(result: dict[str, Any]) -> str:
    rows: dict[str, dict[str, float]] = {}
    for name, m in result["splits"].items():
        rows[f"{name} method"] = {k: v for k, v in m.items() if not isinstance(v, dict)}
        for base in ("baseline", "baseline_features"):
            if base in m:
                label = "kmeans-pixels" if base == "baseline" else "kmeans-features"
                rows[f"{name} {label}"] = m[base]
    return metrics.format_table(rows)


# ---------------------------------------------------------------------------------------------------------
# The selection score, every epoch


def variance_ratio(stats: torch.Tensor) -> tuple[float, float, int]:
    """(R, CH, K_used) from per-cluster sufficient statistics `stats` (K, D + 2): [count, sum |z|^2, sum z]."""
    s = stats.double()
    n_k, q_k, s_k = s[:, 0], s[:, 1], s[:, 2:]
    used = n_k > 0
    n, k_used = float(n_k.sum()), int(used.sum())
    total = float(q_k.sum() - s_k.sum(0).square().sum() / max(n, 1.0))  # T = sum |z|^2 - |sum z|^2 / N
    within = float((q_k[used] - s_k[used].square().sum(1) / n_k[used]).sum())  # W = sum_k (q_k - |s_k|^2 / n_k)
    if total <= 1e-12 * max(n, 1.0) or k_used < 2:
        return 0.0, 0.0, k_used
    r = min(1.0, max(0.0, 1.0 - within / total))
    ch = math.inf if r == 1.0 or n <= k_used else r / (1.0 - r) * (n - k_used) / (k_used - 1)
    return r, ch, k_used


def cluster_stats(features: Tensor, clusters: Tensor, num_clusters: int) -> Tensor:
    """(K, D + 2) float64 sufficient statistics [count, sum |z|^2, sum z] of features (n, D) per cluster (n,)."""
    z, c = features.float().flatten(1), clusters
    out = torch.zeros(num_clusters, z.shape[1] + 2, dtype=torch.float64, device=z.device)
    out[:, 0].index_add_(0, c, torch.ones_like(c, dtype=torch.float64))
    out[:, 1].index_add_(0, c, z.square().sum(1).double())
    out[:, 2:].index_add_(0, c, z.double())
    return out


@torch.no_grad()
def selection_metrics(method: ClusteringMethod, url: str, views, device, num_clusters: int,
                      on_corrupt: str = "error") -> dict[str, float]:
    """Every worker calls this with its own slice; all get the same numbers (reduced over workers)."""
    K = num_clusters
    stats, labels, clusters = None, [], []
    for batch in local_slice(url, on_corrupt):
        p = method.predict(views.eval(batch["image"].to(device)))
        c = p.clusters[:, 0]
        part = cluster_stats(p.features, c, K)
        stats = part if stats is None else stats + part
        labels.append(batch["label"])
        clusters.append(c.cpu())
    # A worker with an empty slice still joins the collectives (with zeros of the right shape).
    d = int(dist.all_reduce_max(torch.tensor([0 if stats is None else stats.shape[1]]))[0])
    local = stats.cpu() if stats is not None else torch.zeros(K, d, dtype=torch.float64)
    r, ch, k_used = variance_ratio(dist.all_reduce_sum(local))
    out = {"select_score": r * k_used / K, "select_r": r, "select_ch": ch, "select_clusters_used": k_used}

    y = dist.all_gather_cat(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)).numpy()
    c = dist.all_gather_cat(torch.cat(clusters) if clusters else torch.zeros(0, dtype=torch.long)).numpy()
    if (y >= 0).any():
        m = metrics.evaluate(y, c, K)
        out.update(select_acc=m["acc"], select_balanced_acc=m["balanced_acc"], select_nmi=m["nmi"])
    return out

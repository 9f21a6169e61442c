"""The end of a run: predict every split, run the k-means baselines, write assignments, metrics and plots.

Each worker predicts its own slice of every split and k-means runs on the sharded rows (djc.methods.kmeans),
so no worker holds another's features; only the small per-sample results are gathered for rank 0 to write.
`djc eval` recomputes metrics.json and the plots from assignments.parquet with `write_metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from djc import dist, export, metrics
from djc.config import Config
from djc.data.shards import read_manifest
from djc.data.stream import ShardStream
from djc.methods.base import ClusteringMethod
from djc.methods.kmeans import assign, kmeans

EVAL_BATCH = 512


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


def evaluate_run(cfg: Config, method: ClusteringMethod, views, run_dir: str, device) -> dict[str, Any] | None:
    """Called by every worker at the end of training; rank 0 writes the outputs and returns metrics.json."""
    splits = {"train": cfg.data.train, **cfg.data.eval}
    local = {name: predict_split(url, method, views, device, cfg.data.on_corrupt) for name, url in splits.items()}
    k = cfg.method.num_clusters
    km = cfg.method.kmeans
    # Baselines fit on the train split's rows (sharded), then assign every split to the nearest center.
    extra_cols: dict[str, str] = {"kmeans_features": "features"}
    if cfg.eval.baseline:
        extra_cols["kmeans_pixels"] = "pixels"
    centers = {col: kmeans(local["train"][src], k, iters=km.iters, restarts=km.restarts, seed=cfg.seed).centers
               for col, src in extra_cols.items()}
    table: dict[str, list[np.ndarray]] = {}
    for name, cols in local.items():
        row = {c: cols[c] for c in ("index", "label", "clusters", "confidence") + (("ood",) if "ood" in cols else ())}
        for col, src in extra_cols.items():
            row[col] = assign(cols[src], centers[col])[0]
        for c, v in row.items():
            table.setdefault(c, []).append(dist.all_gather_cat(v).numpy())
        table.setdefault("split", []).append(np.full(len(table["index"][-1]), name))
    if not dist.is_main():
        return None
    flat = {c: np.concatenate(v) for c, v in table.items()}
    export.write_assignments(
        f"{run_dir}/assignments.parquet", index=flat["index"], clusters=flat["clusters"],
        confidence=flat["confidence"], label=flat["label"], split=flat["split"], ood=flat.get("ood"),
        extra={c: flat[c] for c in extra_cols},
    )
    return write_metrics(run_dir, k, read_manifest(cfg.data.train).class_counts, cfg.eval.primary)


def write_metrics(run_dir: str, num_clusters: int, class_counts, primary: str = "train") -> dict[str, Any]:
    """metrics.json (the primary split's metrics at the top, every split under `splits`) and the plots."""
    table = export.read_assignments(f"{run_dir}/assignments.parquet")
    per_split = export.evaluate_assignments(table, num_clusters, class_counts)
    if primary not in per_split:
        primary = next(iter(per_split))
    result = {"split": primary, **per_split[primary], "splits": per_split}
    export.write_json(f"{run_dir}/metrics.json", result)
    for name in per_split:
        sel = table["split"] == name
        y, c = table["label"][sel], table["cluster"][sel]
        export.plot_cluster_sizes(f"{run_dir}/plots/cluster_sizes_{name}.png", c, y, num_clusters,
                                  class_counts=class_counts if name == "train" else None,
                                  title=f"{name}: cluster sizes against class sizes")
        if (y >= 0).any():
            export.plot_confusion(f"{run_dir}/plots/confusion_{name}.png", y, c, title=f"{name}: confusion")
    return result


def metrics_table(result: dict[str, Any]) -> str:
    rows: dict[str, dict[str, float]] = {}
    for name, m in result["splits"].items():
        rows[f"{name} method"] = {k: v for k, v in m.items() if not isinstance(v, dict)}
        for base in ("baseline", "baseline_features"):
            if base in m:
                label = "kmeans-pixels" if base == "baseline" else "kmeans-features"
                rows[f"{name} {label}"] = m[base]
    return metrics.format_table(rows)

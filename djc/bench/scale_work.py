"""Work outside a step for one cell of `djc bench scale` (djc/bench/scale_cells.py has the step): the per-epoch
work, StatDEC's one-time init, the evaluation's predictions over N, its k-means, metrics, plots and export.
Times are CPU seconds of this process (scale_cells.clock). The k-means costs are linear in the rows: they are
timed on SUBSAMPLE rows and scaled to N."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from djc import checkpoint, evaluate, metrics, plots, runfiles, selection
from djc.bench.scale_cells import EPOCHS, timed, clock, replayed
from djc.config import Config
from djc.methods.base import ClusteringMethod, EpochContext
from djc.methods.kmeans import assign, kmeans_pp, seeding_sample
from djc.optim import make_optimizer

SUBSAMPLE = 16384  # rows the k-means costs are measured on, then scaled to N (they are linear in the rows)



def measure_epoch(cfg: Config, method: ClusteringMethod, enc: Tensor, z: Tensor, c: Tensor) -> dict[str, float]:
    """Seconds of the per-epoch work: the epoch-start hook (SeCu's W_prev, P2OT's counters; StatDEC's init is
    statdec_init's), the health counts, the selection score's statistics over N (z, c: the method's features and
    clusters over N), and a checkpoint of the method and its optimiser (with its bytes)."""
    out: dict[str, float] = {}
    _, out["epoch_start_s"] = timed(lambda: method.on_epoch_start(EpochContext(0, EPOCHS, 1000, None)))
    _, out["health_s"] = timed(lambda: None if method.health_counts() is None else
                                metrics.size_health(method.health_counts().cpu().numpy()))
    k = cfg.method.num_clusters
    _, out["select_stats_s"] = timed(lambda: selection.variance_ratio(selection.cluster_stats(z, c, k)))
    opt = make_optimizer(cfg, method)
    with tempfile.TemporaryDirectory() as d:
        _, out["checkpoint_s"] = timed(lambda: checkpoint.save(d, {"method": method.state_dict(),
                                                                     "optimizer": opt.state_dict()}))
        out["checkpoint_bytes"] = float(sum(f.stat().st_size for f in Path(d).iterdir()))
    return out


def statdec_init(cfg: Config, method: ClusteringMethod, z: Tensor) -> dict[str, float]:
    """Seconds of StatDEC's one-time init on its features z over N: k-means at init_over x K (kmeans_cost, at the
    config's iterations and restarts, scaled to N), then each merge of the pieces to K, timed in full on the
    pieces of SUBSAMPLE rows (the merges see the pieces' statistics, not the rows)."""
    from djc.methods.agglomerate import merge_clusters
    from djc.methods.statdec import pooled_sums_hard

    k, over = cfg.method.num_clusters, method.c.init_over
    km = cfg.method.kmeans
    cost = kmeans_cost(z, over * k, km.iters, km.restarts)
    out = {"init_kmeans_s": cost["total_s"]}
    if math.isnan(cost["total_s"]):
        return out | {"init_merge_s": float("nan")}
    xs = z[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(4))[:SUBSAMPLE]].float()
    labels = assign(xs, cost["centers"])[0]
    pieces = pooled_sums_hard(xs, labels, over * k)
    out["init_merge_s"] = sum(timed(lambda c=c: merge_clusters(pieces, k, c))[1] for c in method.c.init_merges)
    return out


@torch.no_grad()
def predict_all(method: ClusteringMethod, feats: Tensor, block: int = evaluate.EVAL_BATCH
                ) -> tuple[float, Tensor, Tensor, Tensor]:
    """(seconds, features, clusters of column 0, confidence) of method.predict over N with the encoder replayed
    by the cached encoder outputs `feats`, in blocks of the evaluation's batch."""
    name = "encoder" if isinstance(getattr(method, "encoder", None), nn.Module) else "backbone"
    zs, cs, conf = [], [], []
    method.eval()
    t0 = clock()
    for part in feats.split(block):
        with replayed(method, {name: part}):
            p = method.predict(part)
        zs.append(p.features.float())
        cs.append(p.clusters[:, 0])
        conf.append(p.confidence)
    seconds = clock() - t0
    method.train()
    return seconds, torch.cat(zs), torch.cat(cs), torch.cat(conf)


def kmeans_cost(x: Tensor, k: int, iters: int, restarts: int) -> dict[str, Any]:
    """Seconds of the evaluation's k-means at K on x (N, d): k-means++ seeding on the 100,000-row sample and one
    Lloyd assignment over N, each timed on SUBSAMPLE rows and scaled (linear in rows), and the total at the
    config's restarts x (seeding + iters x iteration); and the seeded centers. NaN when K exceeds the rows."""
    n = x.shape[0]
    rows = min(n, SUBSAMPLE)
    if k > rows:
        return {"seed_s": float("nan"), "iter_s": float("nan"), "total_s": float("nan")}
    xs = x[torch.randperm(n, generator=torch.Generator().manual_seed(4))[:rows]].float()
    sample = seeding_sample(xs, torch.arange(rows), rows, 0)
    centers, seed_s = timed(lambda: kmeans_pp(sample, k, torch.Generator().manual_seed(0)))
    seed_s *= min(n, 100_000) / rows
    _, iter_s = timed(lambda: assign(xs, centers))
    iter_s *= n / rows
    return {"seed_s": seed_s, "iter_s": iter_s, "total_s": restarts * (seed_s + iters * iter_s), "centers": centers}


def measure_end(method_clusters: np.ndarray, labels: np.ndarray, class_counts: np.ndarray, k: int,
                confidence: np.ndarray) -> dict[str, float]:
    """Seconds of metrics (Hungarian at K x C, NMI, ARI, per-class; for the method and the two baselines, as a
    run computes them: timed once, times 3), plots, and the export of assignments.parquet, for N rows."""
    out: dict[str, float] = {}
    _, s = timed(lambda: metrics.evaluate(labels, method_clusters, k, class_counts))
    out["metrics_s"] = 3 * s
    n = len(labels)
    with tempfile.TemporaryDirectory() as d:
        _, out["plots_s"] = timed(lambda: (
            plots.plot_cluster_sizes(f"{d}/sizes.png", method_clusters, labels, k, class_counts=class_counts),
            plots.plot_class_recall(f"{d}/recall.png", labels, method_clusters, class_counts)))
        _, out["export_s"] = timed(lambda: runfiles.write_assignments(
            f"{d}/assignments.parquet", index=np.arange(n), clusters=method_clusters, confidence=confidence,
            label=labels, split="train", extra={"kmeans_pixels": method_clusters, "kmeans_features": method_clusters}))
    return out

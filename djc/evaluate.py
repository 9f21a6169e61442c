"""The end of a run: predict every split, run the baselines (k-means, knn-merge), compute the metrics, write the
run dir's outputs (assignments, metrics.json, plots, cluster galleries and the map of the embeddings).

Each worker predicts its own slice of every split and k-means runs on the sharded rows (djc.methods.kmeans),
so no worker holds another's features; only the small per-sample results (and the features of the map's
sample) are gathered for rank 0, which writes assignments.parquet and computes metrics.json and the pictures
from the same table in memory. `djc eval` recomputes metrics.json and the pictures from a stored
assignments.parquet with `write_outputs`; `djc predict` (djc/predict.py) predicts new data through the same
`predict_split`. The label-free selection score of every epoch is djc/selection.py's. No Ray here.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
from torch import Tensor

from djc import dist, embedmap, gallery, metrics, plots, runfiles
from djc.config import Config
from djc.features import FeatureViews
from djc.data.shards import read_manifest
from djc.data.stream import ShardStream
from djc.methods import knn_merge
from djc.methods.base import ClusteringMethod
from djc.methods.kmeans import assign, kmeans

EVAL_BATCH = 512
# Baseline assignment column -> key of its metrics inside each split's dict. kmeans_encoder: k-means on the
# backbone's own features, in runs that load model.weights (a frozen pretext encoder's: the baseline a method on it
# must reach). knn_merge: the learned features over-clustered and merged by their kNN graph
# (djc/methods/knn_merge.py), the label-free clustering that reads neighbourhoods rather than K centres.
MAP_FILE = "map.parquet"  # the 2-D coordinates of each split's map sample, for djc eval to re-draw
# The baselines fitted on the learned features (k-means' centers; knn-merge's pieces and their groups), so that
# `djc predict` labels new images with them too. Tensors only, read with weights_only as checkpoints are.
BASELINES_FILE = "baselines.pt"
MAP_NAMES = {"tsne": "t-SNE", "pca": "PCA", "none": ""}
BASELINE_COLUMNS = {"kmeans_pixels": "baseline", "kmeans_features": "baseline_features",
                    "kmeans_encoder": "baseline_encoder", "knn_merge": "baseline_knn_merge",
                    "knn_merge_pixels": "baseline_knn_merge_pixels"}


# ---------------------------------------------------------------------------------------------------------
# Prediction over a split


def local_slice(url: str, on_corrupt: str = "error", views=None):
    """This worker's batches of a dataset, every sample once, in a fixed order (evaluation, data passes); with
    on_corrupt="skip" an undecodable image is left out (and a batch may be empty). With cached features
    (djc/features.py) a batch's `image` is its rows of the feature table."""
    if isinstance(views, FeatureViews):
        return views.local_slice(url)
    stream = ShardStream(url, batch_size=EVAL_BATCH, rank=dist.rank(), world_size=dist.world_size(), shuffle=False,
                         on_corrupt=on_corrupt)
    stream.set_epoch(0)
    return (batch for batch in stream if len(batch["index"]))


@torch.no_grad()
def map_split(url: str, fn, views, device, on_corrupt: str = "error") -> tuple[Tensor, Tensor]:
    """fn(eval view, index) over this worker's slice of a split -> (concatenated outputs, indices)."""
    outs, idx = [], []
    for batch in local_slice(url, on_corrupt, views):
        outs.append(fn(views.eval(batch["image"].to(device)), batch["index"].to(device)))
        idx.append(batch["index"])
    return torch.cat(outs), torch.cat(idx)


@torch.no_grad()
def predict_split(url: str, method: ClusteringMethod, views, device, on_corrupt: str = "error",
                  pixels: bool = True, encoder: bool = False) -> dict[str, Tensor]:
    """This worker's slice of a split: index, label, clusters (n, H), confidence, features, ood, the eval view's
    pixels (for the pixel k-means baseline) when `pixels` (never on cached features: there are no pixels then),
    and with `encoder` the backbone's own features. The one prediction path: the end of a run, `djc predict` and
    the tests all come here."""
    parts: dict[str, list[Tensor]] = {}
    for batch in local_slice(url, on_corrupt, views):
        x = views.eval(batch["image"].to(device))
        p = method.predict(x)
        cols = {"index": batch["index"], "label": batch["label"], "clusters": p.clusters.cpu(),
                "confidence": p.confidence.float().cpu(), "features": p.features.float().cpu()}
        if pixels and not isinstance(views, FeatureViews):
            cols["pixels"] = x.flatten(1).float().cpu()
        if encoder:
            cols["encoder"] = method.encode(x).float().cpu()
        if p.ood is not None:
            cols["ood"] = p.ood.float().cpu()
        for k, v in cols.items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in parts.items()}


def gather_rows(local: dict[str, Tensor], split: str, extra: dict[str, Tensor] | None = None) -> dict[str, np.ndarray]:
    """A split's per-sample columns from every worker, concatenated (every rank joins; rank 0 uses them):
    index, label, clusters (n, H), confidence, ood when the method has it, the `extra` columns, split."""
    row = {c: local[c] for c in ("index", "label", "clusters", "confidence", "ood") if c in local} | (extra or {})
    out = {c: dist.all_gather_cat(v).numpy() for c, v in row.items()}
    out["split"] = np.full(len(out["index"]), split, dtype=object)
    return out


def map_sample(local: dict[str, Tensor], num_samples: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(index, features) of a fixed random sample of at most `rows` of a split of `num_samples`, gathered from
    every worker: the points of its 2-D map (djc/embedmap.py). The sample depends only on the seed."""
    chosen = torch.from_numpy(np.sort(np.random.default_rng(seed).permutation(num_samples)[:rows]))
    mask = torch.isin(local["index"], chosen)
    return dist.all_gather_cat(local["index"][mask]).numpy(), dist.all_gather_cat(local["features"][mask]).numpy()


def concat_rows(tables: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {c: np.concatenate([t[c] for t in tables]) for c in tables[0]}


def write_predictions(out: str, flat: dict[str, np.ndarray], extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """assignments.parquet from gathered rows; returns the table as it holds it, without reading it back."""
    runfiles.write_assignments(f"{out}/assignments.parquet", index=flat["index"], clusters=flat["clusters"],
                               confidence=flat["confidence"], label=flat["label"], split=flat["split"],
                               ood=flat.get("ood"), extra={c: flat[c] for c in extra})
    return {"index": flat["index"], "split": flat["split"], "label": flat["label"],
            "cluster": flat["clusters"][:, 0], "confidence": flat["confidence"], **{c: flat[c] for c in extra}}


# ---------------------------------------------------------------------------------------------------------
# The end of a run


def evaluate_run(cfg: Config, method: ClusteringMethod, views, run_dir: str, device) -> dict[str, Any] | None:
    """Called by every worker at the end of training; rank 0 writes the outputs and returns metrics.json."""
    k, km = cfg.method.num_clusters, cfg.method.kmeans
    clock = _Phases()
    encoder = bool(cfg.model.weights)
    splits = cfg.data.splits()
    local = {name: predict_split(url, method, views, device, cfg.data.on_corrupt, pixels=cfg.eval.baseline,
                                 encoder=encoder)
             for name, url in splits.items()}
    clock("predict")
    # Baselines fit on the train split's rows (sharded), then label every split: k-means by the nearest center,
    # knn-merge by the group of the nearest piece. column -> (the local column it reads, its labeller)
    extra_cols: dict[str, str] = {"kmeans_features": "features"}
    if cfg.eval.baseline and not isinstance(views, FeatureViews):
        extra_cols["kmeans_pixels"] = "pixels"
    if encoder:
        extra_cols["kmeans_encoder"] = "encoder"
    labellers: dict[str, tuple[str, Callable[[Tensor], Tensor]]] = {}
    fitted: dict[str, dict[str, Tensor]] = {}  # BASELINES_FILE: the ones on the features
    for col, src in extra_cols.items():
        c = kmeans(local["train"][src], k, iters=km.iters, restarts=km.restarts, seed=cfg.seed).centers
        labellers[col] = (src, lambda z, c=c: assign(z, c)[0])
        if src == "features":
            fitted[col] = {"centers": c.cpu()}
        clock(col)
    g = cfg.eval.knn_merge
    n_train = read_manifest(splits["train"]).num_samples
    if g.pieces and knn_merge.num_pieces(k, g.pieces, n_train) > k:  # else it is k-means again, at twice the cost
        # On the pixels too, where k-means runs on them: features that beat pixels must beat them under the same
        # clustering, not only under k-means.
        for col, src in (("knn_merge", "features"), ("knn_merge_pixels", "pixels")):
            if src == "features" or "kmeans_pixels" in extra_cols:
                merge = knn_merge.fit(local["train"][src], local["train"]["index"], k, pieces=g.pieces,
                                      neighbors=g.neighbors, rows=g.rows, iters=km.iters, restarts=km.restarts,
                                      seed=cfg.seed)
                labellers[col] = (src, merge.predict)
                if src == "features":
                    fitted[col] = {"centers": merge.centers.cpu(), "group": merge.group.cpu()}
                clock(col)
    rows = [gather_rows(cols, name, {col: fn(cols[src]) for col, (src, fn) in labellers.items()})
            for name, cols in local.items()]
    clock("gather")
    samples = ({name: map_sample(cols, read_manifest(splits[name]).num_samples, cfg.eval.map_samples, cfg.seed)
                for name, cols in local.items()} if cfg.eval.map != "none" else {})
    if not dist.is_main():
        return None
    table = write_predictions(run_dir, concat_rows(rows), tuple(labellers))
    buf = io.BytesIO()
    torch.save(fitted, buf)
    runfiles.write_bytes(f"{run_dir}/{BASELINES_FILE}", buf.getvalue())
    clock("export")
    coords = embedmap.project_splits(samples, cfg.eval.map, cfg.seed)
    if coords is not None:
        runfiles.write_map(f"{run_dir}/{MAP_FILE}", coords)
    result = write_outputs(run_dir, table, k, read_manifest(cfg.data.train).class_counts, cfg.eval.primary,
                           Pictures(splits, cfg.eval, coords))
    clock("metrics, plots, galleries and maps")
    print(f"[djc] evaluation: {clock}", flush=True)
    return result


def feature_baselines(run_dir: str, device) -> dict[str, Callable[[Tensor], Tensor]]:
    """column -> labeller of the baselines a run fitted on its learned features (BASELINES_FILE), for `djc
    predict`; empty for a run from before the file existed."""
    url = f"{run_dir}/{BASELINES_FILE}"
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return {}
    out: dict[str, Callable[[Tensor], Tensor]] = {}
    with fs.open(path, "rb") as f:  # tensors only: nothing in the file is built but tensors (weights_only)
        state = torch.load(io.BytesIO(f.read()), map_location=device, weights_only=True)
    for col, t in state.items():
        if "group" in t:
            out[col] = knn_merge.KnnMerge(t["centers"], t["group"]).predict
        else:
            out[col] = lambda z, c=t["centers"]: assign(z, c)[0]
    return out


class Pictures(NamedTuple):
    """What the galleries and maps of `write_outputs` are drawn from."""

    datasets: dict[str, str]  # split -> dataset URL, for the galleries' images
    settings: Any  # djc.config.EvalConfig: gallery pages and images, the map's projection
    coords: dict[str, np.ndarray] | None  # map.parquet's columns (index, split, x, y); None = no map


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
                  primary: str = "train", pictures: Pictures | None = None, metrics_json: bool = True
                  ) -> dict[str, Any]:
    """metrics.json (the primary split's metrics at the top, every split under `splits`), the plots, and with
    `pictures` the cluster galleries and the maps, from an assignments table (`evaluate_run`'s in memory, or
    `runfiles.read_assignments` of a run dir for djc eval)."""
    per_split = evaluate_table(table, num_clusters, class_counts)
    if primary not in per_split:
        primary = next(iter(per_split))
    result = {"split": primary, **per_split[primary], "splits": per_split}
    if metrics_json:
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
        if pictures is not None:
            _draw_pictures(run_dir, name, {k: v[sel] for k, v in table.items()}, pictures)
    return result


def _draw_pictures(run_dir: str, split: str, rows: dict[str, np.ndarray], pictures: Pictures) -> None:
    s = pictures.settings
    if split in pictures.datasets and s.gallery_pages > 0:
        gallery.write_gallery(f"{run_dir}/plots", split, read_manifest(pictures.datasets[split]), rows["index"],
                              rows["cluster"], rows["confidence"], rows["label"], pages=s.gallery_pages,
                              per_page=s.gallery_clusters, images=s.gallery_images)
    if pictures.coords is not None:
        on = pictures.coords["split"] == split
        if on.any():
            embedmap.plot_map(f"{run_dir}/plots/map_{split}.png", pictures.coords["x"][on], pictures.coords["y"][on],
                              pictures.coords["index"][on], rows["index"], rows["cluster"], rows["label"],
                              title=f"{split}: {MAP_NAMES[pictures.settings.map]} of the embeddings")


def evaluate_table(
    table: dict[str, np.ndarray],
    num_clusters: int,
    class_counts: np.ndarray | None = None,
    column: str = "cluster",
) -> dict[str, dict[str, Any]]:
    """split -> djc.metrics.evaluate of ``column`` against ``label`` on that split's rows.

    For each baseline column present (``kmeans_pixels``, ``kmeans_features``, ``knn_merge``, ...), each split's dict
    also holds the same metrics for that column under BASELINE_COLUMNS' key (``baseline``, ``baseline_features``,
    ``baseline_knn_merge``, ...). A table
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
        for base, label in (("baseline", "kmeans-pixels"), ("baseline_features", "kmeans-features"),
                            ("baseline_encoder", "kmeans-encoder"), ("baseline_knn_merge", "knn-merge"),
                            ("baseline_knn_merge_pixels", "knn-merge-pixels")):
            if base in m:
                rows[f"{name} {label}"] = m[base]
    return metrics.format_table(rows)

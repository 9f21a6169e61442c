"""A frozen backbone's features, computed once per run, and the views that hand them to the method.

When nothing of the backbone trains (model.freeze=all) and nothing augments its input (augment.policy=none, or a
method that takes the plain view: AE-CM), an image's features are the same at every step: the frozen backbone
runs in eval mode (djc/models/freeze.py), so they do not depend on the batch. They are computed once per split,
each worker encoding its own slice (the evaluation's order: every image once), then all-gathered so that every
worker holds the split's (N, D) table on its device; rank 0 stores it as features/<split>-<key>.pt in
data.cache_dir when that is set (shared by every run of the same data, backbone and weights), else in the run dir,
and a rerun or a resumed run reads it back. The key is a hash of what determines the features: the dataset's
manifest, the backbone, its weights (URL, size and date; the checkpoint of a run dir; the seed when random), the
input side, normalisation and dtype.

Training then decodes no image: the stream yields the dataset indices of its batches in exactly the order their
images would come (ShardStream(order=...)), and a step's two inputs are the table's rows of those indices
(ClusteringMethod.features_in), so a run on the cache steps exactly as a run that recomputes the features each
step (tests/test_features.py). The table is stored in the step's autocast dtype: bf16 on a GPU (N x D x 2 B:
ImageNet-LT's 115,846 x 768 x 2 B = 178 MB per worker for ViT-B/16), float32 on a CPU.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from djc import dist, runfiles
from djc.config import Config
from djc.data.shards import read_manifest
from djc.data.stream import ShardStream
from djc.methods.base import ClusteringMethod

BATCH = 512  # images per encoder pass while computing the table (the evaluation's batch)


def applies(cfg: Config, augmented: bool) -> bool:
    """Whether this run's backbone features are computed once: frozen, and its input not augmented
    (`augmented`: the method takes two augmented views, ClusteringMethod.augmented)."""
    plain = cfg.augment.policy == "none" or not augmented
    return cfg.model.freeze == "all" and cfg.model.cache_features and plain


class Table(NamedTuple):
    features: Tensor  # (N, D) on the device; row i holds the image of dataset index i
    labels: Tensor  # (N,) int64, by index
    order: np.ndarray  # (N,) the dataset index of each row in the order the shards hold them (the stream's)


# ---------------------------------------------------------------------------------------------------------
# Computing, storing and reading the tables


def _weights_id(cfg: Config) -> Any:
    """What identifies the weights: none (random: the seed), a run dir's latest checkpoint, a file's size and date."""
    w = cfg.model.weights
    if not w:
        return {"seed": cfg.seed}
    fs, path = fsspec.core.url_to_fs(w)
    if fs.isdir(path):
        with fs.open(f"{path}/train/checkpoint_manager_snapshot.json", "r") as f:
            return {"url": w, "checkpoint": json.load(f)["latest_checkpoint_result"]["checkpoint_dir_name"]}
    info = fs.info(path)
    return {"url": w, "size": info.get("size"), "date": str(info.get("mtime") or info.get("LastModified") or "")}


def cache_key(cfg: Config, manifest_json: str, side: int, mean, std, dtype: torch.dtype) -> str:
    m = cfg.model
    spec = {"data": hashlib.sha256(manifest_json.encode()).hexdigest(), "backbone": m.backbone, "width": m.width,
            "weights": _weights_id(cfg), "key": m.weights_key, "head": m.weights_head, "side": side,
            "mean": [round(float(v), 6) for v in mean], "std": [round(float(v), 6) for v in std], "dtype": str(dtype)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def encode_split(url: str, method: ClusteringMethod, views, device: torch.device, fixed_view: bool = False) -> Table:
    """Every image of a split through the frozen encoder, each worker its slice, gathered on every worker: its
    plain view, or with `fixed_view` the augmented view the selection score compares it with (ViewPair.by_index:
    drawn from the seed and the sample's index alone, so the same on any worker)."""
    stream = ShardStream(url, batch_size=BATCH, rank=dist.rank(), world_size=dist.world_size(), shuffle=False)
    num_samples = read_manifest(url).num_samples if fixed_view else 0  # by_index draws every sample's view at once
    stream.set_epoch(0)
    was_training = method.training
    method.eval()
    feats, index, labels = [], [], []
    for batch in stream:
        images = batch["image"].to(device)
        x = views.by_index(images, batch["index"], num_samples) if fixed_view else views.eval(images)
        feats.append(method.encode(x))
        index.append(batch["index"])
        labels.append(batch["label"])
    method.train(was_training)
    dtype = method.amp_dtype or torch.float32
    d = int(dist.all_reduce_max(torch.tensor([feats[0].shape[1] if feats else 0]))[0])  # a worker may have none
    local = torch.cat(feats).to(dtype) if feats else torch.zeros(0, d, dtype=dtype, device=device)
    # In rank order the slices concatenate to the shards' own order (unshuffled): the stream's row order.
    order = dist.all_gather_cat(torch.cat(index) if index else torch.zeros(0, dtype=torch.long))
    rows = dist.all_gather_cat(local)
    lab = dist.all_gather_cat(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long))
    features = torch.empty_like(rows)
    features[order.to(rows.device)] = rows  # by dataset index
    by_index = torch.empty_like(lab)
    by_index[order] = lab
    return Table(features, by_index, order.numpy())


def _read(url: str, key: str, device: torch.device) -> Table | None:
    try:
        with fsspec.open(url, "rb") as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    if state.get("key") != key:  # a file of another backbone, weights or dataset under the same name: recompute
        return None
    return Table(state["features"].to(device), state["labels"], state["order"].numpy())


def _write(url: str, key: str, t: Table) -> None:
    buf = io.BytesIO()
    torch.save({"key": key, "features": t.features.cpu(), "labels": t.labels, "order": torch.from_numpy(t.order)},
               buf)
    runfiles.write_bytes(url, buf.getvalue())


def _table(path: str, key: str, compute, device: torch.device, what: str, log) -> Table:
    """The table stored at `path` under `key`, read back, or computed by `compute()` and stored by rank 0."""
    table = _read(path, key, device)
    # Every worker must agree whether to compute: a file written between two workers' reads would not be read by
    # all of them. Rank 0's answer decides.
    found = int(dist.all_reduce_max(torch.tensor([int(table is not None) if dist.is_main() else 0]))[0])
    if found and table is None:
        table = _read(path, key, device)
    if not found:
        table = compute()
        if dist.is_main():
            _write(path, key, table)
            log(f"[djc] {what} ({tuple(table.features.shape)}, {table.features.dtype}) computed once and stored "
                f"at {path}")
    elif dist.is_main():
        log(f"[djc] {what} read from {path}")
    return table


def prepare(cfg: Config, method: ClusteringMethod, views, device: torch.device, run_dir: str,
            log=print) -> FeatureViews:
    """The feature tables of every split of the run, read back or computed, on every worker; and, when the run
    computes the selection score (eval.select_split), the features of that split's fixed augmented views."""
    where = f"{cfg.data.cache_dir.rstrip('/')}/features" if cfg.data.cache_dir else f"{run_dir}/features"
    dtype = method.amp_dtype or torch.float32
    tables, select_view = {}, None
    select_url = cfg.data.splits().get(cfg.eval.select_split)
    for name, url in cfg.data.splits().items():
        key = cache_key(cfg, read_manifest(url).to_json(), views.out, views.mean, views.std, dtype)
        tables[url] = _table(f"{where}/{name}-{key}.pt", key,
                             lambda: encode_split(url, method, views, device), device, f"features of {name}", log)
        if url == select_url:
            # The selection score's stability compares a sample's clusters on its plain view and on one augmented
            # view: without that view's own features the cached sample would be compared with itself (stability
            # 1, so select_score read K_used / K alone). One more encoder pass over the split, once per run.
            vkey = hashlib.sha256(json.dumps([key, cfg.seed, repr(views.specs[0])]).encode()).hexdigest()[:16]
            select_view = _table(f"{where}/{name}-view-{vkey}.pt", vkey,
                                 lambda: encode_split(url, method, views, device, fixed_view=True), device,
                                 f"features of {name}'s fixed augmented views (the selection score's)", log).features
    dist.barrier()
    return FeatureViews(tables, cfg.data.train, cfg.augment.neighbors, cfg.seed, select_view)


NEIGHBOR_BLOCK = 4096  # rows per block of the N x N similarities (4096 x N x 4 B: 1.9 GB at ImageNet-LT's N)


@torch.no_grad()
def nearest_neighbors(features: Tensor, k: int) -> Tensor:
    """(N, k) the k nearest other rows of each row by cosine similarity, most similar first, in blocks of rows
    (no N x N matrix). Every worker computes the same table from the same features."""
    f = F.normalize(features.float(), dim=1)
    out = []
    for s in range(0, f.shape[0], NEIGHBOR_BLOCK):
        sim = f[s : s + NEIGHBOR_BLOCK] @ f.T  # (b, N)
        rows = torch.arange(s, min(s + NEIGHBOR_BLOCK, f.shape[0]), device=f.device)
        sim[rows - s, rows] = -math.inf  # not itself
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def pick(index: Tensor, step: int, seed: int, k: int) -> Tensor:
    """Which of its k neighbours each sample's second view is at `step`: a hash of (seed, step, index), so it is
    the same whatever worker or batch position the sample has (the equivalence of 1 and 2 workers)."""
    prime = 4294967291  # the largest below 2^32: every product below stays inside int64
    salt = ((step * 40503 + seed * 9973 + 1) * 2246822519) % prime
    h = (index.long() * 2654435761 + salt) % prime
    return (h ^ (h >> 13)) % k


# ---------------------------------------------------------------------------------------------------------
# The views on cached features


class FeatureViews:
    """Stands where djc/data/augment.py's ViewPair stands when features are cached: a step's two inputs are the
    table's rows of its batch, and a split's evaluation batches come from its table (`local_slice`)."""

    def __init__(self, tables: dict[str, Table], train_url: str, neighbors: int = 0, seed: int = 0,
                 select_view: Tensor | None = None):
        self.tables, self.train, self.seed = tables, tables[train_url], seed
        self.select_view = select_view  # (N, D) by dataset index: the select split's fixed augmented views
        # augment.neighbors: each sample's nearest neighbours among the training rows, by dataset index
        self.neighbors = nearest_neighbors(self.train.features, neighbors) if neighbors else None

    def order(self) -> np.ndarray:
        """The training set's dataset index of each row, in the shards' order: what the stream maps rows with."""
        return self.train.order

    def for_batch(self, method: ClusteringMethod, batch: dict[str, Any], device: torch.device, step: int,
                  rank: int) -> tuple[Tensor, Tensor]:
        index = batch["index"].to(device, non_blocking=True)
        x = self.train.features[index].float()  # (B, D)
        if self.neighbors is None:
            return x, x
        nbr = self.neighbors[index, pick(index, step, self.seed, self.neighbors.shape[1])]
        return x, self.train.features[nbr].float()

    def eval(self, x: Tensor) -> Tensor:
        return x  # batches from `local_slice` already hold the features

    def by_index(self, x: Tensor, index: Tensor, num_samples: int) -> Tensor:
        """The selection score's per-sample view (djc/selection.py) of the select split's rows `x`: the features of
        their fixed augmented views, encoded once by `prepare`."""
        if self.select_view is None or self.select_view.shape[0] != num_samples:
            raise RuntimeError("the selection score's views were not computed for this split: features.prepare "
                               "computes them for eval.select_split only")
        return self.select_view[index.to(self.select_view.device)].float()

    def local_slice(self, url: str) -> Iterator[dict[str, Tensor]]:
        """This worker's rows of a split in batches: {index, label, image: (b, D) features}."""
        t = self.tables[url]
        n, w, r = t.features.shape[0], dist.world_size(), dist.rank()
        base, extra = divmod(n, w)  # the stream's rule: the first n % w workers take one more
        lo = r * base + min(r, extra)
        hi = lo + base + (r < extra)
        for s in range(lo, hi, BATCH):
            idx = torch.arange(s, min(s + BATCH, hi))
            yield {"index": idx, "label": t.labels[idx], "image": t.features[idx.to(t.features.device)].float()}

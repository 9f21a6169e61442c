"""A pair's probe: a finished pair run (a method on a frozen pretext, its features computed once) trained again in
one process from its own cached features, with settings changed, in 15-50 s on one core instead of a Ray run's
1-2 minutes. By the equivalence tests a 1-process step on the concatenated batch is the W-worker step, so with the
stream's own batches for the bench's 2 workers (the default) a probe is the bench's run again: SeCu's seed-0 pair
reads 0.4054 here and 0.4064 through Ray (float rounding of the collectives apart). Each sample's second view is
drawn from its 20 nearest neighbours by djc's own rule (djc.features.nearest_neighbors and pick).

A batch order alone moves some pairs by more than the settings being compared (SeCu: sd 0.04 over orders on one
pretext, docs/pretrained.md), so compare settings over several orders: `--window` and `--workers` change only
the order (the stream's shuffle window, the ranks whose slices make a global batch).

usage: python benchmarks/pair_probe.py RUN_DIR [key=value ...] [--threads T] [--workers W] [--window U]
       [--order stream|perm] [--identity-proj] [--merge COL,K] [--no-train]
  RUN_DIR          a pair run dir of `djc bench quality --pretext ...` (config.yaml and features/train-*.pt)
  key=value        overrides of the run's config, read as `djc train` reads them (method.p2ot.eps=0.1)
  --workers W      the global batch is W ranks' stream batches concatenated, as W workers step (default 2)
  --window U       the stream's shuffle window in row groups (default the run's data.window)
  --order perm     batches from a permutation of this script's own generator (seeded by the run's seed), not
                   the stream: the order of the numbers docs/pretrained.md printed before 2026-12-05 (session 45)
  --identity-proj  the method's projection head replaced by the identity (SeCu: the centres on the features
                   themselves); needs model.proj_dim equal to the features' width
  --merge COL,K    also merge the clusters of prediction column COL to K groups by average linkage of their
                   members' 20-NN edges in the cached features (djc.methods.knn_merge)
  --no-train       score the run as it finished (its final checkpoint) instead of training it again
Prints one JSON line: own = the method's clusters (balanced ACC, tail, size entropy), km = k-means on the cached
features (the pair's bar), merged = the --merge partition.
"""

import argparse, glob, json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from djc.config import from_dict, load_tree
from djc.data.shards import read_manifest
from djc.data.stream import ShardStream
from djc.features import nearest_neighbors, pick
from djc.methods.base import EpochContext
from djc.methods.kmeans import assign, kmeans
from djc.methods.knn_merge import merge_by_edges, piece_edges
from djc.metrics import evaluate
from djc.optim import apply_lr, lr_factor, make_optimizer
from djc.predict import load_run
from djc.step import build_method, train_step
from djc.train import data_info

NEIGHBORS = 20  # the bench's --pair-neighbors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--order", choices=("stream", "perm"), default="stream")
    ap.add_argument("--identity-proj", action="store_true")
    ap.add_argument("--merge", default="")
    ap.add_argument("--no-train", action="store_true")
    a = ap.parse_args()
    if a.workers < 1 or a.window < 0:
        ap.error("--workers needs at least 1 and --window at least 1 (0: the run's)")
    if a.no_train and (a.overrides or a.identity_proj):
        ap.error("--no-train scores the run as it finished: overrides and --identity-proj need a run trained again")
    torch.set_num_threads(a.threads)
    # The CLI's own reading of `config.yaml key=value ...`: each override sets its one key (until 2026-12-05 this
    # script merged them as a nested mapping, which replaced the whole section an override named)
    cfg = from_dict(load_tree(f"{a.run_dir}/config.yaml", [*a.overrides, "trainer.num_workers=1"]))
    table = torch.load(glob.glob(f"{a.run_dir}/features/train-*.pt")[0], weights_only=True)
    x, y = table["features"].float(), table["labels"].numpy()
    n, k = len(x), cfg.method.num_clusters
    xn = F.normalize(x, dim=1)
    if a.no_train:
        method = load_run(a.run_dir, torch.device("cpu")).method
    else:
        batches = perm_batches(cfg, n) if a.order == "perm" else stream_batches(cfg, table["order"], a.workers,
                                                                                    a.window or cfg.data.window)
        method = train(cfg, x, batches, a.identity_proj)
    method.features_in = True
    with torch.no_grad():
        clusters = method.predict(x).clusters

    def scores(labels, groups=k):
        e = evaluate(y, labels.numpy(), groups)
        return {key: round(e[key], 4) for key in ("balanced_acc", "tail_acc", "size_entropy")}

    km = kmeans(xn, k, iters=cfg.method.kmeans.iters, restarts=cfg.method.kmeans.restarts, seed=cfg.seed)
    order = f"stream, {a.workers} workers, window {a.window or cfg.data.window}" if a.order == "stream" else "perm"
    out = {"overrides": a.overrides, "seed": cfg.seed, "order": "as run" if a.no_train else order,
           "own": scores(clusters[:, 0], int(clusters[:, 0].max()) + 1), "km": scores(assign(xn, km.centers)[0])}
    if a.merge:
        col, to = (int(v) for v in a.merge.split(","))
        pieces = clusters[:, col]
        edges, sizes = piece_edges(xn, torch.arange(n), pieces, int(pieces.max()) + 1, neighbors=NEIGHBORS)
        out["merged"] = scores(merge_by_edges(edges, sizes, to)[pieces], to)
    print(json.dumps(out), flush=True)


def stream_batches(cfg, order, workers: int, window: int):
    """epoch -> the global batches (dataset indices) of the run's stream for `workers` ranks, as djc/train.py
    steps them: rank r's batch j of its slice, concatenated over ranks, full batches only."""
    man = read_manifest(cfg.data.train)
    streams = [ShardStream(man, batch_size=cfg.data.batch_size // workers, rank=r, world_size=workers,
                           seed=cfg.seed, window=window, order=np.asarray(order)) for r in range(workers)]
    steps = streams[0].full_batches_all_ranks()

    def epoch_batches(epoch: int):
        for st in streams:
            st.set_epoch(epoch)
        ranks = [iter(st) for st in streams]
        return [torch.cat([next(it)["index"] for it in ranks]) for _ in range(steps)]
    return steps, epoch_batches


def perm_batches(cfg, n: int):
    """epoch -> batches from one permutation per epoch of a generator seeded by the run's seed (--order perm)."""
    g, batch = torch.Generator().manual_seed(cfg.seed), cfg.data.batch_size
    steps = n // batch

    def epoch_batches(epoch: int):  # called once per epoch, in order: the generator carries on
        order = torch.randperm(n, generator=g)
        return [order[b * batch:(b + 1) * batch] for b in range(steps)]
    return steps, epoch_batches


def train(cfg, x: torch.Tensor, batches, identity_proj: bool):
    """The run's method trained again from step 0 on the cached features x (N, D), indexed by dataset index, on
    `batches` = (steps per epoch, epoch -> that epoch's global batches)."""
    n = len(x)
    method = build_method(cfg, data_info(read_manifest(cfg.data.train)))  # the encoder loads the pretext's weights
    method.features_in = True
    if identity_proj:
        method.proj = nn.Identity()
    opt = make_optimizer(cfg, method)
    near = nearest_neighbors(x, NEIGHBORS)
    per_epoch, epoch_batches = batches
    step = 0

    def map_train(fn):
        method.eval()
        try:
            with torch.no_grad():
                return fn(x, torch.arange(n)), torch.arange(n)
        finally:
            method.train()

    for epoch in range(cfg.optim.epochs):
        method.on_epoch_start(EpochContext(epoch, cfg.optim.epochs, per_epoch, map_train))
        method.train()
        for idx in epoch_batches(epoch):
            other = near[idx, pick(idx, step, cfg.seed, NEIGHBORS)]  # the bench's rule: (seed, step, index)
            apply_lr(opt, lr_factor(cfg, step, per_epoch))
            train_step(method, method, opt, idx, x[idx], x[other])
            step += 1
    method.on_train_end()
    method.eval()
    return method


if __name__ == "__main__":
    main()

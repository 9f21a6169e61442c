"""A pair's probe: a finished pair run (a method on a frozen pretext, its features computed once) trained again in
one process from its own cached features, with settings changed, in 20-50 s on one core instead of a Ray run's
1-2 minutes. By the equivalence tests a 1-process run is the 2-worker run's algorithm, and each sample's second
view is drawn from its 20 nearest neighbours by djc's own rule (djc.features.nearest_neighbors and pick); only
the batches' order comes from this script's generator (seeded by the run's seed), so a probe differs from the
bench's run by seed noise, not by method. What docs/pretrained.md's "Five pretexts" section reports from
`benchmarks/pair_probe.py` was printed by this script.

usage: python benchmarks/pair_probe.py RUN_DIR [key=value ...] [--threads T] [--identity-proj] [--merge COL,K]
       [--no-train]
  RUN_DIR          a pair run dir of `djc bench quality --pretext ...` (config.yaml and features/train-*.pt)
  key=value        overrides of the run's config (method.p2ot.eps=0.1)
  --identity-proj  the method's projection head replaced by the identity (SeCu: the centres on the features
                   themselves); needs model.proj_dim equal to the features' width
  --merge COL,K    also merge the clusters of prediction column COL to K groups by average linkage of their
                   members' 20-NN edges in the cached features (djc.methods.knn_merge)
  --no-train       score the run as it finished (its final checkpoint) instead of training it again
Prints one JSON line: own = the method's clusters (balanced ACC, tail, size entropy), km = k-means on the cached
features (the pair's bar), merged = the --merge partition.
"""

import argparse, glob, json

import torch
import torch.nn.functional as F
from torch import nn

from djc.config import from_dict, load_tree
from djc.data.shards import read_manifest
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
    ap.add_argument("--identity-proj", action="store_true")
    ap.add_argument("--merge", default="")
    ap.add_argument("--no-train", action="store_true")
    a = ap.parse_args()
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
    method = load_run(a.run_dir, torch.device("cpu")).method if a.no_train else train(cfg, x, a.identity_proj)
    method.features_in = True
    with torch.no_grad():
        clusters = method.predict(x).clusters

    def scores(labels, groups=k):
        e = evaluate(y, labels.numpy(), groups)
        return {key: round(e[key], 4) for key in ("balanced_acc", "tail_acc", "size_entropy")}

    km = kmeans(xn, k, iters=cfg.method.kmeans.iters, restarts=cfg.method.kmeans.restarts, seed=cfg.seed)
    out = {"overrides": a.overrides, "seed": cfg.seed, "own": scores(clusters[:, 0], int(clusters[:, 0].max()) + 1),
           "km": scores(assign(xn, km.centers)[0])}
    if a.merge:
        col, to = (int(v) for v in a.merge.split(","))
        pieces = clusters[:, col]
        edges, sizes = piece_edges(xn, torch.arange(n), pieces, int(pieces.max()) + 1, neighbors=NEIGHBORS)
        out["merged"] = scores(merge_by_edges(edges, sizes, to)[pieces], to)
    print(json.dumps(out), flush=True)


def train(cfg, x: torch.Tensor, identity_proj: bool):
    """The run's method trained again from step 0 on the cached features x (N, D), indexed by dataset index."""
    n = len(x)
    method = build_method(cfg, data_info(read_manifest(cfg.data.train)))  # the encoder loads the pretext's weights
    method.features_in = True
    if identity_proj:
        method.proj = nn.Identity()
    opt = make_optimizer(cfg, method)
    near = nearest_neighbors(x, NEIGHBORS)
    g = torch.Generator().manual_seed(cfg.seed)
    batch, per_epoch, step = cfg.data.batch_size, n // cfg.data.batch_size, 0

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
        order = torch.randperm(n, generator=g)
        for b in range(per_epoch):
            idx = order[b * batch:(b + 1) * batch]
            other = near[idx, pick(idx, step, cfg.seed, NEIGHBORS)]  # the bench's rule: (seed, step, index)
            apply_lr(opt, lr_factor(cfg, step, per_epoch))
            train_step(method, method, opt, idx, x[idx], x[other])
            step += 1
    method.on_train_end()
    method.eval()
    return method


if __name__ == "__main__":
    main()

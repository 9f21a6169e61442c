"""A pair's probe: a finished pair run (a method on a frozen pretext, its features computed once) trained again in
one process from its own cached features, with settings changed, in about 20 s on one core instead of a Ray run's
1-2 minutes. By the equivalence tests a 1-process run is the 2-worker run's algorithm; the batches and the
neighbour drawn as each sample's second view come from this script's own generator (seeded by the run's seed), so a
probe differs from the bench's run by seed noise, not by method (the job's values read 0.391 ± 0.015 here for
P2OT against the bench's 0.380 ± 0.013 on the same five pretexts). What docs/pretrained.md's "Five pretexts"
section reports as "an in-process probe script" was printed by this script.

usage: python benchmarks/pair_probe.py RUN_DIR [key=value ...] [--threads T] [--identity-proj] [--merge COL,K]
  RUN_DIR          a pair run dir of `djc bench quality --pretext ...` (config.yaml and features/train-*.pt)
  key=value        overrides of the run's config (method.p2ot.eps=0.1)
  --identity-proj  the method's projection head replaced by the identity (SeCu: the centres on the features
                   themselves); needs model.proj_dim equal to the features' width
  --merge COL,K    also merge the clusters of prediction column COL to K groups by average linkage of their
                   members' 20-NN edges in the cached features (djc.methods.knn_merge)
Prints one JSON line: own = the method's clusters (balanced ACC, tail, size entropy), km = k-means on the cached
features (the pair's bar), merged = the --merge partition.
"""

import argparse, glob, json

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from djc.config import from_dict, parse_overrides, with_values
from djc.data.shards import read_manifest
from djc.methods.base import EpochContext
from djc.methods.kmeans import assign, kmeans
from djc.methods.knn_merge import merge_by_edges, piece_edges
from djc.metrics import evaluate
from djc.optim import apply_lr, lr_factor, make_optimizer
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tree = yaml.safe_load(open(f"{a.run_dir}/config.yaml"))
    tree["trainer"]["num_workers"] = 1
    cfg = from_dict(with_values(tree, parse_overrides(a.overrides)))
    table = torch.load(glob.glob(f"{a.run_dir}/features/train-*.pt")[0], weights_only=True)
    x, y = table["features"].float(), table["labels"].numpy()
    n, k = len(x), cfg.method.num_clusters
    method = build_method(cfg, data_info(read_manifest(cfg.data.train)))  # the encoder loads the pretext's weights
    method.features_in = True
    if a.identity_proj:
        method.proj = nn.Identity()
    opt = make_optimizer(cfg, method)
    xn = F.normalize(x, dim=1)
    near = torch.cat([(blk @ xn.T).scatter_(1, torch.arange(i, i + len(blk))[:, None], -2.0).topk(NEIGHBORS, 1).indices
                      for i, blk in zip(range(0, n, 4096), xn.split(4096))])
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
            other = near[idx, torch.randint(0, NEIGHBORS, (len(idx),), generator=g)]
            apply_lr(opt, lr_factor(cfg, step, per_epoch))
            train_step(method, method, opt, idx, x[idx], x[other])
            step += 1
    method.on_train_end()
    method.eval()
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


if __name__ == "__main__":
    main()

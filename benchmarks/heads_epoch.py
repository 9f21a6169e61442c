"""Seconds per epoch of a method's heads on cached frozen features (djc/features.py), without the data or the
backbone: the run's training steps on a random (N, D) feature table, as a run with model.freeze=all and
augment.policy=none takes them (ClusteringMethod.features_in).

    python benchmarks/heads_epoch.py jobs/imagenet_lt_p2ot_dino_frozen.yaml --device cuda --n 115846 --dim 768

prints the step time (median of the timed steps after --warmup untimed ones) and steps x step time per epoch.
Random features are not DINO's: P2OT's Sinkhorn iterations per solve depend on the logits, so the plan's share
of the step is indicative. A single process: trainer.num_workers is ignored.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from djc.config import load_config
from djc.methods.base import DataInfo, EpochContext
from djc.optim import apply_lr, lr_factor, make_optimizer
from djc.step import build_method, to_device, train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=115_846, help="images (ImageNet-LT's train split)")
    ap.add_argument("--dim", type=int, default=768, help="feature dimension (ViT-B/16's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["trainer.num_workers=1", "model.weights=", *args.overrides])
    device = torch.device(args.device)
    # The backbone is built (random weights) only for its feature size; the steps never run it.
    method = to_device(build_method(cfg, DataInfo(args.n, (224, 224, 3), 0, (0.5,) * 3, (0.25,) * 3)), cfg, device)
    method.features_in = True
    opt = make_optimizer(cfg, method)
    dtype = method.amp_dtype or torch.float32
    table = torch.randn(args.n, args.dim, device=device).to(dtype)  # as the cache stores it
    b = cfg.data.batch_size
    steps_per_epoch = args.n // b
    method.on_epoch_start(EpochContext(1, cfg.optim.epochs, steps_per_epoch, lambda fn: None))
    method.train()
    g = torch.Generator().manual_seed(0)
    times, logs = [], []
    for step in range(args.warmup + args.steps):
        index = torch.randint(0, args.n, (b,), generator=g)
        x = table[index.to(device)].float()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        apply_lr(opt, lr_factor(cfg, step, steps_per_epoch))
        out = train_step(method, method, opt, index.to(device), x, x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t)
            logs.append({k: float(v) for k, v in out.logs.items()})
    s = statistics.median(times)
    print(f"{cfg.method.name} heads on cached features: N={args.n:,} D={args.dim} K={cfg.method.num_clusters} "
          f"batch={b} on {device}: {s * 1e3:.1f} ms per step (median of {args.steps}), {steps_per_epoch} steps "
          f"= {s * steps_per_epoch:.1f} s per epoch")
    if "sinkhorn_iters" in logs[0]:  # P2OT: the plan's iterations per solve, which the step time scales with
        print(f"sinkhorn iterations per solve: {statistics.mean(r['sinkhorn_iters'] for r in logs):.0f} (mean)")


if __name__ == "__main__":
    main()

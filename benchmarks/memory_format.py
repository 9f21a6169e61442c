"""Contiguous (NCHW) against channels-last (NHWC) conv weights on this machine: djc's whole training step (the
batched views and step.train_step of the job's method, placed by step.to_device) for each job, the two formats side
by side in one process, rounds alternating which goes first; the ratio is the median of the per-round ratios.
What `trainer.memory_format: auto` chose on a CPU was measured here (docs/performance.md).

usage: python benchmarks/memory_format.py [JOB ...] [--rounds R] [--steps S] [--threads T]
Each line printed is JSON: the job, its backbone, the batch, img/s of each format and their ratio (nhwc_over_nchw > 1: NHWC is faster).
"""

import argparse
import json

import torch

from djc.bench.timing import interleaved
from djc.config import load_config
from djc.data.augment import ViewPair
from djc.methods.base import DataInfo, EpochContext
from djc.optim import make_optimizer
from djc.step import build_method, to_device, train_step

ap = argparse.ArgumentParser()
ap.add_argument("jobs", nargs="*", default=["jobs/digits_lt.yaml", "jobs/shapes_lt_simclr.yaml",
                                             "jobs/shapes_lt.yaml"])
ap.add_argument("--rounds", type=int, default=6)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
cpu = torch.device("cpu")
IMAGES = {"digits": (1, 8), "shapes": (3, 32)}  # data.source -> (channels, side) of its stored images

for job in a.jobs:
    base = load_config(job, [])
    if base.data.source not in IMAGES:
        raise SystemExit(f"{job}: data.source {base.data.source!r}; this benchmark knows {sorted(IMAGES)}")
    channels, side = IMAGES[base.data.source]
    batch = base.data.batch_size // base.trainer.num_workers  # one worker's share of the global batch
    info = DataInfo(4096, (side, side, channels), base.method.num_clusters)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, channels, side, side), generator=g, dtype=torch.uint8)
    index = torch.arange(batch)
    loops = {}
    for who, fmt in (("djc", "channels_last"), ("nchw", "contiguous")):  # "djc" = the ratio's denominator
        cfg = load_config(job, [f"trainer.memory_format={fmt}"])
        method = to_device(build_method(cfg, info), cfg, cpu)
        method.on_epoch_start(EpochContext(0, cfg.optim.epochs, 4096 // batch, map_train=None))
        opt = make_optimizer(cfg, method)
        views = ViewPair(cfg, [0.5] * channels, [0.25] * channels, side)

        def step(s: int, method=method, opt=opt, views=views) -> None:
            train_step(method, method, opt, index, *views.for_method(method, images, s, 0))
        loops[who] = step
    r = interleaved(loops, batch, a.steps, a.rounds, 2, cpu, job)
    print(json.dumps({"job": job, "backbone": base.model.backbone, "batch": batch, "threads": a.threads,
                      "nhwc_img_s": round(r["djc"], 1), "nchw_img_s": round(r["nchw"], 1),
                      "nhwc_over_nchw": round(r["ratio"], 3)}), flush=True)

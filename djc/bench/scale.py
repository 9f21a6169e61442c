"""`djc bench scale`: every method and the k-means baseline at ImageNet-LT's N and K in {10, 100, 1000, 10000},
side by side, on the data set `djc prepare imagenet-lt-synthetic` writes (docs/scale.md).

One process, one thread (a training worker's share of this machine), the fixed small encoder (smallconv, 32 ->
64 channels) and a global batch of 256 (local = global: what one of W workers computes for its gathered terms,
and an upper bound for its local ones). Per cell (djc/bench/scale_cells.py):
  step        encoder (forward + backward + its optimiser) and cluster side (everything else: heads, assignment,
              losses and their backward, state update, collectives' helpers), timed directly; their ratio; the
              full step as a check; bytes each worker puts into collectives
  state       bytes of replicated state per worker (parameters, per-instance buffers, other buffers, optimiser)
              and the peak resident memory of the process during the cell
  per epoch   the epoch-start work (StatDEC's init: k-means at 3K and its merges), health counts, the selection
              score's statistics over N, a checkpoint
  end of run  the method's heads over N (the encoder's pass over N is shared and reported once), k-means on
              its features, metrics (Hungarian at K x 1000), plots, the export of assignments.parquet
  GPU         at K = --gpu-k: what the cluster side asks of a device at the ImageNet job's global batch (1024),
              counted op by op (djc/bench/census.py), against a ResNet-50 step on one H100 / H200; --gpu-only: this
              table alone
k-means on pixels (the baseline) has a row of its own per K.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from djc.bench import scale_cells as C
from djc.bench import scale_work as W
from djc.bench.timing import device_name
from djc.config import ConfigError
from djc.data.augment import ViewPair
from djc.data.prepare import dataset_exists
from djc.data.shards import read_manifest
from djc.data.stream import ShardStream
from djc.methods import REGISTRY
from djc.methods.base import DataInfo
from djc.models.backbones import build_backbone

DATA = "runs/data/imagenet_lt_synthetic/train"
IMAGENET_BATCH, IMAGENET_GPUS = 1024, 16  # jobs/imagenet_lt.yaml: 64 per GPU x 16 GPUs
RESNET50_SIDE = 224


def load_all(url: str) -> tuple[torch.Tensor, np.ndarray, torch.Tensor, float]:
    """(images (N, C, H, W) uint8, labels (N,), index (N,), seconds to read and decode them all)."""
    t0 = C.clock()
    stream = ShardStream(url, batch_size=512, shuffle=False)
    stream.set_epoch(0)
    imgs, labels, index = [], [], []
    for batch in stream:
        imgs.append(batch["image"])
        labels.append(batch["label"])
        index.append(batch["index"])
    order = torch.cat(index).argsort()
    return (torch.cat(imgs)[order], torch.cat(labels)[order].numpy(), torch.cat(index)[order],
            C.clock() - t0)


def resnet50_step_flops() -> float:
    """FLOPs of ResNet-50's forward + backward for one 224 px image (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = build_backbone("resnet50", (RESNET50_SIDE, RESNET50_SIDE, 3)).net
    x = torch.randn(2, 3, RESNET50_SIDE, RESNET50_SIDE)
    with FlopCounterMode(display=False) as counter:
        net(x).sum().backward()
    return counter.get_total_flops() / 2


@torch.no_grad()
def encode_all(fn, images: torch.Tensor, views: ViewPair) -> tuple[torch.Tensor, float]:
    """(fn(eval view) over every image in blocks of 512, seconds)."""
    t0 = C.clock()
    out = torch.cat([fn(views.eval(b)) for b in images.split(512)])
    return out, C.clock() - t0


def run_cell(name: str, k: int, args, info: DataInfo, views: ViewPair, batch_images: torch.Tensor,
             feats: torch.Tensor, pixels: torch.Tensor, labels: np.ndarray, class_counts: np.ndarray
             ) -> dict[str, Any]:
    cfg = C.cell_config(name, k, args.batch_size, args.overrides)
    C.peak_rss_reset()
    row: dict[str, Any] = {"method": name, "k": k}
    aug = REGISTRY[name].cls.augmented
    x1, x2 = views.train(batch_images, 0, 0) if aug else (views.eval(batch_images),) * 2
    r = C.measure_step(cfg, info, x1, x2, args.rounds)
    method = r.pop("method")
    row.update(r)
    if name == "aecm":  # its encoder is the autoencoder's MLP on pixels: its codes stand in for the features
        enc, row["encode_n_s"] = encode_all(lambda x: method.encoder(x.flatten(1)), pixels, views)
    else:
        enc, row["encode_n_s"] = feats, math.nan  # the shared backbone pass, reported once
    heads_s, z, c, conf = W.predict_all(method, enc)
    row["heads_n_s"] = heads_s
    row["epoch"] = W.measure_epoch(cfg, method, enc, z, c)
    if name == "statdec":
        row["epoch"].update(W.statdec_init(cfg, method, z))
    km = cfg.method.kmeans
    row["kmeans_features"] = _no_centers(W.kmeans_cost(z, k, km.iters, km.restarts))
    row["end"] = W.measure_end(c.numpy(), labels, class_counts, k, conf.numpy())
    if k == args.gpu_k:  # the per-GPU batch (local terms right) and the global one (gathered terms right)
        row["gpu"] = {b: C.gpu_census(cfg, info, b) for b in (IMAGENET_BATCH // IMAGENET_GPUS, IMAGENET_BATCH)}
    row["peak_rss"] = C.peak_rss()
    return row


def _no_centers(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "centers"}


def main(args: argparse.Namespace) -> int:
    url = args.dataset or DATA
    args.batch_size, args.rounds = args.batch_size or 256, args.rounds or 3
    if not dataset_exists(url):
        raise ConfigError(f"no dataset at {url}: run `djc prepare imagenet-lt-synthetic --out {url}` first "
                          f"(about 2 minutes on 2 cores), or name one with --data")
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("DJC_THREADS_PER_WORKER", "1"))))
    try:
        return _run(args, url)
    finally:
        torch.set_num_threads(threads)


def _list(arg: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [a for a in arg.split(",") if a]
    for a in items:
        if allowed is not None and a not in allowed:
            raise ConfigError(f"unknown method {a!r} for --methods; choose from all, {', '.join(allowed)}")
    return items


def _run(args: argparse.Namespace, url: str) -> int:
    t_start = time.time()
    methods = list(REGISTRY) if args.methods in (None, "all") else _list(args.methods, tuple(REGISTRY))
    ks = [int(k) for k in _list(args.ks)]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = read_manifest(url)
    info = DataInfo(m.num_samples, tuple(m.image_shape), m.num_classes)
    if args.gpu_only:  # the op-by-op census at --gpu-k only: no CPU cell, no image read, about a minute
        shared = {"device": device_name(torch.device("cpu")), "n": m.num_samples, "classes": m.num_classes,
                  "batch": args.batch_size, "resnet50_flops_per_image": resnet50_step_flops(), "gpu_k": args.gpu_k,
                  "gpu_only": True}
        rows: list[dict[str, Any]] = []
        for name in methods:
            cfg = C.cell_config(name, args.gpu_k, args.batch_size, args.overrides)
            rows.append({"method": name, "k": args.gpu_k,
                         "gpu": {b: C.gpu_census(cfg, info, b) for b in (IMAGENET_BATCH // IMAGENET_GPUS,
                                                                         IMAGENET_BATCH)}})
            print(f"[djc bench] {name} K={args.gpu_k}: census", flush=True)
        print("\n" + _write(out_dir, shared, rows))
        return 0
    images, labels, index, read_s = load_all(url)
    cfg0 = C.cell_config("secu", 10, args.batch_size, args.overrides)
    views = ViewPair(cfg0, m.mean, m.std, info.image_shape[0])
    torch.manual_seed(cfg0.seed)  # the backbone every method builds first, from the same seed
    backbone = build_backbone(cfg0.model.backbone, info.image_shape, cfg0.model.width).net.eval()
    feats, encode_s = encode_all(backbone, images, views)
    shared = {"device": device_name(torch.device("cpu")), "n": m.num_samples, "classes": m.num_classes,
              "batch": args.batch_size, "read_decode_n_s": read_s, "encode_n_s": encode_s,
              "resnet50_flops_per_image": resnet50_step_flops(), "gpu_k": args.gpu_k}
    print(f"[djc bench] read + decode {m.num_samples} images {read_s:.1f} s, encoder over them {encode_s:.1f} s",
          flush=True)
    rows = []
    batch_images = images[: args.batch_size]
    for k in ks:
        km = cfg0.method.kmeans
        rows.append({"method": "kmeans", "k": k, **_no_centers(W.kmeans_cost(views.eval(images).flatten(1), k,
                                                                              km.iters, km.restarts))})
        for name in methods:
            t0 = time.time()
            try:
                rows.append(run_cell(name, k, args, info, views, batch_images, feats, images, labels,
                                     np.asarray(m.class_counts)))
            except (MemoryError, RuntimeError) as err:  # a cell that cannot run is a row that says why
                rows.append({"method": name, "k": k, "skipped": f"{type(err).__name__}: {str(err)[:120]}"})
            print(f"[djc bench] {name} K={k}: {time.time() - t0:.0f} s", flush=True)
            _write(out_dir, shared, rows)
    shared.update(wall_s=time.time() - t_start, cpu_s=time.process_time(), load=os.getloadavg())
    print("\n" + _write(out_dir, shared, rows))
    return 0


def _write(out_dir: Path, shared: dict, rows: list[dict]) -> str:
    from djc.bench.scale_table import tables

    text = tables(shared, rows)
    (out_dir / "scale.md").write_text(text + "\n")
    (out_dir / "scale.json").write_text(json.dumps({"shared": shared, "rows": rows}, indent=1, default=str) + "\n")
    return text

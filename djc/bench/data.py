"""`djc bench data`: is data the bottleneck? One dataset read from local disk, from S3 and from the local cache.

All sources are measured side by side in this one process, on the same bytes:
  - local disk: the dataset written to a local directory;
  - S3 cold: the same dataset on a real S3 server on loopback (djc.loopback_s3), no cache: every row group is
    one ranged GET, with the prefetch threads hiding the request latency;
  - S3 -> cache (fill): the first epoch with data.cache_dir set, which downloads each shard whole;
  - local cache: a later epoch, served by the cache.
For each: one full epoch through the training loader (samples/s, MB/s of shard bytes, ratio to local disk),
then the training step rate with that source feeding the real step (djc.step.train_step, one process, no
Ray), against the step rate on batches already decoded in memory. A ratio near 1 there means the data path
keeps up with the model: data is not the bottleneck.

Loopback S3 has no network latency (~1 ms a request) and moto serves from Python, so the S3 figures show the
cost of djc's S3 path (request handling, signing, copies), not of a real network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from djc.config import load_config
from djc.data.shards import Manifest
from djc.data.writer import write_dataset
from djc.data.loader import StreamLoader
from djc.data.stream import ShardStream
from djc.data.augment import ViewPair
from djc.optim import make_optimizer
from djc.step import build_method, train_step
from djc.loopback_s3 import LoopbackS3
from djc.methods.base import DataInfo, EpochContext

SIDE = 32  # CIFAR-sized RGB images
# The timed step: SeCu with an MLP encoder, ~0.1 s a step at batch 128 on one core, fast enough that a slow
# data path shows (a ResNet step hides almost any loader). Overrides on the command line replace these.
STEP_CONFIG = ["model.backbone=mlp", "model.width=256", "method.secu.num_heads=1"]


def _images(n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 32, 32, 3): smooth random fields plus noise, so PNG sizes (~2-3 kB) resemble photos'."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, 4, 4, 3)).astype(np.float32)
    smooth = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(SIDE, SIDE),
                                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
    return np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)


def _write(url: str, x: np.ndarray, y: np.ndarray) -> Manifest:
    return write_dataset(url, list(x), y, name="bench-data", class_names=[str(c) for c in range(10)],
                         provenance={"source": "djc bench data"}, rows_per_shard=1024, rows_per_group=128,
                         overwrite=True)


def _epoch(stream: ShardStream, workers: int) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for batch in StreamLoader(stream, loader_workers=workers):
        n += len(batch["index"])
    return time.perf_counter() - t0, n


class _Trainer:
    """The real training step (SeCu by default) on one process, fed by any iterable of batches."""

    def __init__(self, overrides: list[str], m: Manifest):
        # As in a training worker (djc/train.py): on a shared machine more threads spin-wait, ~30x slower here.
        torch.set_num_threads(max(1, int(os.environ.get("DJC_THREADS_PER_WORKER", "1"))))
        self.cfg = load_config(None, overrides)
        info = DataInfo(m.num_samples, tuple(m.image_shape), m.num_classes)
        torch.manual_seed(0)
        self.method = build_method(self.cfg, info)
        self.opt = make_optimizer(self.cfg, self.method)
        self.views = ViewPair(self.cfg, m.mean, m.std, SIDE)
        self.method.on_epoch_start(EpochContext(0, 1, 1, map_train=self._no_data_pass))
        self.step = 0

    @staticmethod
    def _no_data_pass(fn):
        raise RuntimeError("djc bench data times steps only; pick a method without data passes at epoch start")

    def rate(self, batches, steps: int) -> float:
        """Steps per second over `steps` steps, from asking for the first batch to the end of the last step."""
        t0, done = time.perf_counter(), 0
        for batch in batches:
            x1, x2 = self.views.train(batch["image"], self.step, 0)
            train_step(self.method, self.method, self.opt, batch["index"], x1, x2)
            self.step, done = self.step + 1, done + 1
            if done == steps:
                break
        return done / (time.perf_counter() - t0)


def _upload(local: Path, url: str) -> None:
    """The local dataset's files to `url`, manifest last: the same bytes on both sources."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for f in sorted(local.iterdir(), key=lambda p: p.name == "manifest.json"):
        fs.put_file(str(f), f"{root}/{f.name}")


def main(args: argparse.Namespace) -> int:
    n, B, workers = args.samples, args.batch_size or 128, args.loader_workers
    steps, rounds = args.steps or 10, args.rounds or 3
    out = Path(args.out) / "data"
    local, cache = out / "local", out / "cache"
    server = LoopbackS3().start()
    server.use()  # this process reaches it through AWS_ENDPOINT_URL and placeholder credentials
    try:
        t0 = time.perf_counter()
        m = _write(str(local), _images(n), np.arange(n) % 10)
        remote = f"{server.new_bucket('bench')}/data"
        _upload(local, remote)
        mb = sum(s.bytes for s in m.shards) / 1e6
        print(f"[djc bench data] {n:,} images {SIDE}x{SIDE}x3 (PNG), {mb:.1f} MB in {len(m.shards)} shards of "
              f"{len(m.shards[0].row_groups)} row groups; batch {B}, {workers} loader workers, prefetch 4 batches; "
              f"written in {time.perf_counter() - t0:.1f}s", flush=True)

        # name -> (url, cache dir, start from an empty cache); in this order, so the cache is filled, then hit
        sources = {"local disk": (str(local), None, False),
                   "s3 loopback, cold": (remote, None, False),
                   "s3 -> cache (fill)": (remote, cache, True),
                   "local cache": (remote, cache, False)}

        def stream(name: str, epoch: int) -> ShardStream:
            url, cache_dir, empty = sources[name]
            if empty:
                shutil.rmtree(cache, ignore_errors=True)
            s = ShardStream(url, batch_size=B, seed=0, cache_dir=str(cache_dir) if cache_dir else None)
            s.set_epoch(epoch)
            return s

        _epoch(stream("local disk", 0), workers)  # warm-up: imports, page cache, decoder
        reads: dict[str, tuple[float, int]] = {}
        for _ in range(rounds):  # interleaved rounds, best of each: load from other processes is noise
            for name in sources:
                sec, count = _epoch(stream(name, 1), workers)
                reads[name] = min(reads.get(name, (sec, count)), (sec, count))

        trainer = _Trainer([*STEP_CONFIG, f"data.batch_size={B}", *args.overrides], m)
        decoded = [b for _, b in zip(range(steps), stream("local disk", 2))]
        trainer.rate(decoded, 2)  # warm-up: first steps pay for lazy initialisation
        rates: dict[str, float] = {}
        for _ in range(rounds):
            feeds = {"memory (decoded)": lambda: decoded,
                     **{name: lambda name=name: StreamLoader(stream(name, 2), loader_workers=workers) for name in sources}}
            for name, feed in feeds.items():
                rates[name] = max(rates.get(name, 0.0), trainer.rate(feed(), steps))
    finally:
        server.stop()

    base_s = reads["local disk"][0]
    lines = ["| source | epoch s | samples/s | MB/s | read vs local disk | train steps/s | steps vs memory |",
             "|---|---|---|---|---|---|---|",
             f"| memory (decoded) | - | - | - | - | {rates['memory (decoded)']:.2f} | 1.00 |"]
    for name, (sec, count) in reads.items():
        lines.append(f"| {name} | {sec:.2f} | {count / sec:,.0f} | {mb / sec:.1f} | {base_s / sec:.2f} | "
                     f"{rates[name]:.2f} | {rates[name] / rates['memory (decoded)']:.2f} |")
    table = "\n".join(lines)
    cfg = trainer.cfg
    print(f"\n{table}\n\nbest of {rounds} interleaved rounds; steps: {cfg.method.name}, "
          f"{cfg.model.backbone} width {cfg.model.width}, batch {B}, {steps} steps per source and round; "
          f"torch threads {torch.get_num_threads()}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_data.md").write_text(table + "\n")
    return 0

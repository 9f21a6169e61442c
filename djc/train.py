"""The training story: one function per worker, and the Ray TorchTrainer around it.

Ray stays at this edge (and in tune/): the loop below uses Ray only to learn its rank, report metrics and
checkpoints, and find the checkpoint to resume from. Everything else (method, data, views, collectives) is plain
torch and is tested without Ray.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from djc import dist, export, outputs
from djc.config import Config, from_dict, to_dict
from djc.data.shards import Manifest, read_manifest
from djc.data.stream import ShardStream, StreamLoader
from djc.engine import Views, apply_lr, build_method, lr_factor, make_optimizer, train_step, wrap_ddp
from djc.methods.base import DataInfo, EpochContext
from djc.selection import selection_metrics

CKPT_FILE = "state.pt"


def data_info(m: Manifest) -> DataInfo:
    if m.image_shape is None:
        raise ValueError(f"dataset {m.url} has images of varying size; resize them when preparing it")
    return DataInfo(m.num_samples, tuple(m.image_shape), m.num_classes)


# ---------------------------------------------------------------------------------------------------------
# The per-worker loop.


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    # --- config and process -----------------------------------------------------------------------------
    cfg: Config = from_dict(loop_config["config"])
    run_dir: str = loop_config["run_dir"]
    rank, world = dist.rank(), dist.world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("DJC_THREADS_PER_WORKER", "1"))))

    # --- data -------------------------------------------------------------------------------------------
    manifest = read_manifest(cfg.data.train)
    info = data_info(manifest)
    stream = ShardStream(manifest, batch_size=cfg.data.batch_size // world, rank=rank, world_size=world,
                         seed=cfg.seed, window=cfg.data.window, on_corrupt=cfg.data.on_corrupt,
                         cache_dir=cfg.data.cache_dir or None)
    loader = StreamLoader(stream, num_workers=cfg.data.loader_workers)
    steps_per_epoch = loader.steps_per_epoch
    views = Views(cfg, manifest.mean, manifest.std, info.image_shape[0])

    # --- model and cluster state ------------------------------------------------------------------------
    method = build_method(cfg, info).to(device)
    opt = make_optimizer(cfg, method)

    # --- resume -----------------------------------------------------------------------------------------
    start_epoch, step = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CKPT_FILE, map_location=device, weights_only=False)
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["stream"])
        start_epoch, step = state["epoch"], state["step"]
    if rank == 0:
        # The log holds the epochs of the state we continue from: what a lost attempt logged after its last
        # checkpoint goes (everything, on a fresh start), so no epoch appears twice.
        _drop_epochs_after(f"{run_dir}/metrics.jsonl", start_epoch)
        if ckpt is not None:
            export.append_jsonl(f"{run_dir}/resumes.jsonl",
                                {"epoch": start_epoch, "step": step, "time": round(time.time(), 3)})
            print(f"[djc] resumed from checkpoint at epoch {start_epoch} (step {step})", flush=True)
    model = wrap_ddp(method) if world > 1 else method

    select_url = {"train": cfg.data.train, **cfg.data.eval}.get(cfg.eval.select_split)

    def map_train(fn):
        method.eval()
        try:
            return outputs.map_split(cfg.data.train, fn, views, device)
        finally:
            method.train()

    # --- loop -------------------------------------------------------------------------------------------
    for epoch in range(start_epoch, cfg.optim.epochs):
        if loader.position == 0:  # a mid-epoch resume keeps the restored snapshot
            loader.set_epoch(epoch)
            method.on_epoch_start(EpochContext(epoch, cfg.optim.epochs, steps_per_epoch, map_train))
        method.train()
        t0, sums, n = time.time(), None, 0
        for batch in loader:
            apply_lr(opt, lr_factor(cfg, step, steps_per_epoch))
            images = batch["image"].to(device, non_blocking=True)
            if method.views == "plain":  # autoencoders reconstruct the input itself
                x1 = x2 = views.eval(images)
            else:
                x1, x2 = views.train(images, step, rank)
            out = train_step(model, method, opt, batch["index"].to(device), x1, x2)
            logs = torch.stack([out.loss.detach(), *out.logs.values()])
            sums = logs if sums is None else sums + logs
            n, step = n + 1, step + 1
            if rank == 0 and step % cfg.trainer.log_every == 0:  # the only per-step host sync
                print(f"[djc] epoch {epoch} step {step} loss {out.loss.item():.4f}", flush=True)
            if n == steps_per_epoch:
                break
        loader.set_epoch(epoch + 1)  # position 0 of the next epoch: what a checkpoint here resumes from
        metrics = _epoch_metrics(cfg, method, out.logs.keys(), sums, n, epoch, step, time.time() - t0, opt)
        if select_url:  # every rank: the criterion is reduced over workers (djc/selection.py)
            method.eval()
            metrics.update(selection_metrics(method, select_url, views, device, cfg.method.num_clusters))
            method.train()
        if rank == 0:
            export.append_jsonl(f"{run_dir}/metrics.jsonl", metrics)
            print(_progress_line(cfg, metrics), flush=True)
        last = epoch + 1 == cfg.optim.epochs
        if (epoch + 1) % cfg.trainer.checkpoint_every == 0 or last:
            _report_with_checkpoint(cfg, method, opt, loader, epoch + 1, step, metrics)
        else:
            ray.train.report(metrics)

    # --- evaluation and outputs -------------------------------------------------------------------------
    method.on_train_end()
    method.eval()
    outputs.evaluate_run(cfg, method, views, run_dir, device)
    dist.barrier()


def _epoch_metrics(cfg: Config, method, names, sums, n, epoch, step, seconds, opt) -> dict[str, float]:
    # Sums over workers, then divide: one collective for every logged scalar.
    vals = dist.all_reduce_sum(torch.cat([sums.float().cpu(), torch.tensor([float(n)])])) / dist.world_size()
    out = {"epoch": epoch + 1, "step": step, "seconds": round(seconds, 3),
           "loss": float(vals[0] / vals[-1]), "lr": opt.param_groups[0]["lr"]}
    out.update({k: float(v / vals[-1]) for k, v in zip(names, vals[1:-1])})
    counts = method.health_counts()
    if counts is not None:  # replicated state: identical on every worker, no collective needed
        c = counts.detach().float().cpu()
        p = c / c.sum().clamp_min(1)
        ent = float(-(p[p > 0] * p[p > 0].log()).sum() / np.log(len(c)))
        out.update(min_cluster_size=int(c.min()), max_cluster_size=int(c.max()),
                   empty_clusters=int((c == 0).sum()), size_entropy=round(ent, 4))
    return out


def _progress_line(cfg: Config, m: dict[str, float]) -> str:
    health = (f"  clusters min {m['min_cluster_size']} max {m['max_cluster_size']} empty {m['empty_clusters']}"
              if "min_cluster_size" in m else "")
    select = f"  select {m['select_score']:.4f}" if "select_score" in m else ""
    return (f"[djc] epoch {m['epoch']:>4}/{cfg.optim.epochs}  loss {m['loss']:.4f}  lr {m['lr']:.4f}"
            f"{health}{select}  {m['seconds']:.1f}s")


def _drop_epochs_after(url: str, epoch: int) -> None:
    """Keep the log lines of epochs <= `epoch` (the checkpoint this attempt starts from)."""
    try:
        lines = export.read_jsonl(url)
    except FileNotFoundError:
        return
    kept = [m for m in lines if m.get("epoch", 0) <= epoch]
    if len(kept) < len(lines):
        export.write_text(url, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))


def _report_with_checkpoint(cfg: Config, method, opt, loader, epoch: int, step: int, metrics: dict) -> None:
    import ray.train

    if dist.rank() != 0:
        ray.train.report(metrics)  # every rank reports the same number of times
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"method": method.state_dict(), "optimizer": opt.state_dict(), "stream": loader.state_dict(),
                    "epoch": epoch, "step": step, "config": to_dict(cfg)}, Path(d) / CKPT_FILE)
        # Ray copies the directory into storage and only then records it as the latest checkpoint, so a
        # reader never sees a partial one.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ---------------------------------------------------------------------------------------------------------
# The driver side: a local Ray instance when none is given, and the TorchTrainer.


def ensure_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.trainer.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    # A laptop run: keep Ray and gloo on loopback, and give every worker a thread so 2 cores are shared fairly.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # address="local": a new instance even when a `ray start` head runs on this machine (ray.init() would
    # silently join the latest one found under $RAY_TMPDIR instead of the one the user asked for).
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
             _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}})


def build_trainer(cfg: Config, run_dir: str):
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.trainer
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": 1} if t.use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="train", storage_path=run_dir,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
    )


def fit(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Run training to completion (resuming if `run_dir` holds a checkpoint) and return metrics.json."""
    ensure_ray(cfg)
    build_trainer(cfg, run_dir).fit()
    return export.read_json(f"{run_dir}/metrics.json")

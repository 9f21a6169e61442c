"""The training story: one function per worker, and the Ray TorchTrainer around it.

Ray stays at this edge (and in tune/): the loop below uses Ray only to learn its rank, report metrics and
checkpoints, and find the checkpoint to resume from. Everything else (method, data, views, collectives) is plain
torch and is tested without Ray.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from djc import dist, export, outputs, storage
from djc.config import Config, from_dict, to_dict
from djc.data.shards import Manifest, read_manifest
from djc.data.stream import ShardStream, StreamLoader
from djc.engine import Views, apply_lr, build_method, lr_factor, make_optimizer, to_device, train_step, wrap_ddp
from djc.methods.base import DataInfo, EpochContext

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
    # Ray configures the workers' root logger at INFO, which prints two lines per report and per checkpoint;
    # djc prints its own progress line per epoch.
    logging.getLogger().setLevel(cfg.trainer.ray_log_level)
    run_dir: str = loop_config["run_dir"]
    storage.configure(cfg.storage)  # this process's S3 settings; credentials stay in its environment
    rank, world = dist.rank(), dist.world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(os.environ.get("DJC_THREADS_PER_WORKER", "1"))))

    # --- data -------------------------------------------------------------------------------------------
    manifest = read_manifest(cfg.data.train)
    info = data_info(manifest)
    stream = ShardStream(manifest, batch_size=cfg.data.batch_size // world, rank=rank, world_size=world,
                         seed=cfg.seed, window=cfg.data.window, on_corrupt=cfg.data.on_corrupt,
                         cache_dir=cfg.data.cache_dir or None, cache_max_bytes=int(cfg.data.cache_max_gb * 2**30),
                         retries=cfg.data.retries, prefetch_batches=cfg.data.prefetch_batches)
    loader = StreamLoader(stream, num_workers=cfg.data.loader_workers)
    steps_per_epoch = loader.steps_per_epoch
    views = Views(cfg, manifest.mean, manifest.std, info.image_shape[0])

    # --- model and cluster state ------------------------------------------------------------------------
    method = to_device(build_method(cfg, info), cfg, device)  # precision, memory format, compile
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
            print(f"[djc] resumed from checkpoint at epoch {start_epoch} (step {step})", flush=True)
    model = wrap_ddp(method) if world > 1 else method

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
            # non_blocking: a blocking host -> GPU copy synchronises the stream
            x1, x2 = views.for_method(method, batch["image"].to(device, non_blocking=True), step, rank)
            out = train_step(model, method, opt, batch["index"].to(device, non_blocking=True), x1, x2)
            logs = torch.stack([out.loss.detach(), *out.logs.values()])
            sums = logs if sums is None else sums + logs
            n, step = n + 1, step + 1
            if rank == 0 and step % cfg.trainer.log_every == 0:  # the only per-step host sync
                print(f"[djc] epoch {epoch} step {step} loss {out.loss.item():.4f}", flush=True)
            if n == steps_per_epoch:
                break
        loader.set_epoch(epoch + 1)  # position 0 of the next epoch: what a checkpoint here resumes from
        metrics = _epoch_metrics(cfg, method, out.logs.keys(), sums, n, epoch, step, time.time() - t0, opt)
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
    vals = dist.all_reduce_sum(torch.cat([sums.float(), sums.new_full((1,), n, dtype=torch.float)])).cpu()
    vals = vals / dist.world_size()
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
    return (f"[djc] epoch {m['epoch']:>4}/{cfg.optim.epochs}  loss {m['loss']:.4f}  lr {m['lr']:.4f}"
            f"{health}  {m['seconds']:.1f}s")


def _report_with_checkpoint(cfg: Config, method, opt, loader, epoch: int, step: int, metrics: dict) -> None:
    import ray.train

    if dist.rank() != 0:
        ray.train.report(metrics)  # every rank reports the same number of times
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"method": method.state_dict(), "optimizer": opt.state_dict(), "stream": loader.state_dict(),
                    "epoch": epoch, "step": step, "config": to_dict(cfg)}, Path(d) / CKPT_FILE)
        # Ray copies the directory into storage and only then records it as the latest checkpoint (in
        # checkpoint_manager_snapshot.json, rewritten whole: on S3 one PUT), so a reader never sees a partial
        # one; a restart resumes from the checkpoint that snapshot names.
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
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # nothing but this process can reach a loopback instance
    # One machine is never preempted; the watcher only adds an actor and an error line at start-up.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
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
    # Read by Ray in this process when the run starts and passed on to the controller (unless the user set it).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(t.poll_interval_s))
    # A run dir on S3 reaches Ray as fsspec's filesystem, so checkpoints use djc's endpoint and credentials.
    storage_path, storage_fs = storage.ray_storage(run_dir)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name="train", storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=t.ray_log_level),
        ),
    )


def fit(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Run training to completion (resuming if `run_dir` holds a checkpoint) and return metrics.json."""
    storage.configure(cfg.storage)
    ensure_ray(cfg)
    build_trainer(cfg, run_dir).fit()
    return export.read_json(f"{run_dir}/metrics.json")

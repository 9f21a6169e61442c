"""The training story: what each worker runs, from its config to the run's outputs.

Ray stays at the edge: the loop below meets its runner only through a session (djc/session.py: the device, the
checkpoint to resume from, where metrics and checkpoints go), a Ray Train worker's or the one process of `djc
train --in-process`. Everything else (method, data, views, collectives) is plain torch and is tested without Ray.
djc/launch.py builds the TorchTrainer that runs it, or runs it in its own process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import traceback
from typing import Any

import torch

from djc import checkpoint, dist, evaluate, features, rundir, runfiles, selection, storage
from djc.config import Config, from_dict, to_dict
from djc.data.shards import Manifest, read_manifest
from djc.data.loader import StreamLoader
from djc.data.stream import ShardStream
from djc.optim import apply_lr, lr_factor, make_optimizer
from djc.step import build_method, run_views, to_device, train_step, wrap_ddp
from djc.methods.base import DataInfo, EpochContext
from djc.metrics import size_health
from djc.session import RaySession, Session

def data_info(m: Manifest) -> DataInfo:
    if m.image_shape is None:
        raise ValueError(f"dataset {m.url} has images of varying size; resize them when preparing it")
    return DataInfo(m.num_samples, tuple(m.image_shape), m.num_classes, tuple(m.mean), tuple(m.std))


def make_inputs(cfg: Config, method, manifest: Manifest, device: torch.device, run_dir: str):
    """(views, loader) of this worker: the training stream and the views that turn its batches into the method's
    two inputs. Views of the images, normalised and sized for the backbone (djc/data/inputs.py); or, with a
    frozen backbone on plain views, its features computed once (djc/features.py) and a stream of indices only."""
    rank, world = dist.rank(), dist.world_size()
    views = run_views(cfg, data_info(manifest))  # the dataset's normalisation and side, or the pretrained backbone's
    order = None  # with cached features: the dataset index of each row, so the stream reads nothing
    if features.applies(cfg, method.augmented):
        views = features.prepare(cfg, method, views, device, run_dir)
        method.features_in, order = True, views.order()
    stream = ShardStream(manifest, batch_size=cfg.data.batch_size // world, rank=rank, world_size=world,
                         seed=cfg.seed, window=cfg.data.window, on_corrupt=cfg.data.on_corrupt,
                         cache_dir=os.path.expandvars(os.path.expanduser(cfg.data.cache_dir)) or None,
                         cache_max_bytes=int(cfg.data.cache_max_gb * 2**30),
                         retries=cfg.data.retries, prefetch_batches=cfg.data.prefetch_batches, order=order)
    return views, StreamLoader(stream, loader_workers=cfg.data.loader_workers if order is None else 0)


# ---------------------------------------------------------------------------------------------------------
# The per-worker loop.


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What Ray runs on each worker: the loop below, with a failure's full traceback written to the run dir
    (logs/error-rank<r>.txt) and not printed, so that the driver can report it in one line (djc/launch.py)."""
    # Ray logs the whole traceback of a failed training function on every worker, and the driver prints each
    # worker's log: 200-300 lines for a corrupt shard. The file below keeps it instead.
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    run_logged(loop_config, RaySession())


def run_logged(loop_config: dict[str, Any], session: Session) -> None:
    """The loop under `session`, a failure's full traceback written to the run dir's logs/error-rank<r>.txt."""
    try:
        _train(loop_config, session)
    except BaseException:
        with contextlib.suppress(Exception):  # an unwritable run dir must not hide the original error
            log = rundir.ERROR_LOG.format(rank=dist.rank())
            runfiles.write_text(f"{loop_config['run_dir']}/{log}", traceback.format_exc())
        raise


def _train(loop_config: dict[str, Any], session: Session) -> None:
    # --- config and process -----------------------------------------------------------------------------
    cfg: Config = from_dict(loop_config["config"])
    # Ray configures the workers' root logger at INFO, which prints two lines per report and per checkpoint;
    # djc prints its own progress line per epoch.
    logging.getLogger().setLevel(cfg.trainer.ray_log_level)
    run_dir: str = loop_config["run_dir"]
    storage.configure(cfg.storage)  # this process's S3 settings; credentials stay in its environment
    rank, world = dist.rank(), dist.world_size()
    device = session.device()
    torch.set_num_threads(cfg.trainer.threads_per_worker or session.default_threads())

    # --- model and cluster state ------------------------------------------------------------------------
    manifest = read_manifest(cfg.data.train)
    info = data_info(manifest)
    method = to_device(build_method(cfg, info), cfg, device)  # precision, memory format, compile
    opt = make_optimizer(cfg, method)

    # --- data -------------------------------------------------------------------------------------------
    views, loader = make_inputs(cfg, method, manifest, device, run_dir)
    steps_per_epoch = loader.steps_per_epoch

    # --- resume -----------------------------------------------------------------------------------------
    start_epoch, step = 0, 0
    with session.resume_dir() as d:
        state = None if d is None else checkpoint.load(d / checkpoint.CKPT_FILE, map_location=device)
    if state is not None:
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["stream"])
        start_epoch, step = state["epoch"], state["step"]
    if rank == 0:
        # The log holds the epochs of the state we continue from: what a lost attempt logged after its last
        # checkpoint goes (everything, on a fresh start), so no epoch appears twice.
        _drop_epochs_after(f"{run_dir}/metrics.jsonl", start_epoch)
        if state is not None:
            runfiles.append_jsonl(f"{run_dir}/resumes.jsonl",
                                {"epoch": start_epoch, "step": step, "time": round(time.time(), 3)})
            print(f"[djc] resumed from checkpoint at epoch {start_epoch} (step {step})", flush=True)
    model = wrap_ddp(method) if world > 1 else method

    select_url = cfg.data.splits().get(cfg.eval.select_split)

    def map_train(fn):
        method.eval()
        try:
            return evaluate.map_split(cfg.data.train, fn, views, device, cfg.data.on_corrupt)
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
            if cfg.data.on_corrupt == "skip" and not len((batch := _aligned(batch))["index"]):
                n, step = n + 1, step + 1  # a worker's whole batch was undecodable: every worker skips the step
                if n == steps_per_epoch:
                    break
                continue
            apply_lr(opt, lr_factor(cfg, step, steps_per_epoch))
            x1, x2 = views.for_batch(method, batch, device, step, rank)  # augmented views, or cached features
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
        if select_url:  # every rank: the criterion is reduced over workers (djc/selection.py)
            method.eval()
            metrics.update(selection.selection_metrics(method, select_url, views, device,
                                                      cfg.method.num_clusters, cfg.data.on_corrupt))
            method.train()
        if rank == 0:
            runfiles.append_jsonl(f"{run_dir}/metrics.jsonl", metrics)
            print(_progress_line(cfg, metrics), flush=True)
        last = epoch + 1 == cfg.optim.epochs
        if (epoch + 1) % cfg.trainer.checkpoint_every == 0 or last:
            _report_with_checkpoint(session, cfg, method, opt, loader, epoch + 1, step, metrics)
        else:
            session.report(metrics)

    # --- evaluation and outputs -------------------------------------------------------------------------
    method.on_train_end()
    method.eval()
    evaluate.evaluate_run(cfg, method, views, run_dir, device)
    dist.barrier()


def _aligned(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch cut to the smallest local batch of this step over all workers. With on_corrupt=skip a worker
    drops the images that do not decode, and the methods' collectives need equal local batches (a gather of
    unequal sizes aborts gloo); the cut rows are read again next epoch. One small all-reduce and host read per
    step, only in this mode."""
    b = len(batch["index"])
    m = -int(dist.all_reduce_max(torch.tensor([-b]))[0])
    return batch if m == b else {k: v[:m] if torch.is_tensor(v) else v for k, v in batch.items()}


def _epoch_metrics(cfg: Config, method, names, sums, n, epoch, step, seconds, opt) -> dict[str, float]:
    # Sums over workers, then divide: one collective for every logged scalar.
    vals = dist.all_reduce_sum(torch.cat([sums.float(), sums.new_full((1,), n, dtype=torch.float)])).cpu()
    vals = vals / dist.world_size()
    out = {"epoch": epoch + 1, "step": step, "seconds": round(seconds, 3),
           "loss": float(vals[0] / vals[-1]), "lr": opt.param_groups[0]["lr"]}
    out.update({k: float(v / vals[-1]) for k, v in zip(names, vals[1:-1])})
    counts = method.health_counts()
    if counts is not None:  # replicated state: identical on every worker, no collective needed
        health = size_health(counts.detach().cpu().numpy())
        out.update(health, size_entropy=round(health["size_entropy"], 4))
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
        lines = runfiles.read_jsonl(url)
    except FileNotFoundError:
        return
    kept = [m for m in lines if m.get("epoch", 0) <= epoch]
    if len(kept) < len(lines):
        runfiles.write_text(url, "".join(json.dumps(m, sort_keys=True) + "\n" for m in kept))


def _report_with_checkpoint(session: Session, cfg: Config, method, opt, loader, epoch: int, step: int,
                            metrics: dict) -> None:
    if dist.rank() != 0:
        session.report(metrics)  # every rank reports the same number of times
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, {"method": method.state_dict(), "optimizer": opt.state_dict(),
                            "stream": loader.state_dict(), "epoch": epoch, "step": step, "config": to_dict(cfg)})
        # Ray copies the directory into storage and only then records it as the latest checkpoint (in
        # checkpoint_manager_snapshot.json, rewritten whole: on S3 one PUT), so a reader never sees a partial
        # one; a restart resumes from the checkpoint that snapshot names.
        session.report(metrics, checkpoint_dir=d)

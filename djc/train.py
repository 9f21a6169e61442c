"""The training story: one function per worker, and the Ray TorchTrainer around it.

Ray stays at this edge (and in tune/): the loop below uses Ray only to learn its rank, report metrics and
checkpoints, and find the checkpoint to resume from. Everything else (method, data, views, collectives) is plain
torch and is tested without Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from djc import dist, export, outputs, storage
from djc.config import Config, ConfigError, from_dict, to_dict
from djc.data.shards import Manifest, read_manifest
from djc.data.stream import ShardStream, StreamLoader
from djc.engine import Views, apply_lr, build_method, lr_factor, make_optimizer, to_device, train_step, wrap_ddp
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
        # Ray copies the directory into storage and only then records it as the latest checkpoint (in
        # checkpoint_manager_snapshot.json, rewritten whole: on S3 one PUT), so a reader never sees a partial
        # one; a restart resumes from the checkpoint that snapshot names.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ---------------------------------------------------------------------------------------------------------
# The driver side: a local Ray instance when none is given, and the TorchTrainer.


def cluster_address(cfg: Config) -> tuple[str, str]:
    """(address, the setting it came from); ("", "") = no cluster named: train on a local instance."""
    if cfg.trainer.ray_address:
        return cfg.trainer.ray_address, "trainer.ray_address"
    return os.environ.get("RAY_ADDRESS", ""), "RAY_ADDRESS"


def _check_reachable(address: str, source: str) -> None:
    """Fail in seconds, naming the setting, where ray.init would retry for a minute or wait forever."""
    if address == "auto":
        return  # ray.init finds the head under $RAY_TMPDIR or fails at once
    hostport = address.removeprefix("ray://")
    if "://" in hostport:
        raise ConfigError(f"{source}={address} is not a Ray cluster address: djc train joins the head's GCS "
                          f"(host:6379, or ray://host:10001); http://host:8265 is the job server, for "
                          f"`ray job submit` (jobs/submit.sh), which sets the address inside the job itself")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as err:
        raise ConfigError(f"{source}={address}: no Ray cluster reachable there ({err}); start one "
                          f"(`ray start --head`, `ray up cluster.yaml`) or unset {source} to train on a local "
                          f"Ray instance") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ray(cfg: Config, dashboard: bool = False) -> None:
    """Join the cluster the config or RAY_ADDRESS names, else start a private local instance.

    `dashboard` (djc tune): Ray Train releases the workers' placement group of a trial that Tune stopped through
    a cleaner that asks the state API (the dashboard) whether the trial's controller is gone. Without it, every
    stopped trial keeps its CPUs until the search ends, and the next trials wait forever. The cleaner finds the
    dashboard by auto-detection, which fails on a machine that runs several Ray instances, so it is told.
    """
    import ray

    if ray.is_initialized():
        return
    address, source = cluster_address(cfg)
    if address:
        _check_reachable(address, source)
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as err:
            raise ConfigError(f"{source}={address}: cannot join a Ray cluster there ({err})") from None
        return
    # A laptop run: keep Ray and gloo on loopback, and give every worker a thread so 2 cores are shared fairly.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # nothing but this process can reach a loopback instance
    # One machine is never preempted; the watcher only adds an actor and an error line at start-up.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # address="local": a new instance even when a `ray start` head runs on this machine (ray.init() would
    # silently join the latest one found under $RAY_TMPDIR instead of the one the user asked for).
    env = {"GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore"}
    web: dict[str, Any] = {"include_dashboard": False}
    if dashboard:
        port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        web = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}
    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": env}, **web)


def worker_bundle(cfg: Config) -> dict[str, float]:
    """What one training worker reserves on one node."""
    return {"CPU": cfg.trainer.cpus_per_worker} | ({"GPU": 1.0} if cfg.trainer.use_gpu else {})


def worker_slots(cfg: Config) -> int:
    """How many training workers the live nodes can hold at once (each worker's bundle fits on one node)."""
    import ray

    bundle = worker_bundle(cfg)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return sum(min(int(r.get(k, 0.0) / v + 1e-9) for k, v in bundle.items()) for r in nodes)


def _autoscaler_ceiling() -> dict[str, float] | None:
    """The most of each resource the autoscaler may bring up (cluster.yaml's max_workers), None without one."""
    from ray._private import state  # what Ray Train itself asks before it waits for a worker group

    try:
        return state.state.get_max_resources_from_cluster_config()
    except Exception:  # an older Ray, or no GCS support for it: fall back to the live nodes
        return None


def cluster_capacity() -> dict[str, float]:
    """The most of each resource the cluster can offer: its autoscaler's maximum, else the live nodes' total."""
    import ray

    ceiling = _autoscaler_ceiling()
    return ceiling if ceiling is not None else ray.cluster_resources()


def check_resources(cfg: Config) -> None:
    """Refuse a run the cluster cannot hold instead of waiting forever for its placement group.

    With an autoscaler, the run must fit the cluster at its largest; the autoscaler then adds the nodes. Without
    one, the run must fit the live nodes: a joined cluster (RAY_ADDRESS / trainer.ray_address) gets
    trainer.resource_wait_s for nodes started by hand to join; a local instance cannot grow and fails at once.
    """
    import ray

    t = cfg.trainer
    need = (f"trainer.num_workers={t.num_workers} workers x {worker_bundle(cfg)} (trainer.use_gpu="
            f"{str(t.use_gpu).lower()}, trainer.cpus_per_worker={t.cpus_per_worker:g})")
    ceiling = _autoscaler_ceiling()
    if ceiling is not None:
        short = {k: v * t.num_workers for k, v in worker_bundle(cfg).items()
                 if ceiling.get(k, 0) + 1e-9 < v * t.num_workers}
        if short:
            raise ConfigError(f"the cluster cannot hold this run even at its largest: it needs {need}, and its "
                              f"autoscaler can reach only {ceiling} (max_workers in cluster.yaml)")
        return
    grows = bool(cluster_address(cfg)[0])
    deadline = time.monotonic() + (t.resource_wait_s if grows else 0.0)
    while (slots := worker_slots(cfg)) < t.num_workers:
        total = ray.cluster_resources()
        have = f"{total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs on {len(ray.nodes())} node(s)"
        if time.monotonic() >= deadline:
            waited = f" after waiting {t.resource_wait_s:g} s (trainer.resource_wait_s)" if grows else ""
            raise ConfigError(f"the cluster cannot hold this run: it needs {need} but has {have}, room for "
                              f"{slots} worker(s){waited}")
        print(f"[djc] waiting for nodes to join: need {need}, have {have}", flush=True)
        time.sleep(min(15.0, max(0.1, deadline - time.monotonic())))


def build_trainer(cfg: Config, run_dir: str, callbacks: list | None = None):
    """The TorchTrainer of one run; `callbacks` are Ray Train callbacks (djc tune passes Tune's reporter)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = cfg.trainer
    # Read by Ray in this process when the run starts and passed on to the controller (unless the user set it).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(t.poll_interval_s))
    # A run dir on S3 reaches Ray as fsspec's filesystem, so checkpoints use djc's endpoint and credentials.
    storage_path, storage_fs = storage.ray_storage(run_dir)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=worker_bundle(cfg)),
        run_config=ray.train.RunConfig(
            name="train", storage_path=storage_path, storage_filesystem=storage_fs, callbacks=list(callbacks or []),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=t.ray_log_level),
        ),
    )


def fit(cfg: Config, run_dir: str) -> dict[str, Any]:
    """Run training to completion (resuming if `run_dir` holds a checkpoint) and return metrics.json."""
    storage.configure(cfg.storage)
    ensure_ray(cfg)
    check_resources(cfg)
    build_trainer(cfg, run_dir).fit()
    return export.read_json(f"{run_dir}/metrics.json")

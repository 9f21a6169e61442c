"""A run from its config to its run dir: resolve and check it, prepare its data, own its run dir, start or
join Ray, build the TorchTrainer, fit, and turn a worker's failure into one line.

`djc train`, `djc bench` and `djc tune` all start runs through here; djc/train.py holds what each worker does.
Everything that can be checked without workers is checked here, before Ray starts (~20-50 s on 2 cores), so a
bad dataset or an impossible K is a one-line error in seconds.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from djc import ray_setup, rundir, runfiles, storage
from djc.checkpoint import CheckpointError
from djc.config import Config, ConfigError, from_dict, has_credentials, to_dict, to_yaml
from djc.data.shards import DatasetError
from djc.models.weights import WeightsError


class RunError(Exception):
    """A run that failed on a worker for a reason the user can fix; the message is one line."""


# Errors a user can fix: the CLI prints their message on one line and exits 2. Anything else is a bug and keeps
# its traceback. OSError covers an --out that is read-only or whose parent is a file.
USER_ERRORS = (ConfigError, DatasetError, CheckpointError, WeightsError, storage.StorageError, RunError, OSError)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def absolute(url: str) -> str:
    """Ray workers do not share the driver's working directory: local paths travel as absolute ones."""
    return str(Path(url.removeprefix("file://")).expanduser().resolve()) if url and is_local(url) else url


def out_url(url: str, flag: str = "--out") -> str:
    """A run or search dir named on the command line, refused if it carries credentials (it is printed, and
    stored by Ray in its run state)."""
    if has_credentials(url):
        raise ConfigError(f"{flag} {url.split('://')[0]}://...@... holds credentials; give them through the "
                          f"environment or an AWS profile instead")
    return url.rstrip("/")


def resolve(cfg: Config) -> Config:
    tree = to_dict(cfg)
    tree["data"]["train"] = absolute(cfg.data.train)
    tree["data"]["eval"] = {k: absolute(v) for k, v in cfg.data.eval.items()}
    if cfg.model.weights:  # a relative model.weights=runs/<pretext run> is the driver's, not a worker's cwd
        tree["model"]["weights"] = absolute(cfg.model.weights)
    return from_dict(tree)


def ensure_datasets(cfg: Config) -> None:
    """Prepare the run's datasets on first use when the config names a source; otherwise refuse clearly. Two
    runs that start together on the same new dataset take turns: the second finds it made."""
    from djc.data.prepare import dataset_exists, prepare

    for split, url in cfg.data.splits().items():
        if dataset_exists(url):
            continue
        if not cfg.data.source:
            raise DatasetError(f"no dataset at {url} (data.{'train' if split == 'train' else 'eval.' + split}); "
                               f"run `djc prepare` or set data.source to make it on first use")
        with rundir.owned(url, wait=True):
            if dataset_exists(url):  # made by the run we waited for
                continue
            print(f"[djc] preparing {cfg.data.source} {split} split at {url}", file=sys.stderr)
            try:
                prepare(cfg.data.source, url, root=cfg.data.source_root or None,
                        split="train" if split == "train" else "test",
                        imbalance_ratio=cfg.data.imbalance_ratio if split == "train" else 1.0,
                        profile=cfg.data.profile, seed=cfg.data.prepare_seed)
            except ValueError as err:  # the source's own checks (labels, sizes, root): the user's to fix
                raise DatasetError(f"cannot prepare {url} from data.source={cfg.data.source}: {err}") from None


def check_shared_storage(cfg: Config, run_dir: str) -> None:
    """On a joined cluster of more than one node (or one its autoscaler may grow), refuse local paths: workers
    on other nodes would write checkpoints and outputs to their own disks, or find no data there. Joins the
    cluster (seconds); a local Ray instance is one node and is never checked."""
    if not ray_setup.cluster_address(cfg)[0] or cfg.storage.shared_filesystem:
        return
    local = [(k, u) for k, u in (("--out", run_dir), *(("data.train" if s == "train" else f"data.eval.{s}", u)
                                                       for s, u in cfg.data.splits().items())) if is_local(u)]
    if not local:
        return
    ray_setup.ensure_ray(cfg)
    nodes, grows = ray_setup.node_span()
    if nodes <= 1 and not grows:
        return
    key, url = local[0]
    span = f"has {nodes} nodes" + (" and an autoscaler that may add more" if grows else "")
    what = ("workers on other nodes cannot write this machine's disk: checkpoints, metrics and outputs would be "
            "scattered over the nodes" if key == "--out" else "workers on other nodes cannot read this machine's disk")
    fix = ("--out s3://bucket/prefix" if key == "--out" else f"{key}=s3://bucket/prefix (djc prepare ... --out s3://...)")
    raise ConfigError(f"{key} {url} is a local path, but the Ray cluster {span}: {what}; use {fix}, or set "
                      f"storage.shared_filesystem=true if {url} is on a filesystem every node mounts at that path")


def check_against_data(cfg: Config) -> None:
    """Checks that need the manifests (one small read each), still before any worker starts."""
    from djc.data.shards import read_manifest

    m = read_manifest(cfg.data.train)  # also lists the shards: a missing or truncated one is named here
    if m.image_shape is None:
        raise DatasetError(f"dataset {cfg.data.train} has images of varying size; a batch needs one shape: "
                           f"prepare it again with `djc prepare folder --size N`")
    if m.num_samples < cfg.data.batch_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the dataset "
                          f"({m.num_samples} samples at {cfg.data.train})")
    k = cfg.method.num_clusters
    # StatDEC starts from k-means with init_over x K centers on the training set.
    need = k * cfg.method.statdec.init_over if cfg.method.name == "statdec" else k
    if need > m.num_samples:
        what = (f"method.num_clusters={k} x method.statdec.init_over={cfg.method.statdec.init_over} = {need} "
                f"initial centers" if need != k else f"method.num_clusters={k}")
        raise ConfigError(f"{what} is more than the dataset's {m.num_samples} samples ({cfg.data.train})")
    for url in cfg.data.eval.values():
        e = read_manifest(url)
        if e.image_shape is None or m.image_shape[2] != e.image_shape[2]:
            raise DatasetError(f"dataset {url} has images of shape {e.image_shape} (H, W, C), the training set "
                               f"{tuple(m.image_shape)}: an evaluation split needs the training set's channels "
                               f"and one image size")
    check_model(cfg, m)


def check_model(cfg: Config, m) -> None:
    """The backbone against the data and its weights, here rather than on every worker: a library backbone is
    built, model.weights loaded into it (what does not match is a WeightsError listing the keys) and model.freeze
    applied; what loading left out (a projection head) is printed."""
    from djc import features
    from djc.methods import REGISTRY
    from djc.methods.base import DataInfo
    from djc.models import zoo
    from djc.models.backbones import build_encoder
    from djc.step import views_input

    model = cfg.model
    if features.applies(cfg, REGISTRY[cfg.method.name].cls.takes_augmented(cfg.method.selected())) and cfg.data.on_corrupt == "skip":
        raise ConfigError("data.on_corrupt=skip: a frozen backbone's features are computed once for every image "
                          "(model.freeze=all); set model.cache_features=false to skip undecodable images instead")
    if cfg.augment.neighbors and not features.applies(cfg, REGISTRY[cfg.method.name].cls.takes_augmented(
            cfg.method.selected())):
        raise ConfigError(f"augment.neighbors={cfg.augment.neighbors} draws a sample's second view among its "
                          f"neighbours in features computed once: it needs model.freeze=all, augment.policy=none and "
                          f"model.cache_features=true")
    if cfg.augment.neighbors >= m.num_samples:
        raise ConfigError(f"augment.neighbors={cfg.augment.neighbors}: the training set has {m.num_samples} samples")
    if not (model.weights or zoo.library(model.backbone) or model.freeze not in ("all", "none")):
        return
    if cfg.method.name == "aecm" and not model.weights:
        return  # AE-CM uses a backbone only with weights
    info = DataInfo(m.num_samples, tuple(m.image_shape), m.num_classes, tuple(m.mean), tuple(m.std))
    try:
        side = views_input(cfg, info).size
        notes = build_encoder(model, (side, side, m.image_shape[2])).notes
    except WeightsError:
        raise
    except ValueError as err:  # a ViT's side, model.freeze=N beyond the blocks, ...: one line naming the keys
        raise ConfigError(str(err)) from None
    for note in notes:
        print(f"[djc] model.weights {model.weights}: {note}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# The TorchTrainer and its failures


def build_trainer(cfg: Config, run_dir: str, callbacks: list | None = None):
    """The TorchTrainer of one run; `callbacks` are Ray Train callbacks (djc tune passes Tune's reporter)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from djc.train import train_loop_per_worker

    t = cfg.trainer
    # Read by Ray in this process when the run starts and passed on to the controller (unless the user set it).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(t.poll_interval_s))
    # A run dir on S3 reaches Ray as fsspec's filesystem, so checkpoints use djc's endpoint and credentials.
    storage_path, storage_fs = storage.ray_storage(run_dir)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=ray_setup.worker_bundle(cfg)),
        run_config=ray.train.RunConfig(
            name=rundir.TRAIN_DIR, storage_path=storage_path, storage_filesystem=storage_fs,
            callbacks=list(callbacks or []),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            logging_config=ray.train.LoggingConfig(log_level=t.ray_log_level),
        ),
    )


def user_failure(err: BaseException, run_dir: str) -> RunError | None:
    """The one-line RunError for a run that failed on a worker with an error the user can fix (a corrupt shard,
    a checkpoint refused); None for anything else, which is a bug and keeps Ray's traceback."""
    for rank, failure in sorted(getattr(err, "worker_failures", {}).items()):
        base = getattr(failure, "_base_exc", failure)  # Ray wraps it with its traceback string
        if isinstance(base, USER_ERRORS):
            log = f"{run_dir}/{rundir.ERROR_LOG.format(rank=rank)}"
            return RunError(f"{str(base).splitlines()[0] if str(base) else type(base).__name__} "
                            f"(worker {rank}; full traceback in {log})")
    return None


def fit(cfg: Config, run_dir: str, callbacks: list | None = None) -> None:
    """Train to completion, resuming if `run_dir` holds a checkpoint. Ray must be up (ray_setup.ensure_ray)."""
    try:
        build_trainer(cfg, run_dir, callbacks).fit()
    except Exception as err:  # ray.train.WorkerGroupError: a worker raised
        failure = user_failure(err, run_dir)
        if failure is None:
            raise
        raise failure from None


def run(cfg: Config, run_dir: str, *, echo_config: bool = True) -> dict[str, Any]:
    """One whole run in `run_dir` (resolved config, datasets prepared and checked); returns metrics.json.

    The run owns its run dir throughout; a rerun continues the checkpoint there when the config allows it
    (djc/rundir.py), and only then is config.yaml rewritten."""
    storage.configure(cfg.storage)
    storage.require_bucket(run_dir)
    check_shared_storage(cfg, run_dir)
    with rundir.owned(run_dir):
        cfg = rundir.check_resume(cfg, run_dir)
        if dropped := rundir.drop_orphan_checkpoints(run_dir):
            print(f"[djc] removed {len(dropped)} checkpoint(s) that a killed run left unrecorded: "
                  f"{', '.join(dropped)}", flush=True)
        if echo_config:
            print(f"[djc] run dir: {run_dir}\n[djc] resolved config:\n{to_yaml(cfg)}", flush=True)
        runfiles.write_text(f"{run_dir}/config.yaml", to_yaml(cfg))
        if cfg.trainer.in_process:
            fit_in_process(cfg, run_dir)
        else:
            ray_setup.ensure_ray(cfg)
            ray_setup.check_resources(cfg)
            fit(cfg, run_dir)
    return runfiles.read_json(f"{run_dir}/metrics.json")


def fit_in_process(cfg: Config, run_dir: str) -> None:
    """Train to completion in this process, without Ray (trainer.in_process), resuming if `run_dir` holds a
    checkpoint. A user error raises as itself (the CLI prints its one line); its traceback is in the run dir."""
    import torch

    from djc.session import InProcessSession
    from djc.train import run_logged

    if cfg.trainer.use_gpu and not torch.cuda.is_available():
        raise ConfigError("trainer.use_gpu=true, but torch sees no CUDA device in this process (trainer.in_process "
                          "trains here): set trainer.use_gpu=false, or run where a GPU is")
    session = InProcessSession(run_dir, cfg.trainer.use_gpu, cfg.trainer.keep_checkpoints)
    run_logged({"config": to_dict(cfg), "run_dir": run_dir}, session)

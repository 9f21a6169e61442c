"""`djc predict RUN_DIR --data URL --out URL`: a trained run applied to a data set, new or not.

The method is rebuilt from the run's own config and its final checkpoint (the latest that Ray Train recorded in
RUN_DIR/train, read without running code), then the data set streams through `evaluate.predict_split`, the
function that wrote the run's own assignments.parquet: predicting the training set reproduces them exactly
(tests/test_predict.py). It runs in this process (`--workers 1`, the default: no Ray start-up, ~1 s for the
digits) or on N Ray Train workers (`--workers N`), on a GPU when there is one. OUT receives (docs/predict.md):

    assignments.parquet   index, split, label (-1 unknown), cluster (+ cluster_h1 ..), confidence, ood_score
    embeddings.npy        with --embeddings: (N, D) unit-length features, row i = assignments row i
    metrics.json          when the data set is labelled
    map.parquet, plots/   the cluster galleries, the 2-D map, cluster sizes (and confusion when labelled)

The training manifest (data.train of the run) must still be readable: it holds the normalisation and the
number of training samples the method's per-instance state was built with.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from typing import Any, NamedTuple

import numpy as np
import torch

from djc import checkpoint, dist, embedmap, evaluate, rundir, runfiles, storage
from djc.config import Config, ConfigError, from_dict
from djc.data.shards import DatasetError, Manifest, read_manifest

EMBEDDINGS_FILE = "embeddings.npy"


class Loaded(NamedTuple):
    cfg: Config  # the config the checkpoint was trained with
    method: Any  # the ClusteringMethod in eval mode, on its device
    views: Any  # djc.data.augment.ViewPair with the training set's normalisation
    train: Manifest  # the run's training manifest
    epoch: int  # the checkpoint's epoch


def final_checkpoint(run_dir: str) -> str:
    """URL of the state.pt of the latest checkpoint Ray Train recorded in the run dir."""
    snap = rundir.snapshot(run_dir)
    if snap is None:
        raise ConfigError(f"{run_dir} holds no checkpoint (no {rundir.SNAPSHOT}): train it first, or give the run "
                          f"dir that `djc train` wrote")
    name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    return f"{run_dir}/train/{name}/{checkpoint.CKPT_FILE}"


def load_run(run_dir: str, device: torch.device) -> Loaded:
    """The run's trained method as its evaluation saw it (on_train_end applied: AE-CM's averaged weights)."""
    from djc.step import build_method, run_views, to_device
    from djc.train import data_info

    state = checkpoint.load(final_checkpoint(run_dir), map_location=device)
    cfg = from_dict(state["config"])
    try:
        train = read_manifest(cfg.data.train)
    except (DatasetError, OSError) as err:
        raise DatasetError(f"the run's training manifest is needed for its normalisation and sizes, and "
                           f"{cfg.data.train} cannot be read: {str(err).splitlines()[0]}") from None
    info = data_info(train)
    method = to_device(build_method(cfg, info), cfg, device)
    method.load_state_dict(state["method"])
    method.on_train_end()
    method.eval()
    # The views the run trained and evaluated with (its normalisation and side), not the images' own.
    return Loaded(cfg, method, run_views(cfg, info), train, int(state["epoch"]))


def rerun_end(run_dir: str) -> dict[str, Any]:
    """`djc eval RUN --rerun`: the end of the run (evaluate.evaluate_run: predictions, baselines, metrics.json,
    pictures) again, from its final checkpoint, in this process, with the views the run's end used (its cached
    features when it had them). The run's own numbers come out the same; a baseline added to djc since the run
    is measured on it. Returns metrics.json."""
    from djc import features

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = load_run(run_dir, device)
    views = run.views
    if features.applies(run.cfg, run.method.augmented):  # as djc.train.make_inputs: the features computed once
        views = features.prepare(run.cfg, run.method, views, device, run_dir)
        run.method.features_in = True
    result = evaluate.evaluate_run(run.cfg, run.method, views, run_dir, device)
    assert result is not None  # one process: rank 0
    return result


def check_data(data: Manifest, train: Manifest) -> None:
    """The data set must have one image shape and the training set's channels (sizes are resized)."""
    if data.image_shape is None:
        raise DatasetError(f"dataset {data.url} has images of varying size; prepare it with "
                           f"`djc prepare folder --size {train.image_shape[0]}`")
    if data.image_shape[2] != train.image_shape[2]:
        raise DatasetError(f"dataset {data.url} has {data.image_shape[2]}-channel images, the run was trained on "
                           f"{train.image_shape[2]}-channel ones ({train.url})")


def split_name(cfg: Config, data_url: str) -> str:
    """The run's own name for the data set when it is one of its splits (so its rows read as in the run's
    assignments.parquet), else "predict"."""
    names = {url.rstrip("/"): name for name, url in cfg.data.splits().items()}
    return names.get(data_url.rstrip("/"), "predict")


# ---------------------------------------------------------------------------------------------------------
# The prediction, on every worker (or in this one process)


def predict_worker(job: dict[str, Any]) -> None:
    """What each worker runs; rank 0 writes OUT. A failure's traceback goes to OUT/logs/error-rank<r>.txt."""
    try:
        _predict(job)
    except BaseException:
        with contextlib.suppress(Exception):
            runfiles.write_text(f"{job['out']}/{rundir.ERROR_LOG.format(rank=dist.rank())}", traceback.format_exc())
        raise


def _device(job: dict[str, Any]) -> torch.device:
    if job["ray"]:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda" if job["gpu"] else "cpu")


def _predict(job: dict[str, Any]) -> None:
    device = _device(job)
    run = load_run(job["run_dir"], device)
    cfg, data, out = run.cfg, read_manifest(job["data"]), job["out"]
    storage.configure(cfg.storage)
    split = split_name(cfg, job["data"])
    local = evaluate.predict_split(job["data"], run.method, run.views, device, job["on_corrupt"], pixels=False)
    # The run's baselines on its features (k-means, knn-merge), applied to these images as to its own splits.
    extra = {col: fn(local["features"]) for col, fn in evaluate.feature_baselines(job["run_dir"], device).items()}
    rows = evaluate.gather_rows(local, split, extra)
    sample = (evaluate.map_sample(local, data.num_samples, cfg.eval.map_samples, cfg.seed)
              if cfg.eval.map != "none" else None)
    emb = None
    if job["embeddings"]:  # unit length, so that an inner-product index (faiss IndexFlatIP) ranks by cosine
        z = torch.nn.functional.normalize(local["features"], dim=1)
        emb = dist.all_gather_cat(z.to(getattr(torch, job["embeddings"]))).numpy()
    if not dist.is_main():
        return
    table = evaluate.write_predictions(out, rows, tuple(extra))
    if emb is not None:
        runfiles.write_npy(f"{out}/{EMBEDDINGS_FILE}", emb)
    coords = embedmap.project_splits({split: sample} if sample else {}, cfg.eval.map, cfg.seed)
    if coords is not None:
        runfiles.write_map(f"{out}/{evaluate.MAP_FILE}", coords)
    labelled = bool((table["label"] >= 0).any())
    result = evaluate.write_outputs(out, table, cfg.method.num_clusters, run.train.class_counts, split,
                                    evaluate.Pictures({split: job["data"]}, cfg.eval, coords), metrics_json=labelled)
    used = len(np.unique(table["cluster"]))
    print(f"[djc predict] {len(table['index'])} images of {job['data']} (split {split!r}) -> {used} of "
          f"{cfg.method.num_clusters} clusters, with the epoch-{run.epoch} model of {job['run_dir']}", flush=True)
    if labelled:
        print(evaluate.metrics_table(result), flush=True)


def _on_ray(job: dict[str, Any], workers: int, cfg: Config) -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from djc import launch, ray_setup

    ray_setup.ensure_ray(cfg)
    gpu = ray.cluster_resources().get("GPU", 0.0) >= workers
    cpus = cfg.trainer.cpus_per_worker
    if ray.cluster_resources().get("CPU", 0.0) < workers * cpus:
        raise ConfigError(f"--workers {workers} x trainer.cpus_per_worker={cpus} CPUs is more than the cluster's "
                          f"{ray.cluster_resources().get('CPU', 0.0):g}")
    storage_path, storage_fs = storage.ray_storage(job["out"])
    trainer = TorchTrainer(
        predict_worker, train_loop_config={**job, "ray": True},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu,
                                               resources_per_worker={"CPU": cpus} | ({"GPU": 1.0} if gpu else {})),
        run_config=ray.train.RunConfig(name="predict", storage_path=storage_path, storage_filesystem=storage_fs,
                                       logging_config=ray.train.LoggingConfig(log_level=cfg.trainer.ray_log_level)))
    try:
        trainer.fit()
    except Exception as err:
        failure = launch.user_failure(err, job["out"])
        if failure is None:
            raise
        raise failure from None


def run(run_dir: str, data: str, out: str, workers: int = 1, embeddings: str | None = None,
        on_corrupt: str = "error") -> None:
    """Predict `data` with the run in `run_dir` into `out` (module docstring). Checks before any worker starts."""
    from djc import launch

    run_dir, data = launch.absolute(run_dir.rstrip("/")), launch.absolute(data.rstrip("/"))
    out = launch.absolute(launch.out_url(out))
    final_checkpoint(run_dir)  # a run dir without one is refused here
    cfg = rundir.read_config(run_dir)
    storage.configure(cfg.storage)
    check_data(read_manifest(data), read_manifest(cfg.data.train))
    storage.require_bucket(out)
    job = {"run_dir": run_dir, "data": data, "out": out, "embeddings": embeddings, "on_corrupt": on_corrupt,
           "ray": False, "gpu": torch.cuda.is_available()}
    if workers == 1:
        predict_worker(job)
    else:
        _on_ray(job, workers, cfg)


def main(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: at least one")
    run(args.run_dir, args.data, args.out, args.workers, args.embeddings, args.on_corrupt)
    print(f"[djc predict] outputs in {args.out}", file=sys.stderr)
    return 0

"""`djc train --in-process`: the training loop in one process without Ray (djc/session.py's InProcessSession).
It must be the same run as one Ray Train worker, resume as a Ray run does, and leave a run dir that Ray, `djc
predict` and an object store read as they read Ray's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch

from djc import checkpoint, cli, rundir
from djc.config import ConfigError, load_config
from djc.runfiles import read_assignments

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "digits_lt.yaml")
SMALL = ["optim.frozen_epochs=0", "optim.warmup_epochs=1", "model.width=32", "method.secu.num_heads=2",
         "method.kmeans.restarts=1", "eval.map=none", "eval.gallery_pages=0", "trainer.threads_per_worker=1"]


def _train(tmp: Path, out: str, epochs: int, *extra: str) -> int:
    return cli.main(["train", JOB, "--out", out, f"data.train={tmp}/data/train", f"data.eval={{test: {tmp}/data/test}}",
                     f"optim.epochs={epochs}", *SMALL, *extra])


def _final_state(run_dir: str) -> dict:
    snap = rundir.snapshot(run_dir)
    name = snap["latest_checkpoint_result"]["checkpoint_dir_name"]
    return checkpoint.load(f"{run_dir}/{rundir.TRAIN_DIR}/{name}/{checkpoint.CKPT_FILE}")


def _assert_same_run(a: str, b: str) -> None:
    sa, sb = _final_state(a), _final_state(b)
    assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"])
    for key, value in sa["method"].items():
        assert torch.equal(value, sb["method"][key]), key
    ta, tb = read_assignments(f"{a}/assignments.parquet"), read_assignments(f"{b}/assignments.parquet")
    assert len(np.unique(ta["kmeans_features"])) > 2  # rows that differ: not one cluster compared with one
    for col in ("index", "cluster", "cluster_h1", "kmeans_features", "knn_merge"):
        np.testing.assert_array_equal(ta[col], tb[col], err_msg=col)


def test_in_process_needs_one_worker_and_is_not_for_a_search(capsys):
    with pytest.raises(ConfigError, match=r"trainer.in_process=true runs one process, but trainer.num_workers=2"):
        load_config(JOB, ["trainer.in_process=true"])
    assert cli.main(["tune", JOB, "--space", "secu", "trainer.in_process=true", "trainer.num_workers=1"]) == 2
    assert "djc tune runs its trials as Ray Tune trials" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_an_in_process_run_asking_for_a_gpu_it_lacks_fails_in_one_line(tmp_path, capsys):
    assert _train(tmp_path, str(tmp_path / "run"), 1, "--in-process", "trainer.use_gpu=true") == 2
    assert "trainer.use_gpu=true, but torch sees no CUDA device in this process" in capsys.readouterr().err


@pytest.mark.slow
def test_an_in_process_run_needs_neither_ray_nor_s3fs(tmp_path):
    """What the GPU machines lent to this project lack (Ray, s3fs, moto, Optuna, boto3) made unimportable: `djc
    train --in-process` still trains and writes its run dir."""
    code = ("import sys\n"
            "for m in ('ray', 's3fs', 'moto', 'optuna', 'boto3', 'botocore'):\n"
            "    sys.modules[m] = None\n"
            "from djc import cli\n"
            f"sys.exit(cli.main(['train', {JOB!r}, '--in-process', '--out', {str(tmp_path / 'run')!r}, "
            f"'data.train={tmp_path}/data/train', 'data.eval={{}}', 'optim.epochs=1', *{SMALL!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.json").is_file() and rundir.snapshot(str(tmp_path / "run")) is not None


@pytest.mark.slow
def test_an_in_process_epoch_is_a_ray_workers_epoch_and_each_runner_continues_the_other(ray_local, tmp_path):
    """A run taken to 1, 2 and 3 epochs in this process == the same with its 2nd epoch on one Ray Train worker,
    parameter for parameter and row for row: the Ray worker's epoch is this process's, Ray resumes from the
    checkpoint and record this process wrote, and this process from Ray's (one Ray fit: 30-45 s on 2 cores).
    Both take the same three steps because the schedule follows optim.epochs of each call."""
    ip, mixed = str(tmp_path / "ip"), str(tmp_path / "mixed")
    for epochs in (1, 2, 3):
        assert _train(tmp_path, ip, epochs, "--in-process") == 0
    assert _train(tmp_path, mixed, 1, "--in-process") == 0
    assert _train(tmp_path, mixed, 2, "trainer.num_workers=1") == 0
    assert _train(tmp_path, mixed, 3, "--in-process") == 0
    assert [json.loads(x)["epoch"] for x in Path(mixed, "resumes.jsonl").read_text().splitlines()] == [1, 2]
    _assert_same_run(ip, mixed)


@pytest.mark.slow
def test_an_in_process_run_on_s3_resumes_keeps_its_last_checkpoints_and_predicts(bucket, tmp_path):
    """The run dir on the loopback S3 server: checkpoints are uploaded, the record names the newest two
    (trainer.keep_checkpoints), older ones are deleted, a rerun resumes from S3, and `djc predict` (in this
    process) reads the run and reproduces its assignments."""
    out = f"{bucket}/run"
    assert _train(tmp_path, out, 1, "--in-process", "trainer.checkpoint_every=1") == 0
    assert _train(tmp_path, out, 3, "--in-process", "trainer.checkpoint_every=1") == 0
    fs, root = fsspec.core.url_to_fs(f"{out}/{rundir.TRAIN_DIR}")
    fs.invalidate_cache()
    dirs = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False) if "checkpoint_manager" not in p)
    snap = rundir.snapshot(out)
    assert dirs == sorted(r["checkpoint_dir_name"] for r in snap["checkpoint_results"]) and len(dirs) == 2
    assert [r["metrics"]["epoch"] for r in snap["checkpoint_results"]] == [2, 3]
    with fsspec.open(f"{out}/resumes.jsonl", "r") as f:
        assert [json.loads(x)["epoch"] for x in f.read().splitlines()] == [1]
    pred = tmp_path / "pred"
    assert cli.main(["predict", out, "--data", f"{tmp_path}/data/train", "--out", str(pred)]) == 0
    new, old = read_assignments(str(pred / "assignments.parquet")), read_assignments(f"{out}/assignments.parquet")
    on = old["split"] == "train"
    order_new, order_old = np.argsort(new["index"]), np.argsort(old["index"][on])
    np.testing.assert_array_equal(new["cluster"][order_new], old["cluster"][on][order_old])

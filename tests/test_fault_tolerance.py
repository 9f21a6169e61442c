"""A training worker killed mid-run: Ray restarts the worker group, the run resumes from its latest checkpoint
and ends with the outputs of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from djc import cli
from djc.runfiles import read_assignments, read_jsonl
from tests.procs import descendants, title

pytestmark = pytest.mark.slow

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "digits_lt.yaml")
EPOCHS = 12


def _args(tmp: Path, out: Path) -> list[str]:
    return ["train", JOB, "--out", str(out), f"data.train={tmp}/data/train", "data.eval={}",
            f"optim.epochs={EPOCHS}", "model.width=8", "method.secu.num_heads=2", "optim.warmup_epochs=1",
            "method.kmeans.restarts=1", "eval.baseline=false", "trainer.max_failures=1"]


def _train_workers() -> list[int]:
    """Training worker processes of the Ray instance this test session started (below this process)."""
    return [pid for pid in descendants(os.getpid()) if title(pid).startswith(b"ray::RayTrainWorker")]


def _registered_epoch(run: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has registered (a checkpoint written but not yet registered
    when a worker dies is not resumed from), read from the controller's snapshot in the run's storage."""
    try:
        snap = json.loads((run / "train" / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _kill_one_worker_after_epoch(run: Path, epoch: int, killed: dict) -> None:
    """SIGKILL one training worker once the checkpoint of `epoch` is registered, while later epochs still run."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        done, workers = _registered_epoch(run), _train_workers()
        if done >= epoch and workers:
            logged = read_jsonl(str(run / "metrics.jsonl"))
            killed.update(pid=workers[0], checkpoint=done, logged=max(m["epoch"] for m in logged))
            os.kill(workers[0], signal.SIGKILL)
            return
        time.sleep(0.02)


def test_a_killed_worker_resumes_from_the_checkpoint_and_ends_like_an_uninterrupted_run(ray_local, tmp_path,
                                                                                        monkeypatch):
    # The controller polls its workers every 2 s by default: 0.2 s lets a 0.3 s epoch's checkpoint register
    # (and the dead worker be noticed) while most of the 12 epochs are still ahead.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    ref, run = tmp_path / "ref", tmp_path / "killed"
    assert cli.main(_args(tmp_path, ref)) == 0

    killed: dict = {}
    killer = threading.Thread(target=_kill_one_worker_after_epoch, args=(run, 2, killed))
    killer.start()
    assert cli.main(_args(tmp_path, run)) == 0
    killer.join()

    # The kill landed mid-training, on a live worker process, after a checkpoint.
    assert killed and 2 <= killed["checkpoint"] <= killed["logged"] < EPOCHS, killed
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)

    # Resumed, not restarted: one resume, from that checkpoint (or a later one registered before the worker
    # group noticed the loss); each epoch logged once, the global step carried on, and every epoch's numbers
    # (loss; cluster sizes, which come from the per-instance memory and histogram) equal those of the run that
    # was never interrupted.
    resumes = read_jsonl(str(run / "resumes.jsonl"))
    assert len(resumes) == 1 and killed["checkpoint"] <= resumes[0]["epoch"] <= killed["logged"], resumes
    assert not (ref / "resumes.jsonl").exists()
    lines, ref_lines = read_jsonl(str(run / "metrics.jsonl")), read_jsonl(str(ref / "metrics.jsonl"))
    assert [m["epoch"] for m in lines] == list(range(1, EPOCHS + 1))
    for m, r in zip(lines, ref_lines):
        assert m["step"] == r["step"]
        assert m["loss"] == pytest.approx(r["loss"], rel=1e-5), m["epoch"]
        for k in ("min_cluster_size", "max_cluster_size", "empty_clusters"):
            assert m[k] == r[k], (m["epoch"], k)

    # Correct final outputs: the same assignments as the uninterrupted run.
    a, b = read_assignments(str(run / "assignments.parquet")), read_assignments(str(ref / "assignments.parquet"))
    order_a, order_b = np.argsort(a["index"]), np.argsort(b["index"])
    assert np.array_equal(a["index"][order_a], np.arange(len(order_a)))
    assert np.array_equal(a["cluster"][order_a], b["cluster"][order_b])
    assert (run / "metrics.json").is_file()

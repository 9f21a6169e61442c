"""Where a worker's training loop meets what runs it: its device and threads, the checkpoint it resumes from, and
where its metrics and checkpoints go. Two runners, one loop (djc/train.py):

- RaySession: a Ray Train worker (`djc train`, bench, tune): Ray's device, checkpoint and report.
- InProcessSession: one process and no Ray (`djc train --in-process`, `trainer.in_process=true`), for a machine
  without Ray (the GPU machines lent to this project have none), debugging, or a notebook. It writes the
  checkpoints and the record Ray Train writes (`train/checkpoint_*/`, `train/checkpoint_manager_snapshot.json`),
  so `djc predict`, `djc eval --rerun`, `model.weights=<run dir>` and a rerun that continues read its run dir
  as they read Ray's.

The loop knows nothing else about its runner.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from djc import rundir, runfiles


class RaySession:
    """The calls of a Ray Train worker."""

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def default_threads(self) -> int:
        return max(1, int(os.environ.get("DJC_THREADS_PER_WORKER", "1")))  # set by djc/ray_setup.py

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


class InProcessSession:
    """One process: the device the config asks for, checkpoints written under `<run_dir>/train` as Ray Train
    writes them, and the `keep` most recent kept."""

    def __init__(self, run_dir: str, use_gpu: bool, keep: int):
        self.run_dir, self.use_gpu, self.keep = run_dir, use_gpu, keep

    def device(self) -> torch.device:
        # launch.fit_in_process has refused use_gpu without CUDA before the run starts
        return torch.device("cuda", 0) if self.use_gpu else torch.device("cpu")

    def default_threads(self) -> int:
        return torch.get_num_threads()  # torch's own default: the machine's cores

    @contextlib.contextmanager
    def resume_dir(self) -> Iterator[Path | None]:
        snap = rundir.snapshot(self.run_dir)
        if snap is None:
            yield None
            return
        url = f"{self.run_dir}/{rundir.TRAIN_DIR}/{snap['latest_checkpoint_result']['checkpoint_dir_name']}"
        fs, path = fsspec.core.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            yield Path(path)
            return
        with tempfile.TemporaryDirectory() as d:  # an object store's checkpoint, copied down file by file (fsspec's
            for f in fs.find(path):                # recursive get nests a directory or not by implementation)
                local = Path(d, f[len(path.rstrip("/")) + 1:])
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f, str(local))
            yield Path(d)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is None:
            return  # metrics.jsonl already has them: the loop writes it on rank 0
        # The directory first, then the record that names it (one atomic write): a process killed in between
        # leaves an unrecorded directory, which the next run removes (rundir.drop_orphan_checkpoints), as with Ray.
        name = "checkpoint_" + datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        train = f"{self.run_dir}/{rundir.TRAIN_DIR}"
        fs, root = fsspec.core.url_to_fs(train)
        fs.makedirs(root, exist_ok=True)
        for f in sorted(p for p in Path(checkpoint_dir).rglob("*") if p.is_file()):  # file by file, as above
            dest = f"{root}/{name}/{f.relative_to(checkpoint_dir).as_posix()}"
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(f), dest)
        snap = rundir.snapshot(self.run_dir) or {}
        result = {"version": 0, "checkpoint_dir_name": name, "metrics": metrics}
        results = [*snap.get("checkpoint_results", []), result]
        kept, dropped = results[-self.keep:], results[:-self.keep]
        index = snap.get("current_report_index", 0) + 1
        record = {  # the fields of Ray Train 2.60's checkpoint_manager_snapshot.json
            "ray_version": snap.get("ray_version", _ray_version()), "checkpoint_results": kept,
            "checkpoint_report_indices": [*snap.get("checkpoint_report_indices", []), index - 1][-self.keep:],
            "latest_checkpoint_result": result, "pending_training_results": [], "pending_validation_specs": [],
            "current_report_index": index, "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [], "failed_validation_checkpoint_dir_names": []}
        runfiles.write_text(f"{self.run_dir}/{rundir.SNAPSHOT}", json.dumps(record))
        for old in dropped:
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{root}/{old['checkpoint_dir_name']}", recursive=True)


def _ray_version() -> str:
    try:
        from importlib.metadata import version

        return version("ray")
    except Exception:  # no Ray here: the record is still what Ray would read
        return "2.60.0"


Session = RaySession | InProcessSession

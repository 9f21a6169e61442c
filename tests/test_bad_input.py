"""What fails, and how: each case a user (or an attacker) can bring, with the one-line message and exit code it
must get. The README's "What fails, and how" table lists these cases; keep the two in step.

Security first: a planted pickle in a checkpoint is refused, not run; the local Ray instance listens on
loopback only; credentials in URLs are refused and never echoed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from PIL import Image

from djc import checkpoint, cli, rundir
from djc.runfiles import read_assignments
from tests.damage import with_bad_image

ROOT = Path(__file__).resolve().parents[1]
JOB = str(ROOT / "jobs" / "digits_lt.yaml")


def _small(tmp: Path, epochs: int = 2) -> list[str]:
    return [f"data.train={tmp}/data/train", f"data.eval={{test: {tmp}/data/test}}", f"optim.epochs={epochs}",
            "model.width=8", "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1"]


def _djc(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def _error_line(err: str) -> str:
    """The last line of stderr, which must be the whole message: `djc: error: ...`."""
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("djc: error: "), err[-2000:]
    return lines[-1]


class Payload:
    """A pickle that runs code when loaded: it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------------------
# A planted pickle


def test_checkpoint_load_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"method": Payload(marker), "optimizer": {}, "stream": {}, "epoch": 1, "step": 1},
               tmp_path / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="refusing to load .*state.pt: it holds objects other "
                                                         "than tensors .*GLOBAL posix.system"):
        checkpoint.load(tmp_path / "state.pt")
    assert not marker.exists()
    # What djc writes loads back.
    checkpoint.save(tmp_path, {"method": {"w": torch.ones(2)}, "optimizer": {"state": {}, "param_groups": []},
                               "stream": {"epoch": 1, "batch": 0, "seed": 0}, "epoch": 1, "step": 3,
                               "config": {"name": "x", "eps": 0.1, "hidden": [1, 2], "gpu": False, "s": None}})
    assert checkpoint.load(tmp_path / checkpoint.CKPT_FILE)["step"] == 3


def test_a_cifar_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    from djc.data.sources import cifar

    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    marker = tmp_path / "pwned"
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "batches.meta"]:
        with open(base / name, "wb") as f:
            pickle.dump({b"data": Payload(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR python-pickle batch that loads without "
                                         "running code: it asks for posix.system"):
        cifar(str(tmp_path), 10, "train")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Credentials in URLs: refused, never echoed


@pytest.mark.parametrize("args, fragment", [
    (["train", JOB, "trainer.ray_address=ray://admin:hunter2-secret@10.0.0.1:10001"], "trainer.ray_address holds "
                                                                                       "credentials"),
    (["train", JOB, "--out", "s3://AKIAXX:hunter2-secret@bucket/run"], "--out s3://...@... holds credentials"),
    (["eval", "s3://AKIAXX:hunter2-secret@bucket/run"], "djc eval s3://...@... holds credentials"),
    (["prepare", "digits", "--out", "s3://AKIAXX:hunter2-secret@bucket/ds"], "--out s3://...@... holds credentials"),
])
def test_credentials_in_urls_are_refused_and_never_echoed(capsys, args, fragment):
    code, out, err = _djc(capsys, *args)
    assert code == 2 and fragment in _error_line(err)
    assert "hunter2-secret" not in out + err


def test_an_error_message_never_shows_a_secret_of_a_url():
    assert cli.one_line(ValueError("cannot reach s3://KEY:SECRET@bucket/x and http://u:p@h:1/y")) == \
        "cannot reach s3://***@bucket/x and http://***@h:1/y"
    assert cli.one_line(PermissionError(13, "Permission denied", "/x/y")) == "Permission denied: /x/y"


# ---------------------------------------------------------------------------------------------------------
# Bad values and arguments, before anything starts


@pytest.mark.parametrize("args, message", [
    (["train", JOB, "optim.epochs=true"], "optim.epochs: expected a number, got a boolean"),
    (["train", JOB, "optim.lr=[1,"], "override 'optim.lr=[1,': the value is not valid YAML"),
    (["tune", JOB, "--space", "secu", "--samples", "-1"], "--samples -1: a search needs at least one trial"),
    (["tune", JOB, "--space", "secu", "--samples", "0"], "--samples 0: a search needs at least one trial"),
    (["prepare", "digits", "--out", "{tmp}/ds", "--imbalance-ratio", "0.5"], "imbalance"),
    (["prepare", "digits", "--out", "{tmp}/ds", "--size", "16"], "--size and --mode apply to folder sources"),
    (["train", JOB, "--out", "/sys/djc-run"], "/sys/djc-run"),
    (["train", JOB, "--out", "{tmp}/afile/run"], "{tmp}/afile/run: a parent of it is a file"),
])
def test_bad_arguments_get_one_line_and_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "afile").write_text("not a dir")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = _djc(capsys, *args, *([f"data.train={tmp_path}/data/train", "data.eval={}"]
                                         if args[0] == "train" else []))
    assert code == 2
    assert message.replace("{tmp}", str(tmp_path)) in _error_line(err)
    assert "Traceback" not in err


def test_bench_with_no_seeds_is_refused_and_keeps_the_table(tmp_path, capsys):
    (tmp_path / "quality.md").write_text("the last table\n")
    code, _, err = _djc(capsys, "bench", "quality", "--seeds", "0", "--out", str(tmp_path))
    assert code == 2 and "--seeds 0: a quality benchmark needs at least one seed" in _error_line(err)
    assert (tmp_path / "quality.md").read_text() == "the last table\n"


def test_a_bench_whose_last_run_is_invalid_fails_before_its_first(tmp_path, capsys):
    """Every run's config is built before the first trains: a bad value in the last run is an error in seconds,
    not after the runs before it."""
    # The first data set's run is valid; the second's batch of 7 cannot be split over the job's 2 workers.
    code, _, err = _djc(capsys, "bench", "quality", "--config", JOB, "--seeds", "1", "--out", str(tmp_path / "bench"),
                        "--data", f"ok:data.train={tmp_path}/data/train,data.eval={{}}",
                        "--data", f"odd:data.train={tmp_path}/data/train,data.eval={{}},data.batch_size=7")
    assert code == 2 and "data.batch_size=7 must be divisible by trainer.num_workers=2" in _error_line(err)
    assert not (tmp_path / "bench").exists()  # no run started


def test_a_damaged_assignments_file_is_one_line_for_djc_eval(tmp_path, capsys):
    from djc.config import Config, to_yaml
    from djc.data.prepare import prepare

    prepare("digits", str(tmp_path / "ds"), split="test", progress=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(Config(data={"train": str(tmp_path / "ds")})))
    (run / "assignments.parquet").write_bytes(b"PAR1 cut short")
    code, _, err = _djc(capsys, "eval", str(run))
    assert code == 2 and f"{run}/assignments.parquet is not readable Parquet" in _error_line(err)
    code, _, err = _djc(capsys, "eval", str(tmp_path / "nothing"))
    assert code == 2 and "is not a djc run dir: it has no config.yaml" in _error_line(err)


def test_checks_that_need_the_data_happen_before_ray(tmp_path, capsys):
    from djc.data.prepare import prepare

    prepare("digits", str(tmp_path / "ds"), imbalance_ratio=10, progress=False)  # 562 images
    code, _, err = _djc(capsys, "train", JOB, "--out", str(tmp_path / "r"), f"data.train={tmp_path}/ds",
                        "data.eval={}", "data.source=", "method.name=statdec", "method.num_clusters=200",
                        "data.batch_size=256")
    assert code == 2
    assert "method.num_clusters=200 x method.statdec.init_over=3 = 600 initial centers is more than the " \
           "dataset's 562 samples" in _error_line(err)
    assert not (tmp_path / "r").exists()  # refused before the run dir was touched
    # neighbour views need features computed once; augmented views recompute them each step
    code, _, err = _djc(capsys, "train", JOB, "--out", str(tmp_path / "r"), f"data.train={tmp_path}/ds",
                        "data.eval={}", "data.source=", "augment.neighbors=5")
    assert code == 2 and "augment.neighbors=5 draws a sample's second view among its neighbours in features " \
                          "computed once: it needs model.freeze=all, augment.policy=none" in _error_line(err)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------------------
# djc prepare folder: one image shape


def _image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def test_prepare_folder_makes_one_image_shape(tmp_path, capsys):
    from djc.data.shards import read_manifest

    src = tmp_path / "photos"
    for c in ("cat", "dog"):
        (src / c).mkdir(parents=True)
    _image(src / "cat" / "a.png", (40, 30))
    _image(src / "cat" / "b.jpg", (64, 48))
    _image(src / "dog" / "c.png", (40, 30))
    _image(src / "dog" / "d.png", (40, 30), mode="L")
    code, _, err = _djc(capsys, "prepare", "folder", "--root", str(src), "--out", str(tmp_path / "ds"))
    assert code == 2
    line = _error_line(err)
    assert f"images of different sizes: {src}/cat/a.png is 40x30, {src}/cat/b.jpg is 64x48" in line
    assert "pass --size N" in line

    code, _, err = _djc(capsys, "prepare", "folder", "--root", str(src), "--out", str(tmp_path / "ds"), "--size", "16")
    assert code == 0, err
    assert "1 gray and 3 colour images: converting all to RGB" in err
    m = read_manifest(str(tmp_path / "ds"))
    assert tuple(m.image_shape) == (16, 16, 3) and m.num_samples == 4

    code, _, err = _djc(capsys, "prepare", "folder", "--root", str(src), "--out", str(tmp_path / "gray"),
                        "--size", "8", "--mode", "gray")
    assert code == 0, err
    assert tuple(read_manifest(str(tmp_path / "gray")).image_shape) == (8, 8, 1)


def test_a_corrupt_jpeg_is_named_by_its_file(tmp_path, capsys):
    src = tmp_path / "flat"
    src.mkdir()
    _image(src / "good.jpg", (16, 16))
    data = (src / "good.jpg").read_bytes()
    (src / "broken.jpg").write_bytes(data[: len(data) // 3])  # the header parses; the pixels are cut short
    code, _, err = _djc(capsys, "prepare", "folder", "--root", str(src), "--out", str(tmp_path / "ds"))
    assert code == 2 and f"{src}/broken.jpg" in _error_line(err)


# ---------------------------------------------------------------------------------------------------------
# One run per run dir


def test_a_run_dir_is_owned_by_one_run_and_a_killed_owner_leaves_no_lock(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from djc import rundir
        with rundir.owned({str(run)!r}):
            print("held", flush=True)
            time.sleep(600)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = _djc(capsys, "train", JOB, "--out", str(run), *_small(tmp_path))
        assert code == 2
        assert f"run dir {run} is in use by another djc run (pid {holder.pid} on" in _error_line(err)
        assert not (run / "config.yaml").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean exit: the kernel drops the lock
        holder.wait()
    with rundir.owned(str(run)):
        pass


def test_a_lease_on_object_storage_is_refused_while_fresh_and_taken_over_when_stale(bucket, monkeypatch):
    import fsspec

    run = f"{bucket}/run"
    fs, root = fsspec.core.url_to_fs(run)
    other = {"owner": "someone-else", "host": "gpu-node-7", "pid": 4242, "since": time.time()}
    fs.pipe_file(f"{root}/{rundir.LOCK_FILE}", json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(rundir.RunDirError, match=f"run dir {run} is in use by another djc run \\(pid 4242 on "
                                                 f"gpu-node-7"):
        with rundir.owned(run):
            pass
    fs.pipe_file(f"{root}/{rundir.LOCK_FILE}",
                 json.dumps({**other, "heartbeat": time.time() - rundir.STALE_S - 1}).encode())
    with rundir.owned(run):
        mine = json.loads(fs.cat_file(f"{root}/{rundir.LOCK_FILE}"))
        assert mine["pid"] == os.getpid()
    assert not fs.exists(f"{root}/{rundir.LOCK_FILE}")  # released


def test_datasets_prepared_on_first_use_take_turns(tmp_path):
    """Two runs that prepare the same new dataset: the second waits for the first and finds it made (it used to
    be told to pass --overwrite)."""
    from djc.config import load_config
    from djc.data.prepare import dataset_exists, prepare
    from djc.launch import ensure_datasets

    url = str(tmp_path / "ds")
    cfg = load_config(JOB, [f"data.train={url}", "data.eval={}"])
    errors: list[BaseException] = []
    with rundir.owned(url):  # the first run, preparing
        t = threading.Thread(target=lambda: _catch(errors, ensure_datasets, cfg))
        t.start()
        time.sleep(1.0)
        assert t.is_alive() and not dataset_exists(url)  # waiting, not writing
        prepare("digits", url, imbalance_ratio=10, progress=False)
    t.join(60)
    assert not t.is_alive() and errors == []


def _catch(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - the test reports it
        errors.append(e)


# ---------------------------------------------------------------------------------------------------------
# Through real Ray workers


# The finished run the reruns below start from is trained in process (one worker, no Ray: 8 s against a Ray fit's
# 31 s of CI). tests/test_in_process.py shows a Ray worker continues such a run as it would its own; the planted
# checkpoint is still refused by a rerun through Ray, the runner users have by default.
ONE = "trainer.num_workers=1"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run dir, data dir) of a real 2-epoch run of the main job, shrunk, on one worker."""
    tmp = tmp_path_factory.mktemp("finished")
    run = tmp / "run"
    assert cli.main(["train", JOB, "--in-process", "--out", str(run), *_small(tmp)]) == 0
    return run, tmp


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


@pytest.mark.slow
def test_the_local_ray_instance_listens_on_loopback_only(ray_local):
    """Every socket the session's Ray processes listen on (GCS, raylet, workers, agents, dashboard) is bound to
    127.0.0.1. Without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in place before Ray starts, they listen on every
    interface with authentication off."""
    @ray_local.remote
    def pid() -> int:
        return os.getpid()

    ray_local.get(pid.remote())  # a worker process is up too
    me = psutil.Process()
    ours = {p.pid for p in me.children(recursive=True)} | {me.pid}
    bound = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
             if c.pid in ours and (c.status == psutil.CONN_LISTEN or c.type == 2)]  # TCP listeners, UDP sockets
    assert len(bound) >= 5, bound  # GCS, raylet, the worker, the dashboard and its agent at least
    names = {psutil.Process(p).name() for _, _, p in bound}
    assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), names
    exposed = [b for b in bound if b[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], f"listening beyond loopback: {exposed}"


@pytest.mark.slow
def test_a_planted_checkpoint_is_refused_in_one_line_and_its_code_never_runs(ray_local, finished_run, tmp_path,
                                                                             capsys):
    run, data = finished_run
    run = _copy(run, tmp_path / "run")
    snap = json.loads((run / rundir.SNAPSHOT).read_text())
    latest = run / "train" / snap["latest_checkpoint_result"]["checkpoint_dir_name"] / checkpoint.CKPT_FILE
    marker = tmp_path / "pwned"
    torch.save({"method": Payload(marker)}, latest)
    code, _, err = _djc(capsys, "train", JOB, "--out", str(run), *_small(data, 3), ONE)  # through a Ray worker
    assert code == 2
    line = _error_line(err)
    assert "refusing to load" in line and "it holds objects other than tensors and plain data" in line
    assert "full traceback in" in line and "Traceback" not in err
    assert not marker.exists()


@pytest.mark.slow
def test_a_rerun_that_changes_the_run_is_refused_before_anything_is_rewritten(finished_run, tmp_path, capsys):
    run, data = finished_run
    run = _copy(run, tmp_path / "run")
    before = (run / "config.yaml").read_bytes()
    code, _, err = _djc(capsys, "train", JOB, "--out", str(run), *_small(data, 3), ONE, "seed=1")
    assert code == 2
    assert (f"run dir {run} holds a run checkpointed at epoch 2, and this config changes what it was trained "
            f"with: seed (0 -> 1)") in _error_line(err)
    assert (run / "config.yaml").read_bytes() == before


@pytest.mark.slow
def test_a_rerun_with_fewer_epochs_says_what_it_does_and_keeps_config_true(finished_run, tmp_path, capsys):
    run, data = finished_run
    run = _copy(run, tmp_path / "run")
    orphan = run / "train" / "checkpoint_2000-01-01_00-00-00.000000"  # a killed driver's unrecorded upload
    orphan.mkdir()
    (orphan / checkpoint.CKPT_FILE).write_bytes(b"half")
    code, out, err = _djc(capsys, "train", JOB, "--in-process", "--out", str(run), *_small(data, 1))
    assert code == 0, err
    assert (f"run dir {run} is already trained to epoch 2 (optim.epochs=1 asks for fewer): nothing is trained, "
            f"the epoch-2 model is evaluated again and config.yaml keeps optim.epochs=2") in out
    assert "removed 1 checkpoint(s) that a killed run left unrecorded" in out and not orphan.exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 2
    assert [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_corrupt_images_fail_in_one_line_or_are_skipped_across_two_workers(ray_local, tmp_path, capsys):
    from djc.data.prepare import prepare

    url = str(tmp_path / "ds")
    prepare("digits", url, imbalance_ratio=10, progress=False)
    bad = with_bad_image(url, 0, 37)
    args = ["train", JOB, f"data.train={url}", "data.eval={}", "data.source=", "optim.epochs=2", "model.width=8",
            "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1"]

    code, _, err = _djc(capsys, *args, "--out", str(tmp_path / "strict"))
    assert code == 2
    line = _error_line(err)
    assert f"undecodable image at shard {url}/shard-00000.parquet row 37 (index {bad})" in line
    log = tmp_path / "strict" / "logs"
    assert f"full traceback in {log}/error-rank" in line
    assert "Traceback (most recent call last)" in next(log.glob("error-rank*.txt")).read_text()
    assert "Traceback" not in err and len(err.splitlines()) < 40, err[-3000:]

    code, _, err = _djc(capsys, *args, "--out", str(tmp_path / "skip"), "data.on_corrupt=skip")
    assert code == 0, err[-3000:]
    table = read_assignments(str(tmp_path / "skip" / "assignments.parquet"))
    assert sorted(table["index"].tolist()) == [i for i in range(562) if i != bad]
    assert (tmp_path / "skip" / "metrics.json").is_file()


@pytest.mark.slow
def test_a_run_beside_another_ray_instance_prints_no_ray_tracebacks(ray_local, tmp_path):
    """The session's instance is the other one: the run starts its own and says nothing of either."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "djc.cli", "train", JOB, "--out", str(tmp_path / "run"),
                           *_small(tmp_path, 1)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
    printed = done.stdout + done.stderr
    assert done.returncode == 0, printed[-3000:]
    assert "Found multiple active Ray instances" not in printed
    assert "Failed to query Ray Train Controller" not in printed
    assert "Traceback" not in printed, printed[-3000:]

"""`ray job submit` for real: a `ray start --head` on loopback, jobs/submit.sh, a job that trains and one that
asks for GPUs the cluster does not have; and the wrapper's own errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from djc.runfiles import read_jsonl
from tests.procs import descendants, title

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = str(ROOT / "jobs" / "submit.sh")
BIN = str(Path(sys.executable).parent)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The job's entrypoint runs the `python` on the PATH of the shell that started Ray: this interpreter's.
    env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               GLOO_SOCKET_IFNAME="lo", RAY_DEDUP_LOGS="0", **extra)
    return env


@pytest.fixture(scope="module")
def ray_head():
    """A head of its own on loopback: its own temp dir and ports; stopped by its own pid and its descendants."""
    tmp = tempfile.mkdtemp(prefix="djc-h", dir="/tmp")  # short: Ray puts unix sockets under it
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env = _free_ports(7)
    log = open(Path(tmp) / "ray-start.log", "w")
    head = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", "--num-cpus=2", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dash}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--runtime-env-agent-port={runtime_env}", f"--temp-dir={tmp}"],
        env=_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/api/version", timeout=2).read()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray start --head failed:\n" + (Path(tmp) / "ray-start.log").read_text())
                time.sleep(0.5)
        yield url
    finally:
        ours = descendants(head.pid)  # this head's processes only, never another Ray on the machine
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            head.kill()
        for pid in ours:  # what a slow graceful stop left behind
            if title(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(url: str, args: list[str], timeout: float = 400) -> tuple[str, subprocess.CompletedProcess]:
    job = f"djc-test-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([SUBMIT, *args], env=_env(RAY_ADDRESS=url, SUBMIT_ARGS=f"--submission-id {job}"),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return job, done


def _status(url: str, job: str) -> tuple[str, str]:
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    return str(client.get_job_status(job)).rsplit(".", 1)[-1], client.get_job_logs(job)


@pytest.mark.slow
def test_ray_job_submit_trains_on_the_cluster_and_refuses_gpus_it_lacks(ray_head, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    small = [f"data.train={data}/train", f"data.eval={{test: {data}/test}}", "optim.epochs=2", "model.width=8",
             "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1"]
    job, done = _submit(ray_head, ["jobs/digits_lt.yaml", "--out", str(out), *small])
    status, logs = _status(ray_head, job)
    assert status == "SUCCEEDED", done.stdout[-3000:] + done.stderr[-3000:]
    # The job ran the uploaded working dir's djc, joined this head, and wrote the run dir.
    assert "[djc] run dir: " + str(out) in logs and "balanced_acc" in logs
    assert [m["epoch"] for m in read_jsonl(str(out / "metrics.jsonl"))] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"train", "test"} and 0.0 <= metrics["acc"] <= 1.0
    assert (out / "assignments.parquet").is_file()

    # 2 workers x 1 GPU on a head without GPUs: a clear failure in seconds, not a job waiting forever.
    job, done = _submit(ray_head, ["jobs/digits_lt.yaml", "--out", str(tmp_path / "gpu"), *small,
                                   "trainer.use_gpu=true", "trainer.resource_wait_s=0"], timeout=180)
    status, logs = _status(ray_head, job)
    assert status == "FAILED"
    assert "the cluster cannot hold this run" in logs and "trainer.use_gpu=true" in logs and "0 GPUs" in logs


def test_submit_without_a_reachable_job_server_says_so(tmp_path):
    (port,) = _free_ports(1)
    done = subprocess.run([SUBMIT, "jobs/digits_lt.yaml"], env=_env(RAY_ADDRESS=f"http://127.0.0.1:{port}"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and f"no Ray job server at RAY_ADDRESS=http://127.0.0.1:{port}" in done.stderr
    done = subprocess.run([SUBMIT, "jobs/digits_lt.yaml"], env=_env(), capture_output=True, text=True, timeout=60,
                          cwd=ROOT)
    assert done.returncode == 2 and "RAY_ADDRESS is not set" in done.stderr
    outside = tmp_path / "job.yaml"
    outside.write_text("name: x\n")
    done = subprocess.run([SUBMIT, str(outside)], env=_env(RAY_ADDRESS=f"http://127.0.0.1:{port}"),
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "outside the repository" in done.stderr


def test_train_against_an_unreachable_ray_address_fails_in_seconds(tmp_path):
    (port,) = _free_ports(1)
    env = _env(RAY_ADDRESS=f"127.0.0.1:{port}",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "djc.cli", "train", "jobs/digits_lt.yaml", "--out",
                           str(tmp_path / "run"), f"data.train={tmp_path}/data"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"RAY_ADDRESS=127.0.0.1:{port}: no Ray cluster reachable there" in done.stderr
    assert time.monotonic() - started < 60  # not ray.init's minute of retries


def test_a_dashboard_url_in_ray_address_is_explained():
    from djc.config import ConfigError
    from djc.ray_setup import _check_reachable

    with pytest.raises(ConfigError, match="is the job server, for `ray job submit`"):
        _check_reachable("http://127.0.0.1:8265", "RAY_ADDRESS")


def test_more_gpus_than_the_local_instance_has_fails_before_fit(ray_local, tmp_path, capsys):
    from djc import cli

    code = cli.main(["train", "jobs/digits_lt.yaml", "--out", str(tmp_path / "run"), f"data.train={tmp_path}/data",
                     "data.eval={}", "trainer.use_gpu=true"])
    assert code == 2
    err = capsys.readouterr().err
    assert "the cluster cannot hold this run" in err and "trainer.use_gpu=true" in err and "0 GPUs" in err

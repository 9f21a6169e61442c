"""Two Ray nodes on one machine (ray.cluster_utils.Cluster: a head and a second raylet, each with its own
resources and processes, on 127.0.0.1), the two training workers on different nodes, run dir and data on the
loopback S3 server: a run completes; the node of one worker is killed mid-run (its raylet and every process on
it, not a worker asked to exit) and the run ends equal to the uninterrupted one; a local --out is refused before
training; the shard cache is per node (data.cache_dir expands a variable each node sets differently).

Each node offers 1 CPU and each worker asks for 1 (trainer.cpus_per_worker=1), so the workers cannot share a
node. The driver (a `djc train` subprocess with RAY_ADDRESS) attaches to the head, and so does Ray Train's
controller, so killing the second node takes exactly one worker with it; a third node then joins, as an
autoscaler would bring one, and the worker group restarts on the head and it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import numpy as np
import pytest

from djc import cli, ray_setup
from djc.data.shards import read_manifest
from djc.runfiles import read_assignments, read_json, read_jsonl

pytestmark = pytest.mark.slow

JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "digits_lt.yaml")
EPOCHS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_args(cache: Path) -> dict:
    # DJC_NODE_TMP reaches every process the node's raylet starts: the node's own "local disk".
    return {"node_ip_address": "127.0.0.1", "num_cpus": 1, "env_vars": {"DJC_NODE_TMP": str(cache)}}


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """Head + one more node; the S3 server's endpoint and credentials are in the environment the raylets (and so
    the workers) inherit."""
    from ray.cluster_utils import Cluster

    ray_setup._keep_on_loopback()  # every Ray port on 127.0.0.1, as djc's own local instance
    root = tmp_path_factory.mktemp("nodes")
    head = {**_node_args(root / "head"), "gcs_server_port": _free_port(), "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port()}
    c = Cluster(initialize_head=True, head_node_args=head)
    c.caches = {"head": root / "head"}
    c.second = c.add_node(**_node_args(root / "second"))
    c.caches["second"] = root / "second"
    c.root = root
    yield c
    c.shutdown()


def _train(cluster, *args: str, log: Path | None = None):
    """`djc train` in a subprocess that joins the cluster; with `log`, started in the background, its output there."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "djc.cli", "train", JOB, *args]
    if log is not None:
        return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _overrides(data: str, *extra: str) -> list[str]:
    return [f"data.train={data}", "data.eval={}", f"optim.epochs={EPOCHS}", "model.width=8",
            "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1", "eval.baseline=false",
            "trainer.max_failures=1", "trainer.cpus_per_worker=1", *extra]


def _registered_epoch(run: str) -> int:
    """The epoch of the latest checkpoint Ray Train has registered in the run's storage on S3."""
    try:
        fs, path = fsspec.core.url_to_fs(run)
        fs.invalidate_cache()
        return int(read_json(f"{run}/train/checkpoint_manager_snapshot.json")["latest_checkpoint_result"]
                   ["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _cached(d: Path) -> set[str]:
    return {p.name for p in (d / "cache").glob("*.parquet")} if (d / "cache").is_dir() else set()


@pytest.fixture(scope="module")
def data(cluster, s3_server) -> str:
    url = f"{s3_server.new_bucket()}/digits_lt10"
    assert cli.main(["prepare", "digits", "--out", url, "--imbalance-ratio", "10"]) == 0
    return url


def test_a_local_out_is_refused_before_training(cluster, data, tmp_path):
    t0 = time.time()
    r = _train(cluster, "--out", str(tmp_path / "run"), *_overrides(data))
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert "--out" in err and "is a local path, but the Ray cluster has 2 nodes" in err, err
    assert "cannot write this machine's disk" in err and "--out s3://" in err
    assert "storage.shared_filesystem=true" in err
    assert not (tmp_path / "run").exists() and "resolved config" not in r.stdout  # nothing written, no training
    # Declaring the filesystem shared passes this check: the run goes on to the next one (here, a batch larger
    # than the data set, so that nothing trains).
    r = _train(cluster, "--out", str(tmp_path / "run"), *_overrides(data, "storage.shared_filesystem=true",
                                                                      "data.batch_size=1000"))
    assert r.returncode == 2 and "data.batch_size=1000 is larger than the dataset" in r.stderr, r.stderr
    print(f"[test] refusals: {time.time() - t0:.0f} s")


def test_a_run_on_two_nodes_survives_losing_a_node_and_ends_like_an_uninterrupted_one(cluster, data, s3_server):
    bucket = s3_server.new_bucket()
    ref, run = f"{bucket}/runs/ref", f"{bucket}/runs/killed"
    t0 = time.time()
    r = _train(cluster, "--out", ref, *_overrides(data))
    assert r.returncode == 0, r.stdout[-3000:]
    t_ref = time.time() - t0

    # The same run with each node caching shards on its own disk, and the second node killed after a checkpoint
    # (from this thread: Ray starts a node only from the main thread), then a third node joining.
    log = cluster.root / "killed.log"
    proc = _train(cluster, "--out", run, *_overrides(data, "data.cache_dir=$DJC_NODE_TMP/cache"), log=log)
    killed: dict = {}
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None:
        if (done := _registered_epoch(run)) >= 2:
            killed.update(epoch=done, second_cache=_cached(cluster.caches["second"]))
            cluster.remove_node(cluster.second, allow_graceful=False)  # SIGKILL: its raylet and every worker on it
            cluster.third = cluster.add_node(**_node_args(cluster.root / "third"))
            break
        time.sleep(0.05)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    out = log.read_text()
    assert killed and 2 <= killed["epoch"] < EPOCHS, (killed, out[-2000:])

    # Each node read its shards through its own cache: the killed one had cached some before it went, the
    # head and the node that replaced it cache theirs; all are copies of the data set's shards.
    shards = {s.sha256 + ".parquet" for s in read_manifest(data).shards}
    head, third = _cached(cluster.caches["head"]), _cached(cluster.root / "third")
    assert killed["second_cache"] and head and third, (killed["second_cache"], head, third)
    assert killed["second_cache"] | head | third <= shards

    # Resumed once from a checkpoint, each epoch logged once, every epoch's numbers and the final clustering
    # equal to the uninterrupted run's (which read without a cache): the reads were the same, exactly once.
    resumes = read_jsonl(f"{run}/resumes.jsonl")
    assert len(resumes) == 1 and killed["epoch"] <= resumes[0]["epoch"] < EPOCHS, resumes
    lines, ref_lines = read_jsonl(f"{run}/metrics.jsonl"), read_jsonl(f"{ref}/metrics.jsonl")
    assert [m["epoch"] for m in lines] == list(range(1, EPOCHS + 1))
    for m, q in zip(lines, ref_lines):
        assert m["step"] == q["step"] and m["loss"] == pytest.approx(q["loss"], rel=1e-5), m["epoch"]
        assert (m["min_cluster_size"], m["max_cluster_size"]) == (q["min_cluster_size"], q["max_cluster_size"])
    a, b = read_assignments(f"{run}/assignments.parquet"), read_assignments(f"{ref}/assignments.parquet")
    oa, ob = np.argsort(a["index"]), np.argsort(b["index"])
    assert np.array_equal(a["index"][oa], np.arange(len(oa)))
    assert np.array_equal(a["cluster"][oa], b["cluster"][ob])
    assert read_json(f"{run}/metrics.json")["acc"] == pytest.approx(read_json(f"{ref}/metrics.json")["acc"])
    print(f"[test] two-node runs: uninterrupted {t_ref:.0f} s, with the node killed {time.time() - t0 - t_ref:.0f} s")

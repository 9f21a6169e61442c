"""Datasets, streams and run dirs on a real S3 server (moto's server mode on 127.0.0.1, tests/conftest.py):
signed HTTP requests, ranged GETs and real connection failures, no mocked client."""

from __future__ import annotations

import threading
from pathlib import Path

import fsspec
import fsspec.config
import pytest
import torch

from djc import cli, storage
from djc.config import ConfigError, StorageConfig, load_config
from djc.data.prepare import prepare
from djc.data.shards import CorruptDataError, DatasetError, read_manifest
from djc.data.stream import ShardStream
from djc.runfiles import read_jsonl
from tests.conftest import S3_CREDENTIALS
from tests.damage import with_bad_image
from tests.test_stream import B, s3_url, write_toy  # noqa: F401 (s3_url is a fixture)

# Exactly once over 2 ranks x 2 DataLoader workers and mid-epoch resume on S3: tests/test_stream.py (any_url).
JOB = str(Path(__file__).resolve().parents[1] / "jobs" / "digits_lt.yaml")


def read_all(url: str, **kw) -> list[dict]:
    return list(ShardStream(url, batch_size=64, shuffle=False, **kw))


def test_prepare_to_s3_reads_back_byte_identical(bucket, tmp_path, capsys):
    url = f"{bucket}/digits"
    assert cli.main(["prepare", "digits", "--out", url, "--imbalance-ratio", "10"]) == 0
    assert f"to {url}" in capsys.readouterr().out
    local = prepare("digits", str(tmp_path / "digits"), imbalance_ratio=10, progress=False)
    remote = read_manifest(url)
    assert remote.shards == local.shards  # same bytes: sizes and sha256 of every shard agree
    fs, root = fsspec.core.url_to_fs(url)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)) == \
        ["manifest.json"] + [s.path for s in local.shards]  # no temporary left behind
    a, b = read_all(url), read_all(str(tmp_path / "digits"))
    for key in ("index", "label", "image"):
        assert torch.equal(torch.cat([x[key] for x in a]), torch.cat([x[key] for x in b])), key
    assert sum(len(x["index"]) for x in a) == remote.num_samples == 562


def test_server_restart_mid_epoch_loses_and_repeats_nothing(s3_server, s3_url, monkeypatch, caplog):
    # botocore's own retries cut to its least (one retry after <= 1 s), so the outage reaches djc's retries.
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"retries": {"max_attempts": 1}}})
    # window=1 and prefetch 1: each 32-row group serves 2 batches, so reads go on through the whole epoch.
    stream = ShardStream(s3_url, batch_size=B, seed=5, window=1, prefetch_batches=1, retries=8)
    expected = [b["index"].tolist() for b in ShardStream(s3_url, batch_size=B, seed=5, window=1)]
    got, restart = [], threading.Timer(2.0, s3_server.start)
    try:
        for batch in stream:
            got.append(batch["index"].tolist())
            if len(got) == 3:
                s3_server.stop()  # connections refused (and open ones reset) for two seconds
                restart.start()
    finally:
        restart.join()
    assert got == expected  # the same batches in the same order: nothing lost, nothing repeated
    # The outage was met by djc's retries (how many depends on timing: botocore waits up to 1 s itself).
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert retries and "EndpointConnectionError" in retries[0]


def test_corrupt_shard_and_undecodable_image_on_s3(bucket):
    url = f"{bucket}/ds"
    write_toy(url, n=300, rows_per_shard=128)
    fs, root = fsspec.core.url_to_fs(url)
    shard = f"{root}/shard-00001.parquet"
    good = fs.cat_file(shard)
    fs.pipe_file(shard, good[: len(good) // 2])  # truncated: the listing shows it
    with pytest.raises(CorruptDataError, match=f"shard {url}/shard-00001.parquet is {len(good) // 2} bytes"):
        read_all(url)
    fs.pipe_file(shard, bytes(len(good)))  # garbage of the right size: reading shows it
    with pytest.raises(CorruptDataError, match=f"shard {url}/shard-00001.parquet is not readable Parquet"):
        read_all(url)

    fs.pipe_file(shard, good)
    bad = with_bad_image(url, 1, 37)
    with pytest.raises(CorruptDataError, match=f"shard {url}/shard-00001.parquet row 37 \\(index {bad}\\)"):
        read_all(url)
    got = read_all(url, on_corrupt="skip")
    assert sorted(i for b in got for i in b["index"].tolist()) == [i for i in range(300) if i != bad]
    assert sum(b["skipped"] for b in got) == 1

    fs.rm(shard)
    with pytest.raises(DatasetError, match=f"shard {url}/shard-00001.parquet .* is missing"):
        read_manifest(url)


def test_unknown_bucket_and_access_denied_name_the_url(s3_server, bucket, tmp_path, capsys):
    missing = f"s3://djc-no-such-bucket-{Path(bucket).name[-6:]}"
    with pytest.raises(storage.StorageError, match=f"bucket '{missing[5:]}' of {missing}/ds does not exist"):
        read_manifest(f"{missing}/ds")
    with pytest.raises(storage.StorageError, match="does not exist"):
        write_toy(f"{missing}/ds", n=10)
    assert not fsspec.filesystem("s3").exists(missing[5:])  # a typo never creates a bucket
    assert cli.main(["train", JOB, "--out", f"{missing}/runs/x"]) == 2
    assert f"of {missing}/runs/x does not exist" in capsys.readouterr().err

    from moto.core.authorization import enable_iam_authentication

    write_toy(f"{bucket}/ds", n=10)
    with enable_iam_authentication():  # the server now checks our key, which no IAM user owns
        fsspec.filesystem("s3").invalidate_cache()
        with pytest.raises(storage.StorageError, match=f"access denied reading {bucket}/ds/manifest.json"):
            read_manifest(f"{bucket}/ds")


def test_endpoint_from_the_config_and_no_credentials_in_urls(s3_server, s3_url, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setitem(fsspec.config.conf, "s3", {})  # restored after the test
    storage.configure(StorageConfig(endpoint_url=s3_server.endpoint))
    assert read_manifest(s3_url).num_samples == 1003
    with pytest.raises(ConfigError, match="data.train holds credentials"):
        load_config(JOB, ["data.train=s3://AKIA:secret@bucket/ds"])
    with pytest.raises(ConfigError, match="storage.endpoint_url holds credentials"):
        load_config(JOB, ["storage.endpoint_url=http://user:pw@127.0.0.1:9000"])


def _objects(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


@pytest.mark.slow
def test_train_with_data_and_run_dir_on_s3_then_resume(ray_local, s3_server, bucket, capsys):
    out = f"{bucket}/runs/digits"
    args = [f"data.train={bucket}/data/train", f"data.eval={{test: {bucket}/data/test}}",  # prepared on first use
            f"storage.endpoint_url={s3_server.endpoint}",  # Ray workers learn the endpoint from the config
            "model.width=8", "method.secu.num_heads=2", "optim.warmup_epochs=1", "method.kmeans.restarts=1"]
    assert cli.main(["train", JOB, "--out", out, "optim.epochs=2", *args]) == 0
    # Same --out, more epochs: resumes from the epoch-2 checkpoint on S3 (from scratch it would log 1, 2, 1, 2, 3).
    assert cli.main(["train", JOB, "--out", out, "optim.epochs=3", *args]) == 0
    printed = capsys.readouterr()

    files = _objects(out)
    for name in ("config.yaml", "metrics.jsonl", "metrics.json", "assignments.parquet",
                 "plots/cluster_sizes_train.png", "plots/confusion_test.png"):
        assert name in files, name
    lines = read_jsonl(f"{out}/metrics.jsonl")
    assert [m["epoch"] for m in lines] == [1, 2, 3] and lines[2]["step"] == 3 * lines[0]["step"]
    checkpoints = sorted(p for p in files if p.startswith("train/checkpoint_") and p.endswith("/state.pt"))
    assert len(checkpoints) == 2  # trainer.keep_checkpoints
    assert "train/checkpoint_manager_snapshot.json" in files

    # Credentials reached every process through the environment and were written nowhere: not in the run
    # dir, not in what was printed, not in the Ray session's logs and state.
    ctx = ray_local.runtime_context.get_runtime_context()
    session = Path(ctx.get_temp_dir()) / ctx.get_session_name()
    files |= {str(p): p.read_bytes() for p in session.rglob("*") if p.is_file() and not p.is_symlink()}
    assert any(name.endswith(".log") or name.endswith(".out") for name in files)  # the logs were looked at
    for secret in S3_CREDENTIALS.values():
        leaks = [name for name, data in files.items() if secret.encode() in data]
        assert not leaks, f"{secret[:8]}... written into {leaks}"
        assert secret not in printed.out + printed.err

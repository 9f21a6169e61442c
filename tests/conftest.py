"""Shared fixtures: one local Ray session for every test that starts Ray workers (each fit costs ~15 s of
start-up, so the suite shares one session and few fits), and a real S3 server on loopback. Tests marked `gpu`
are skipped, saying why, where torch sees no CUDA device."""

from __future__ import annotations

import os

import pytest

from djc.loopback_s3 import LoopbackS3

# Credentials for the loopback S3 server, in the environment before any Ray worker starts (workers inherit it,
# which is how they reach storage in production too). Distinctive values, so a test can prove that nothing
# djc or Ray writes contains them; and no test can reach a real AWS account with a user's own keys.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIADJCTESTKEYID0001", "AWS_SECRET_ACCESS_KEY": "djc-test-SECRET-f00d"}
os.environ.pop("AWS_PROFILE", None)
os.environ.update(S3_CREDENTIALS, AWS_DEFAULT_REGION="us-east-1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device here (torch.cuda.is_available() is False); "
                                   "benchmarks/gpu_check.sh runs the gpu tests on a GPU machine")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Every test starts with torch's default thread count: the equivalence and AE-CM tests set 1 (as a gloo worker
    runs), and the summation order of CPU kernels, so the last float bits, depends on it
    (tests/test_device.py compares two kernels' steps to 1e-4 and is measured at the default)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local():
    """The private local instance `djc train` starts (djc.ray_setup.ensure_ray), shared by the session."""
    import ray

    from djc.config import Config
    from djc.ray_setup import ensure_ray

    os.environ.pop("RAY_ADDRESS", None)
    ensure_ray(Config())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, found by this process through AWS_ENDPOINT_URL (standard AWS settings)."""
    server = LoopbackS3().start()
    before = os.environ.get("AWS_ENDPOINT_URL")
    server.use(S3_CREDENTIALS)
    yield server
    server.stop()
    if before is None:
        os.environ.pop("AWS_ENDPOINT_URL", None)
    else:
        os.environ["AWS_ENDPOINT_URL"] = before


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket for one test: s3://djc-<random>."""
    return s3_server.new_bucket()

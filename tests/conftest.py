"""Shared fixtures: one local Ray session for every test that starts Ray workers (each fit costs ~15 s of
start-up, so the suite shares one session and few fits)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"GLOO_SOCKET_IFNAME": "lo"}})
    yield ray
    ray.shutdown()

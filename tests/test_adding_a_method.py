"""A method added through the registry alone (tests/toy_method.py: its module and its registry entry) is a
first-class method: its config section is validated like the others, it trains through djc's one step, and it
passes the equivalence test (2 gloo workers == 1 worker on the concatenated batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from djc import config, methods
from djc.config import ConfigError
from djc.methods.base import DataInfo
from djc.optim import apply_lr, make_optimizer
from djc.step import build_method, train_step, wrap_ddp
from tests import toy_method
from tests.gloo import assert_two_workers_equal_one, state_tensors

N, B = 64, 16


@pytest.fixture
def toy():
    toy_method.register()
    yield
    methods.unregister("toy")


def _cfg(world: int, **toy) -> config.Config:
    return config.from_dict({
        "model": {"backbone": "smallconv", "width": 8, "proj_hidden": 32, "proj_dim": 16},
        "method": {"name": "toy", "num_clusters": 4, "toy": toy},
        "optim": {"name": "sgd", "lr": 0.1}, "data": {"batch_size": B}, "trainer": {"num_workers": world},
    })


def test_the_toy_is_configured_like_any_method(toy):
    cfg = _cfg(1, momentum=0.5)
    assert cfg.method.toy.momentum == 0.5 and cfg.method.selected() is cfg.method.toy
    assert "toy:" in config.to_yaml(cfg)
    with pytest.raises(ConfigError, match="method.toy.temperature: Input should be greater than 0"):
        _cfg(1, temperature=-1.0)
    with pytest.raises(ConfigError, match="unknown config key 'method.toy.momentun' \\(did you mean "
                                          "'method.toy.momentum'\\?\\)"):
        _cfg(1, momentun=0.5)


def test_without_its_entry_the_toy_is_unknown():
    with pytest.raises(ConfigError, match="method.name"):
        config.from_dict({"method": {"name": "toy"}})


def toy_steps(rank: int, world: int) -> dict[str, np.ndarray]:
    toy_method.register()  # a spawned worker imports djc afresh
    cfg = _cfg(world)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    model = wrap_ddp(method) if world > 1 else method
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 1.0)
    g = torch.Generator().manual_seed(7)
    lo, hi = rank * B // world, (rank + 1) * B // world
    for _ in range(3):  # steps 2 and 3 read the centers the earlier steps moved
        index = torch.randperm(N, generator=g)[:B]
        x1, x2 = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
        train_step(model, method, opt, index[lo:hi], x1[lo:hi], x2[lo:hi])
    return {k: v.numpy() for k, v in state_tensors(method).items()}


@pytest.mark.slow
def test_the_toy_passes_the_equivalence_test(toy):
    single = assert_two_workers_equal_one(toy_steps)
    assert single["sizes"].sum() == 3 * 2 * B  # every view of every step counted once

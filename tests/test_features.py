"""Frozen features computed once (djc/features.py): a frozen backbone on plain views encodes every image once per
run (backbone forwards counted), the table is the same on 1 and 2 gloo workers, a rerun reads it back, and every
method trained on the cached features ends in the cluster state of the same run recomputing them at each step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from djc import evaluate, features
from djc.config import from_dict
from djc.data.shards import read_manifest
from djc.methods.base import EpochContext
from djc.optim import apply_lr, lr_factor, make_optimizer
from djc.step import build_method, to_device, train_step, wrap_ddp
from djc.train import data_info, make_inputs
from tests.gloo import run_gloo

CPU = torch.device("cpu")
METHODS = {  # small settings of each method for 562 digits, 8 steps per epoch
    "secu": {"secu": {"num_heads": 2}},
    "dcl": {},
    # the mixture on the cached features themselves, as the RGB pair runs it (jobs/shapes_lt_statdec.yaml)
    "statdec": {"statdec": {"init_over": 1, "pool_space": "backbone"}},
    "aecm": {"aecm": {"hidden": [32, 32], "code_dim": 4, "pretrain_epochs": 0, "cm_epochs": 1}},
    "p2ot": {"p2ot": {"bank_batches": 2}},
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from djc.data.prepare import prepare

    url = str(tmp_path_factory.mktemp("data") / "digits_lt10")
    prepare("digits", url, imbalance_ratio=10, progress=False)
    return url


@pytest.fixture(scope="module")
def encoder_weights(tmp_path_factory) -> str:
    """A small convnet's random weights as a file: the run's model.weights (AE-CM takes a backbone only with them)."""
    from djc.models.backbones import build_backbone

    torch.manual_seed(7)
    path = str(tmp_path_factory.mktemp("weights") / "smallconv.pth")
    torch.save(build_backbone("smallconv", (8, 8, 1), 8).net.state_dict(), path)
    return path


def _tree(data: str, weights: str, method: str, cache: bool = True) -> dict:
    return {"data": {"train": data, "batch_size": 64},
            "model": {"backbone": "smallconv", "width": 8, "proj_hidden": 64, "proj_dim": 16, "weights": weights,
                      "freeze": "all", "cache_features": cache},
            "augment": {"policy": "none"},
            "method": {"name": method, "num_clusters": 4, **METHODS[method]},
            "optim": {"epochs": 2, "warmup_epochs": 0, "frozen_epochs": 0},
            "trainer": {"num_workers": 1}}


def train_run(rank: int, world: int, tree: dict, run_dir: str, only_table: bool = False) -> dict[str, np.ndarray]:
    """The training story's inputs (djc/train.py make_inputs) and loop on this process, Ray aside: the method's
    final state, with the backbone forwards counted while the inputs were made and while it trained."""
    torch.manual_seed(0)
    cfg = from_dict(tree)
    manifest = read_manifest(cfg.data.train)
    method = to_device(build_method(cfg, data_info(manifest)), cfg, CPU)
    calls = {"n": 0}
    method.backbone.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    opt = make_optimizer(cfg, method)
    views, loader = make_inputs(cfg, method, manifest, CPU, run_dir)
    forwards_inputs = calls["n"]
    if only_table:
        return {"table": views.train.features.numpy(), "order": views.order(), "forwards": np.array(forwards_inputs)}
    model = wrap_ddp(method) if world > 1 else method

    def map_train(fn):
        method.eval()
        out = evaluate.map_split(cfg.data.train, fn, views, CPU)
        method.train()
        return out

    step = 0
    for epoch in range(cfg.optim.epochs):
        loader.set_epoch(epoch)
        method.on_epoch_start(EpochContext(epoch, cfg.optim.epochs, loader.steps_per_epoch, map_train))
        method.train()
        for n, batch in enumerate(loader, 1):
            apply_lr(opt, lr_factor(cfg, step, loader.steps_per_epoch))
            x1, x2 = views.for_batch(method, batch, CPU, step, rank)
            train_step(model, method, opt, batch["index"], x1, x2)
            step += 1
            if n == loader.steps_per_epoch:
                break
    state = {k: v.detach().numpy() for k, v in method.state_dict().items() if not k.startswith("backbone.")}
    return {**state, "forwards_inputs": np.array(forwards_inputs), "forwards": np.array(calls["n"])}


def test_features_are_computed_once_then_read_back(digits, encoder_weights, tmp_path):
    tree = _tree(digits, encoder_weights, "secu")
    first = train_run(0, 1, tree, str(tmp_path))
    # 562 images in 2 encoder passes (512 + 50), and none in 16 training steps and the epoch starts
    assert first["forwards_inputs"] == 2 and first["forwards"] == 2
    stored = list((tmp_path / "features").glob("train-*.pt"))
    assert len(stored) == 1
    again = train_run(0, 1, tree, str(tmp_path))  # a rerun in the same run dir: read back, no forward at all
    assert again["forwards"] == 0
    for k, v in first.items():
        if not k.startswith("forwards"):
            np.testing.assert_array_equal(again[k], v, err_msg=k)
    recompute = train_run(0, 1, _tree(digits, encoder_weights, "secu", cache=False), str(tmp_path / "r"))
    assert recompute["forwards_inputs"] == 0 and recompute["forwards"] == 16  # one per step


@pytest.mark.slow
def test_the_table_is_the_same_on_one_and_two_workers(digits, encoder_weights, tmp_path):
    tree = _tree(digits, encoder_weights, "secu")
    one = train_run(0, 1, tree, str(tmp_path / "one"), True)
    w0, w1 = run_gloo(train_run, 2, tree, str(tmp_path / "two"), True)
    assert w0["forwards"] == w1["forwards"] == 1  # 281 images each, one pass
    np.testing.assert_array_equal(one["order"], w0["order"])
    for w in (w0, w1):  # each worker encodes 281 images, one worker 512 + 50: the same numbers
        np.testing.assert_array_equal(w["table"], one["table"])


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_a_run_on_cached_features_ends_where_the_run_recomputing_them_does(method, digits, encoder_weights,
                                                                           tmp_path):
    cached = train_run(0, 1, _tree(digits, encoder_weights, method), str(tmp_path / "cached"))
    recomputed = train_run(0, 1, _tree(digits, encoder_weights, method, cache=False), str(tmp_path / "recomputed"))
    assert cached["forwards"] == 2 and recomputed["forwards"] >= 16  # at least one per step
    for k, v in recomputed.items():  # every parameter and buffer, to the bit
        if not k.startswith("forwards"):
            np.testing.assert_array_equal(cached[k], v, err_msg=k)


def test_neighbor_views_are_mined_once_and_drawn_per_sample_and_step(digits, encoder_weights, tmp_path,
                                                                     monkeypatch):
    """augment.neighbors: the k nearest rows of the cached table (computed in blocks: the same as one N x N
    ranking), and a sample's second view one of them, picked from (seed, step, index) alone: the same whether the
    sample's batch is whole or split over workers. A run with them trains on other pairs than one without."""
    f = torch.randn(50, 6)
    sim = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(f, dim=1).T
    want = sim.fill_diagonal_(-2.0).topk(4, dim=1).indices
    monkeypatch.setattr(features, "NEIGHBOR_BLOCK", 7)  # blocks of 7 rows, the last one short
    assert torch.equal(features.nearest_neighbors(f, 4), want)

    tree = _tree(digits, encoder_weights, "secu")
    tree["augment"]["neighbors"] = 5
    cfg = from_dict(tree)
    manifest = read_manifest(cfg.data.train)
    method = to_device(build_method(cfg, data_info(manifest)), cfg, CPU)
    views, _ = make_inputs(cfg, method, manifest, CPU, str(tmp_path / "n"))
    table, nbr = views.train.features, views.neighbors
    assert nbr.shape == (562, 5) and not (nbr == torch.arange(562)[:, None]).any()
    index = torch.randperm(562)[:64]
    x1, x2 = views.for_batch(method, {"index": index}, CPU, 3, 0)
    assert torch.equal(x1, table[index].float())
    picked = features.pick(index, 3, cfg.seed, 5)
    assert torch.equal(x2, table[nbr[index, picked]].float())
    halves = [views.for_batch(method, {"index": part}, CPU, 3, r)[1] for r, part in enumerate(index.chunk(2))]
    assert torch.equal(torch.cat(halves), x2)  # per sample, not per batch position or worker
    assert not torch.equal(features.pick(index, 4, cfg.seed, 5), picked)  # a new draw each step

    with_nbr = train_run(0, 1, tree, str(tmp_path / "a"))
    without = train_run(0, 1, _tree(digits, encoder_weights, "secu"), str(tmp_path / "b"))
    assert with_nbr["forwards"] == 2  # still computed once
    assert not np.array_equal(with_nbr["heads.0.weight"], without["heads.0.weight"])


def test_the_selection_score_on_cached_features_is_the_one_computed_from_images(digits, encoder_weights, tmp_path):
    """The stability of select_score compares a sample's clusters on its plain view and on one augmented view. With
    cached features that view's features are encoded once too (one more pass over eval.select_split); before, a
    cached sample was compared with itself, stability read 1 and select_score K_used / K alone. The cached run's
    selection metrics equal those of the same run recomputing features from the images, and stability is < 1."""
    from djc import selection

    def measure(cache: bool, run_dir: str) -> tuple[dict, int]:
        torch.manual_seed(0)
        tree = _tree(digits, encoder_weights, "statdec", cache=cache)  # its centres start from k-means
        tree["eval"] = {"select_split": "train"}
        cfg = from_dict(tree)
        manifest = read_manifest(cfg.data.train)
        method = to_device(build_method(cfg, data_info(manifest)), cfg, CPU)
        calls = {"n": 0}
        method.backbone.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        views, loader = make_inputs(cfg, method, manifest, CPU, run_dir)
        method.eval()
        method.on_epoch_start(EpochContext(0, 2, loader.steps_per_epoch,
                                           lambda fn: evaluate.map_split(cfg.data.train, fn, views, CPU)))
        n = calls["n"]
        return selection.selection_metrics(method, cfg.data.train, views, CPU, 4), n

    cached, passes = measure(True, str(tmp_path / "cached"))
    assert passes == 4  # 562 images twice (512 + 50 each): the plain table and the fixed views' table
    assert len(list((tmp_path / "cached" / "features").glob("train-view-*.pt"))) == 1
    again, passes = measure(True, str(tmp_path / "cached"))
    assert passes == 0 and again == cached  # both tables read back
    recomputed, _ = measure(False, str(tmp_path / "recomputed"))
    assert 0.0 < cached["select_stability_nmi"] < 1.0
    for k, v in recomputed.items():
        assert cached[k] == pytest.approx(v, abs=1e-6), k

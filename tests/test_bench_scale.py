"""`djc bench scale`: the step's split into encoder and cluster side is faithful, the census counts what a GPU
would run, and the CLI writes its tables on a small data set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from djc import cli
from djc.bench import scale_cells as C
from djc.bench.census import census
from djc.methods import REGISTRY
from djc.methods.base import DataInfo
from djc.optim import make_optimizer
from djc.step import train_step

INFO = DataInfo(600, (8, 8, 3), 10)


def test_census_counts_flops_bytes_and_real_syncs():
    a, w = torch.randn(64, 32, requires_grad=True), torch.randn(32, 100)
    y = torch.randint(0, 100, (64,))

    def step():
        logits = a @ w  # 2 x 64 x 32 x 100 FLOPs, and twice that for the gradient of a
        loss = F.cross_entropy(logits, y) + (F.one_hot(y, 100) * logits).sum()  # one_hot's range check: no sync
        loss.backward()
        loss.item()  # a sync
        (logits > 0).sum().tolist()  # a sync on a GPU, not a dispatched op on a CPU

    c = census(step)
    assert c.flops["fp32"] == 2 * 64 * 32 * 100 * 2 and c.flops["fp64"] == 0
    assert c.syncs == 2 and c.ops > 5 and c.bytes > 64 * 100 * 4
    assert c.device_seconds() > c.syncs * 20e-6 and c.host_seconds() == pytest.approx(c.ops * 6e-6)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_the_replayed_cluster_side_is_the_step_without_the_encoder(name):
    """The cluster side alone (encoder replayed from its recorded outputs) computes the full step's loss and
    cluster state update: the split times exactly the method's work."""
    torch.manual_seed(0)
    cfg = C.cell_config(name, 10, 32, ["model.width=8", "model.proj_hidden=32", "method.aecm.hidden=[32,32]"])
    x1, x2 = torch.rand(32, 3, 8, 8), torch.rand(32, 3, 8, 8)
    index = torch.arange(32)

    def fresh():
        m = C.build(cfg, INFO, 32)
        m.on_epoch_start(C.EpochContext(0, C.EPOCHS, 10, None))
        return m, make_optimizer(cfg, m)

    full, opt = fresh()
    ins, outs = C.record_parts(full, lambda: train_step(full, full, opt, index, x1, x2))
    replayed, opt2 = fresh()
    with C.replayed(replayed, outs):
        out = train_step(replayed, replayed, opt2, index, x1, x2)
    ref, _ = fresh()
    ref_out = train_step(ref, ref, make_optimizer(cfg, ref), index, x1, x2)
    assert set(outs) == ({"encoder", "decoder"} if name == "aecm" else {"backbone"})
    torch.testing.assert_close(out.loss, ref_out.loss)
    encoder = tuple(f"{n}." for n in C.ENCODER_PARTS)  # its batch-norm statistics move only where it runs
    for (n, a), (_, b) in zip(replayed.named_buffers(), ref.named_buffers()):  # the same cluster state update
        if not n.startswith(encoder):
            torch.testing.assert_close(a, b, msg=n)
    assert isinstance(replayed.backbone if name != "aecm" else replayed.encoder, torch.nn.Module)  # restored
    assert not any(isinstance(m, C.Replay) for m in replayed.modules())


@pytest.mark.slow
def test_cli_writes_the_tables(tmp_path, capsys):
    data = tmp_path / "digits"
    assert cli.main(["prepare", "digits", "--out", str(data), "--imbalance-ratio", "10"]) == 0
    assert cli.main(["bench", "scale", "--dataset", str(data), "--ks", "10", "--gpu-k", "10", "--methods",
                     "secu,p2ot", "--batch-size", "64", "--rounds", "1", "--out", str(tmp_path / "b")]) == 0
    table = (tmp_path / "b" / "scale.md").read_text()
    for line in ("| secu | 10 |", "| p2ot | 10 |", "cluster side against K", "k-means on pixels",
                 "one H100 / H200 at K = 10"):
        assert line in table, line
    assert "| K | k-means++ seeding s |" in capsys.readouterr().out
    assert cli.main(["bench", "scale", "--dataset", str(tmp_path / "nothing")]) == 2
    # --gpu-only: the census table alone, one row per method and batch
    assert cli.main(["bench", "scale", "--dataset", str(data), "--gpu-k", "10", "--methods", "p2ot", "--gpu-only",
                     "--out", str(tmp_path / "g")]) == 0
    table = (tmp_path / "g" / "scale.md").read_text()
    assert table.startswith("one H100 / H200 at K = 10") and "cluster side against K" not in table
    assert [line.split(" | ")[:2] for line in table.splitlines() if line.startswith("| p2ot")] == \
        [["| p2ot", "64"], ["| p2ot", "1024"]]


def test_the_gpu_table_has_a_row_per_census_batch():
    """run_cell stores the census keyed by batch (the per-GPU 64 and the global 1024): one row each, the share of
    a ResNet-50 step computed from that batch's estimate."""
    from djc.bench.scale_table import tables

    def census_row(ms: float) -> dict:
        return {"ops": 100, "syncs": 1, "flops": {"fp32": 1e9, "fp64": 0.0}, "bytes": 1e6, "device_s": ms / 1e3,
                "host_s": 0.6e-3}

    row = {"method": "secu", "k": 1000, "encoder_s": 1.0, "cluster_s": 0.1, "step_s": 1.1, "peak_rss": 2**20,
           "state": {"parameters": 0, "per_instance": 0, "other_buffers": 0, "optimizer": 0}, "collective_bytes": 0,
           "epoch": {"epoch_start_s": 0.0, "select_stats_s": 0.0, "checkpoint_bytes": 0, "checkpoint_s": 0.0},
           "heads_n_s": 0.0, "kmeans_features": {"total_s": 0.0},
           "end": {"metrics_s": 0.0, "plots_s": 0.0, "export_s": 0.0},
           "gpu": {1024: census_row(3.9), 64: census_row(0.2)}}
    shared = {"device": "cpu", "n": 1000, "classes": 10, "batch": 256, "read_decode_n_s": 0.0, "encode_n_s": 0.0,
              "resnet50_flops_per_image": 24.3e9, "gpu_k": 1000}
    lines = tables(shared, [row]).splitlines()
    step_ms = 24.3e9 * 2 * 64 / 790e12 * 1e3  # 3.9 ms
    rows = [ln for ln in lines if ln.startswith("| secu | 64 |") or ln.startswith("| secu | 1024 |")]
    assert [r.split(" | ")[1] for r in rows] == ["64", "1024"], lines[-4:]
    assert f"| {0.2 / step_ms:.1%} |" in rows[0] and f"| {3.9 / step_ms:.1%} (> 10%) |" in rows[1], rows

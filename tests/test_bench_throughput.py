"""`djc bench throughput` runs end to end on the CPU and counts what a step would send between workers."""

from __future__ import annotations

import torch

from djc import cli
from djc.bench.throughput import bench_case
from djc.config import load_config


def test_bench_case_times_both_loops_and_counts_collectives():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI on a CPU (and djc's training workers)
    cfg = load_config(None, ["model.backbone=resnet18_cifar", "data.batch_size=4", "trainer.num_workers=1",
                             "method.num_clusters=4", "method.secu.num_heads=3"])
    try:
        r = bench_case("resnet18_cifar", cfg, torch.device("cpu"), batch=4, steps=1, rounds=1, warmup=0)
    finally:
        torch.set_num_threads(threads)
    assert r["djc"] > 0 and r["reference"] > 0 and r["ratio"] > 0 and r["precision"] == "torch.float32"
    # SeCu's one gather per step: (index, 3 labels) int64 per sample, for its state update and for its centers'
    # gradients (heads of 8 and 12 clusters exceed the batch of 4: only their assigned columns are averaged)
    assert r["stats_bytes"] == 4 * (1 + 3) * 8
    bn_channels = 64 * 5 + 128 * 5 + 256 * 5 + 512 * 5 + 512  # ResNet-18's 20 BatchNorm2d + the head's BatchNorm1d
    assert r["bn_bytes"] == 2 * 4 * (2 * bn_channels + 21)  # (sum, sum of squares, count), forward and backward
    assert 45e6 < r["grad_bytes"] < 47e6  # 11.2M ResNet-18 parameters + 0.3M head + centers, float32


def test_cli_writes_the_table(tmp_path, capsys):
    assert cli.main(["bench", "throughput", "--models", "resnet18_cifar", "--batch-size", "4", "--rounds", "1",
                     "--out", str(tmp_path), "method.secu.num_heads=2"]) == 0
    table = (tmp_path / "throughput-cpu.md").read_text()
    assert table.startswith("device: ") and "| resnet18_cifar | 32 | 4 | float32 |" in table
    assert "djc / reference" in capsys.readouterr().out
    assert cli.main(["bench", "throughput", "--models", "vgg", "--out", str(tmp_path)]) == 2

"""The tables `djc bench scale` prints and writes to scale.md, from its rows (djc/bench/scale.py)."""

from __future__ import annotations

import math
from typing import Any

from djc.bench.census import DISPATCH_S, GPU, KERNEL_MIN_S, SYNC_S
from djc.methods import REGISTRY

AIM = 0.10  # the cluster side's share of a ResNet-50 step per GPU that the scale issue aims at


def _ms(s: float | None) -> str:
    return "-" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{1000 * s:,.1f}"


def _s(s: float | None) -> str:
    return "-" if s is None or (isinstance(s, float) and math.isnan(s)) else f"{s:,.2f}"


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _cells(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["method"] != "kmeans"]


def step_table(rows: list[dict]) -> list[str]:
    out = ["| method | K | encoder ms | cluster side ms | cluster / encoder | full step ms | replicated state MiB "
           "(params + per-instance + buffers + optimiser) | peak RSS MiB | collectives KiB / step |",
           "|" + "---|" * 9]
    for r in _cells(rows):
        if "skipped" in r:
            out.append(f"| {r['method']} | {r['k']} | skipped: {r['skipped']} |" + " |" * 6)
            continue
        st = r["state"]
        total = st["parameters"] + st["per_instance"] + st["other_buffers"] + st["optimizer"]
        out.append(f"| {r['method']} | {r['k']} | {_ms(r['encoder_s'])} | {_ms(r['cluster_s'])} | "
                   f"{r['cluster_s'] / r['encoder_s']:.2f} | {_ms(r['step_s'])} | {_mib(total)} ({_mib(st['parameters'])}"
                   f" + {_mib(st['per_instance'])} + {_mib(st['other_buffers'])} + {_mib(st['optimizer'])}) | "
                   f"{_mib(r['peak_rss'])} | {r['collective_bytes'] / 1024:,.1f} |")
    return out


def growth_table(rows: list[dict], ks: list[int]) -> list[str]:
    out = ["| method | " + " | ".join(f"cluster ms K={k}" for k in ks) + " | " +
           " | ".join(f"x {a} -> {b}" for a, b in zip(ks, ks[1:])) + " |",
           "|" + "---|" * (1 + len(ks) + len(ks) - 1)]
    for name in REGISTRY:
        by_k = {r["k"]: r.get("cluster_s") for r in _cells(rows) if r["method"] == name}
        if not by_k:
            continue
        vals = [by_k.get(k) for k in ks]
        ratios = [f"{b / a:.1f}" if a and b else "-" for a, b in zip(vals, vals[1:])]
        out.append(f"| {name} | " + " | ".join(_ms(v) for v in vals) + " | " + " | ".join(ratios) + " |")
    return out


def work_table(rows: list[dict]) -> list[str]:
    out = ["| method | K | epoch start s | init s (k-means + merges) | selection stats s | checkpoint MiB / s | "
           "heads over N s | k-means on features s | metrics s | plots s | export s |", "|" + "---|" * 11]
    for r in _cells(rows):
        if "skipped" in r:
            continue
        e, end = r["epoch"], r["end"]
        init = (f"{_s(e['init_kmeans_s'])} + {_s(e['init_merge_s'])}" if "init_kmeans_s" in e else "-")
        out.append(f"| {r['method']} | {r['k']} | {_s(e['epoch_start_s'])} | {init} | {_s(e['select_stats_s'])} | "
                   f"{_mib(e['checkpoint_bytes'])} / {_s(e['checkpoint_s'])} | {_s(r['heads_n_s'])} | "
                   f"{_s(r['kmeans_features']['total_s'])} | {_s(end['metrics_s'])} | {_s(end['plots_s'])} | "
                   f"{_s(end['export_s'])} |")
    return out


def kmeans_table(rows: list[dict]) -> list[str]:
    out = ["| K | k-means++ seeding s | one Lloyd iteration over N s | total s (restarts x (seeding + iters x "
           "iteration)) |", "|---|---|---|---|"]
    for r in rows:
        if r["method"] == "kmeans":
            out.append(f"| {r['k']} | {_s(r['seed_s'])} | {_s(r['iter_s'])} | {_s(r['total_s'])} |")
    return out


def gpu_table(shared: dict, rows: list[dict]) -> list[str]:
    k = shared["gpu_k"]
    per_gpu = 1024 // 16
    img = shared["resnet50_flops_per_image"]
    out = ["| method | batch | kernels / step | host syncs | fp32 GFLOP | fp64 GFLOP | MB touched | cluster side on "
           "the GPU ms (est.) | its host dispatch ms | ResNet-50 step ms (64 / GPU, 790 TFLOP/s) | GPU / step | "
           "host / step |", "|" + "---|" * 12]
    for r in _cells(rows):
        if r["k"] != k or "gpu" not in r:
            continue
        views = 2 if REGISTRY[r["method"]].cls.augmented else 1
        step_s = img * views * per_gpu / GPU["bf16"]
        for batch, g in sorted(r["gpu"].items(), key=lambda bg: int(bg[0])):  # the per-GPU and the global batch
            dev, host = g["device_s"] / step_s, g["host_s"] / step_s
            out.append(f"| {r['method']} | {batch} | {g['ops']:,} | {g['syncs']} | {g['flops']['fp32'] / 1e9:,.2f} | "
                       f"{g['flops']['fp64'] / 1e9:,.2f} | {g['bytes'] / 1e6:,.0f} | {_ms(g['device_s'])} | "
                       f"{_ms(g['host_s'])} | {_ms(step_s)} | {dev:.1%}{'' if dev <= AIM else ' (> 10%)'} | "
                       f"{host:.1%}{'' if host <= AIM else ' (> 10%)'} |")
    return out


def gpu_note(shared: dict[str, Any]) -> str:
    img = shared["resnet50_flops_per_image"]
    return (f"one H100 / H200 at K = {shared['gpu_k']}: the cluster side of the ImageNet job (16 GPUs x "
            f"64) in one process, counted op by op at the per-GPU batch (64: its local terms right, its gathered "
            f"ones too small) and at the global one (1024: the gathered terms right, the local ones an upper "
            f"bound). GPU time = sum of max(FLOPs / rate, bytes / {GPU['bytes'] / 1e12:.1f} TB/s, "
            f"{KERNEL_MIN_S * 1e6:.0f} us) + syncs x {SYNC_S * 1e6:.0f} us (fp32 {GPU['fp32'] / 1e12:.0f}, "
            f"fp64 {GPU['fp64'] / 1e12:.0f} TFLOP/s); host dispatch = kernels x {DISPATCH_S * 1e6:.0f} us, which "
            f"overlaps with the GPU's work unless a sync makes the host wait. ResNet-50 forward + backward at "
            f"224 px: {img / 1e9:.1f} GFLOP per image (FlopCounterMode), x 2 views (1 for AE-CM) x 64 images "
            f"per GPU / {GPU['bf16'] / 1e12:.0f} TFLOP/s = {_ms(img * 2 * 64 / GPU['bf16'])} ms (the fastest "
            f"a step can be: any slower step makes the shares smaller)")


def tables(shared: dict[str, Any], rows: list[dict]) -> str:
    ks = sorted({r["k"] for r in rows})
    if shared.get("gpu_only"):  # djc bench scale --gpu-only: the census table alone
        return "\n".join([gpu_note(shared), "", *gpu_table(shared, rows)])
    lines = [f"device: {shared['device']}; N = {shared['n']:,}, {shared['classes']} classes; global batch "
             f"{shared['batch']} in one process; encoder smallconv (32 -> 64 channels) at 16 px", "",
             f"shared by every method: read + decode N images {_s(shared['read_decode_n_s'])} s, the encoder over "
             f"them {_s(shared['encode_n_s'])} s" + (
                 f"; the whole bench: {shared['wall_s'] / 60:.1f} min of wall time, {shared['cpu_s'] / 60:.1f} min "
                 f"of CPU, load average {shared['load'][0]:.1f} at its end" if "wall_s" in shared else ""),
             "", "Times are CPU seconds of the bench's process (one thread): on a shared machine wall time also "
             "counts the waits for a core.",
             "", "step (medians of alternating rounds; ms per step)", "", *step_table(rows),
             "", "cluster side against K (x per step of K: ~10 is linear, ~100 quadratic)", "",
             *growth_table(rows, ks),
             "", "work outside the steps: per epoch (epoch start, StatDEC's one-time init, the selection score's "
             "statistics, a checkpoint) and at the end of the run", "", *work_table(rows),
             "", "k-means on pixels (the baseline), N rows of 768 values; timed on 16,384 rows and scaled", "",
             *kmeans_table(rows)]
    if any("gpu" in r for r in rows):
        lines += ["", gpu_note(shared), "", *gpu_table(shared, rows)]
    return "\n".join(lines)

"""Timing on a shared machine: interleaved rounds of several loops on one device, FLOPs of a step, the dense
matmul rate of the device, profiles. Used by `djc bench throughput`."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[int], object], steps: int, device: torch.device, start: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        fn(start + s)
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[int], object]], batch: int, steps: int, rounds: int, warmup: int,
                 device: torch.device, label: str) -> dict[str, float]:
    """Warm-up, then `rounds` rounds alternating which loop goes first; median img/s of each and of the per-round
    ratio other / djc (drift in the machine's speed cancels in it)."""
    for fn in fns.values():
        timed(fn, warmup, device, 1)
    rates: dict[str, list[float]] = {who: [] for who in fns}
    ratios = []
    for r in range(rounds):
        order = list(fns.items())[:: 1 if r % 2 == 0 else -1]
        t = {who: timed(fn, steps, device, 1 + warmup + r * steps) for who, fn in order}
        for who in fns:
            rates[who].append(batch * steps / t[who])
        other = next(who for who in fns if who != "djc")
        ratios.append(t[other] / t["djc"])
        print(f"[djc bench] {label} round {r + 1}/{rounds}: " + ", ".join(
            f"{who} {rates[who][-1]:.1f} img/s" for who in fns), flush=True)
    return {**{who: statistics.median(v) for who, v in rates.items()}, "ratio": statistics.median(ratios)}


def step_flops(fn: Callable[[int], object], step: int) -> int:
    """FLOPs of one call of fn (convolutions and matmuls, forward and backward, as torch's FlopCounterMode counts
    them: 2 per multiply-add); runs the step once more, untimed."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(step)
    return int(counter.get_total_flops())


def matmul_tflops(device: torch.device) -> tuple[float, str]:
    """The device's dense matmul rate at the step's precision: bf16 8192^3 on CUDA (tensor cores), float32 1024^3
    on a CPU. The ceiling the step's TFLOP/s is read against."""
    n, dtype, reps = (8192, torch.bfloat16, 50) if device.type == "cuda" else (1024, torch.float32, 3)
    g = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, f"{str(dtype).removeprefix('torch.')} {n}^3"


def profile_loops(fns: dict[str, Callable[[int], object]], device: torch.device, path: Path, why: str,
                  steps: int = 3, start: int = 10_000) -> None:
    """torch.profiler over `steps` steps of each loop: its ops by self time on the device (CUDA) or the host."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    parts = [f"# {path.stem}: {why}\n"]
    try:
        for who, fn in fns.items():
            with profile(activities=acts) as prof:
                for s in range(steps):
                    fn(start + s)
                sync(device)
            parts.append(f"## {who}: {steps} steps, ops by {key}\n\n"
                         + prof.key_averages().table(sort_by=key, row_limit=30) + "\n")
    except Exception as err:  # a profiler that fails must not cost the measurements around it
        parts.append(f"profiling failed: {type(err).__name__}: {err}")
    path.write_text("\n".join(parts))
    print(f"[djc bench] profile: {path} ({why})", flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"

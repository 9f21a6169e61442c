"""One cell of `djc bench scale`: a method at one K, measured in one process at a global batch of 256.

Times are CPU seconds of this process (time.process_time, one thread): on a machine shared with other jobs, wall
time would also count the waits for a core. The step is split by replaying the encoder: the encoder's modules (the backbone; AE-CM's encoder and decoder)
are swapped for `Replay`s that return their recorded outputs as fresh leaves, so `step.train_step` then runs
exactly the method's cluster side (heads, assignment, clustering losses and their backward down to the
features, the optimiser on the heads, the state update, the collectives' helpers) and nothing of the encoder.
The encoder side is the same modules' forward and backward on the same inputs (with a fixed upstream gradient)
and their optimiser step. Both are timed directly, in alternating rounds with the full step, medians kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from djc import dist
from djc.bench.census import census
from djc.config import Config, load_config
from djc.methods import REGISTRY
from djc.methods.base import ClusteringMethod, DataInfo, EpochContext, state_bytes
from djc.optim import make_optimizer
from djc.step import setup, train_step

ENCODER = ["model.backbone=smallconv", "model.width=32"]  # the fixed small encoder: 32 -> 64 channels
# Per method, the settings of its ImageNet-scale run: SeCu with one head (jobs/imagenet_lt.yaml: K <= the batch),
# AE-CM's joint stage from step 0 with its job's Adam (its default init pretrains the autoencoder alone first).
METHOD_SETTINGS = {"secu": ["method.secu.num_heads=1"],
                   "aecm": ["method.aecm.init=rand", "optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0"]}
EPOCHS = 100  # of the schedule the cells' methods are built for (StatDEC's init epoch: 20)
ENCODER_PARTS = ("backbone", "encoder", "decoder")  # the modules a method's encoder side consists of
SLOW_S = 5.0  # a warm-up step slower than this is timed once, not in rounds (K = 10,000 cells)
clock = time.process_time  # CPU seconds of this process (module docstring)


def cell_config(name: str, k: int, batch: int, overrides: list[str]) -> Config:
    """The cell's config. SeCu, DCL and P2OT refuse K above the global batch in a run (needs_k_le_batch); a cell
    validates them at batch max(batch, K) and builds them at `batch` (build), to measure the cost at K."""
    needs = REGISTRY[name].config.needs_k_le_batch
    return load_config(None, [f"method.name={name}", f"method.num_clusters={k}", "trainer.num_workers=1",
                              f"data.batch_size={max(batch, k) if needs else batch}", f"optim.epochs={EPOCHS}",
                              *ENCODER, *METHOD_SETTINGS.get(name, []), *overrides])


def build(cfg: Config, info: DataInfo, batch: int) -> ClusteringMethod:
    """step.build_method at a global batch of `batch` (cell_config)."""
    torch.manual_seed(cfg.seed)
    return REGISTRY[cfg.method.name].cls(cfg.method.selected(), dataclasses.replace(setup(cfg, info),
                                                                                     global_batch=batch))


class Replay(nn.Module):
    """Stands in for an encoder module: returns its recorded output as a new leaf (gradient stops here)."""

    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value.detach()

    def forward(self, *args: Any) -> Tensor:
        return self.value.requires_grad_(True)


@contextlib.contextmanager
def replayed(method: ClusteringMethod, outputs: dict[str, Tensor]) -> Iterator[None]:
    saved = {n: getattr(method, n) for n in outputs}
    try:
        for n, v in outputs.items():
            setattr(method, n, Replay(v))
        yield
    finally:
        for n, m in saved.items():
            setattr(method, n, m)


def record_parts(method: ClusteringMethod, run: Callable[[], object]) -> tuple[dict[str, tuple], dict[str, Tensor]]:
    """(inputs, outputs) of each encoder module of `method` during run() (its last call each)."""
    ins: dict[str, tuple] = {}
    outs: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, i: tuple, o: Tensor) -> None:  # None: the output stays as it is
            ins[name], outs[name] = tuple(t.detach() for t in i), o.detach()
        return hook

    hooks = [getattr(method, n).register_forward_hook(keep(n)) for n in ENCODER_PARTS
             if isinstance(getattr(method, n, None), nn.Module)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return ins, outs


def peak_rss_reset() -> None:
    """Give freed memory back to the OS and restart the kernel's peak-RSS counter (VmHWM) of this process."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss() -> int:
    """Bytes: the process's peak resident memory since the last peak_rss_reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _median_times(fns: dict[str, Callable[[int], object]], rounds: int) -> dict[str, float]:
    """Seconds per call of each fn: one warm-up call each, then `rounds` rounds alternating the order; medians.
    One round when a warm-up call took more than SLOW_S."""
    warm = [timed(lambda fn=fn: fn(0))[1] for fn in fns.values()]
    rounds = 1 if max(warm) > SLOW_S else rounds
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for name, fn in list(fns.items())[:: 1 if r % 2 == 0 else -1]:
            t0 = clock()
            fn(1 + r)
            times[name].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), CPU seconds it took)."""
    t0 = clock()
    out = fn()
    return out, clock() - t0


# ---------------------------------------------------------------------------------------------------------
# The step


def measure_step(cfg: Config, info: DataInfo, x1: Tensor, x2: Tensor, rounds: int) -> dict[str, Any]:
    """Encoder, cluster side and the full step (seconds), replicated state, what the cluster side asks of a
    device (census), and the method built (for the epoch and evaluation measurements)."""
    batch = x1.shape[0]
    method = build(cfg, info, batch)
    method.on_epoch_start(EpochContext(0, EPOCHS, 1000, map_train=None))
    opt = make_optimizer(cfg, method)
    index = torch.randperm(info.num_samples, generator=torch.Generator().manual_seed(0))[:batch]
    ins, outs = record_parts(method, lambda: train_step(method, method, opt, index, x1, x2))
    parts = {n: getattr(method, n) for n in outs}
    grads = {n: torch.randn(o.shape, generator=torch.Generator().manual_seed(1)) for n, o in outs.items()}
    enc_params = [p for m in parts.values() for p in m.parameters()]
    enc_opt = (torch.optim.SGD(enc_params, lr=0.0, momentum=cfg.optim.momentum) if cfg.optim.name == "sgd"
               else torch.optim.Adam(enc_params, lr=0.0))

    def encoder(_: int) -> None:
        enc_opt.zero_grad(set_to_none=True)
        loss = sum((parts[n](*ins[n]) * grads[n]).sum() for n in parts)
        loss.backward()
        enc_opt.step()

    def cluster(_: int) -> None:
        with replayed(method, outs):
            train_step(method, method, opt, index, x1, x2)

    def full(_: int) -> None:
        train_step(method, method, opt, index, x1, x2)

    t = _median_times({"full": full, "encoder": encoder, "cluster": cluster}, rounds)
    with dist.count_traffic() as traffic:
        cluster(0)
    cen = census(lambda: cluster(0))
    sb = state_bytes(method, info.num_samples)
    opt_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v))
    return {"method": method, "encoder_s": t["encoder"], "cluster_s": t["cluster"], "step_s": t["full"],
            "state": {**sb, "optimizer": opt_bytes}, "collective_bytes": sum(traffic.values()),
            "census": dataclasses.asdict(cen)}


def gpu_census(cfg: Config, info: DataInfo, batch: int) -> dict[str, Any]:
    """The census of one cluster-side step at a global batch of `batch` on one process, on random images: local
    and gathered terms both at `batch` (so at the per-GPU batch the gathered terms are too small, at the global
    batch the local ones too large: the bench reports both)."""
    method = build(cfg, info, batch)
    method.on_epoch_start(EpochContext(0, EPOCHS, 1000, map_train=None))
    opt = make_optimizer(cfg, method)
    g = torch.Generator().manual_seed(2)
    index = torch.randperm(info.num_samples, generator=g)[:batch]
    h, w, c = info.image_shape
    # Two different batches as the two views, as training has them: with one batch twice, P2OT's second plan
    # equals its first and a solve warm-started from it converges at once (a third of the real kernel count).
    x1, x2 = torch.randn(2, batch, c, h, w, generator=g)
    with torch.no_grad():
        _, outs = record_parts(method, lambda: method(index, x1, x2))

    def cluster() -> None:
        with replayed(method, outs):
            train_step(method, method, opt, index, x1, x2)

    for _ in range(3):  # banks and memories in their steady use, warm-started duals
        cluster()
    cen = census(cluster)
    return dataclasses.asdict(cen) | {"device_s": cen.device_seconds(), "host_s": cen.host_seconds()}

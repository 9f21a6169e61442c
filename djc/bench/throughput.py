"""`djc bench throughput`: images/s of djc's training step against a plain PyTorch loop doing the same work, side
by side in one process, reported as a ratio.

  djc step   the body of djc/train.py's loop: optim.apply_lr, ViewPair.for_method (the batched views on the
             device), step.train_step on the real method built by step.build_method and placed by
             step.to_device (GlobalBatchNorm backbone, ModuleList of heads, state update through djc.dist).
  reference  SeCu as research code writes it: torchvision's ResNet with plain BatchNorm, a projection head, the
             centers as plain tensors, SeCu's losses (the same pure functions) and its state update inline, the
             same batched views, SGD with the same groups, the same precision (autocast of the backbone, NHWC on
             CUDA).
Both start from the same uint8 batch on the device (decoding is the loader's work, the same for both). Rounds
alternate which loop goes first, so drift in the machine's speed cancels; the ratio is the median of the
per-round ratios. Also reported: the bytes each worker puts into collectives per step, cluster statistics and
global batch norm (counted by djc.dist) against DDP's all-reduce of every gradient; the FLOPs of one djc step
(torch's FlopCounterMode: convolutions and matmuls, forward and backward) and the rate they are done at, against a
dense matmul timed on the same device.

  --methods  every method's djc step against the plain loop of its network (PlainLoop: the same backbone and
             views without the cluster side), at the first model's setting. 1 - plain / djc is the share of the
             step that goes to the cluster side (statistics, assignments, Sinkhorn, cluster losses, state updates)
             and djc's own overhead (which SeCu's same-work ratio above measures alone).
  profiles   when SeCu's ratio is below 0.97 or a method's cluster side is above 10% of its step (--profile auto),
             torch.profiler summaries of both loops go to profile-<device>-<case>.txt: where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from djc import dist
from djc.bench.reference import PlainLoop, Reference
from djc.bench.timing import device_name, interleaved, matmul_tflops, profile_loops, step_flops
from djc.config import Config, ConfigError, load_config
from djc.data import views as V
from djc.data.augment import ViewPair
from djc.methods import REGISTRY
from djc.methods.base import DataInfo, EpochContext
from djc.optim import apply_lr, lr_factor, make_optimizer
from djc.step import build_method, to_device, train_step

# name -> (backbone, stored image side, view side); ImageNet images are prepared at 256 and cropped to 224
CASES = {"resnet18_cifar": ("resnet18_cifar", 32, 32), "resnet50": ("resnet50", 256, 224)}
# per device and model: batch size (global = local: one process), timed steps per round, rounds; warm-up steps.
# On a CPU, one step per round and many rounds: a machine shared with other jobs drifts within seconds.
# `methods`: what --methods means when not given (on a CPU each method adds two more slow timed loops).
DEFAULTS = {"cpu": {"resnet18_cifar": (16, 1, 16), "resnet50": (8, 1, 12), "warmup": 1, "methods": ""},
            "cuda": {"resnet18_cifar": (512, 20, 5), "resnet50": (256, 10, 5), "warmup": 5, "methods": "all"}}
METHOD_NAMES = tuple(REGISTRY)  # every registered method (djc/methods/__init__.py)
# What a method's step needs beyond the defaults to run its whole loss from step 0: AE-CM's joint stage (its
# default init pretrains the autoencoder alone first) with its job's Adam (jobs/digits_lt_aecm.yaml).
METHOD_SETTINGS = {"aecm": ["method.aecm.init=rand", "optim.name=adam", "optim.lr=0.001", "optim.weight_decay=0"]}
MIN_RATIO = 0.97  # below it, SeCu's step is profiled against its same-work reference
MAX_CLUSTER_SHARE = 0.10  # above it, a method's step is profiled against its plain loop
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


class DjcLoop:
    """The body of djc/train.py's loop on one fixed uint8 batch: optim.apply_lr, ViewPair.for_method (the batched
    views on the device), step.train_step on the method built by step.build_method and placed by
    step.to_device. `step(s)` runs global step s."""

    def __init__(self, cfg: Config, device: torch.device, side: int, batch: int, num_samples: int):
        info = DataInfo(num_samples, (side, side, 3), cfg.method.num_clusters)
        self.cfg, self.device = cfg, device
        self.method = to_device(build_method(cfg, info), cfg, device)
        self.method.on_epoch_start(EpochContext(0, cfg.optim.epochs, 1000, map_train=None))
        self.opt = make_optimizer(cfg, self.method)
        self.views = ViewPair(cfg, MEAN, STD, side)
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8).to(device)
        self.index = torch.randperm(num_samples, generator=g)[:batch].to(device)
        self.mean, self.std = (torch.tensor(v, device=device) for v in (MEAN, STD))  # for the plain loops' views
        self.logs: list[Tensor] = []  # what the loop accumulates between host syncs

    def step(self, step: int) -> None:
        apply_lr(self.opt, lr_factor(self.cfg, step, 1000))
        x1, x2 = self.views.for_method(self.method, self.images, step, 0)
        o = train_step(self.method, self.method, self.opt, self.index, x1, x2)
        self.logs.append(torch.stack([o.loss.detach(), *o.logs.values()]))

    def view_pair(self, step: int) -> tuple[Tensor, Tensor]:
        """The same kind of views for a plain loop, from its own generator (the timing, not the values, matters)."""
        gen = torch.Generator(device=self.device).manual_seed(step)
        if not self.method.augmented:
            x = self.views.eval(self.images)
            return x, x
        return V.two_views(self.images, self.views.specs, self.mean, self.std, generator=gen, out_size=self.views.out)


def _wants_profile(mode: str, bad: bool) -> bool:
    return mode == "always" or (mode == "auto" and bad)


def bench_case(name: str, cfg: Config, device: torch.device, batch: int, steps: int, rounds: int,
               warmup: int, profile: str = "auto", out_dir: Path | None = None) -> dict[str, float | str]:
    backbone, side, out = CASES[name]
    n = 50_000  # per-instance state sized like CIFAR's train split
    loop = DjcLoop(cfg, device, side, batch, n)
    method = loop.method
    ref = Reference(cfg, backbone, 3, device)

    def ref_step(step: int) -> None:
        ref.step(loop.index, *loop.view_pair(step), n)

    with dist.count_traffic() as traffic:
        loop.step(0)
    bn_bytes = traffic.pop("all_reduce_sum_with_grad", 0)  # SeCu's only with-gradient collective: global BN
    # Gradients: DDP's all-reduce of every parameter but the centers, plus what SeCu sends for the centers
    # (all of them, or only the assigned columns when a head has more clusters than the batch has samples).
    own = set(method.self_reduced_parameters())
    grad_bytes = traffic.pop("average_gradients", 0) + sum(
        p.numel() * p.element_size() for n, p in method.named_parameters() if p.requires_grad and n not in own)
    stats_bytes = sum(traffic.values())  # gathers of (index, labels), histograms
    r = interleaved({"djc": loop.step, "reference": ref_step}, batch, steps, rounds, warmup, device, name)
    flops = step_flops(loop.step, 1 + warmup + rounds * steps)
    if out_dir is not None and _wants_profile(profile, r["ratio"] < MIN_RATIO):
        profile_loops({"djc": loop.step, "reference": ref_step}, device, out_dir / f"profile-{device.type}-{name}.txt",
                      f"SeCu's djc / reference = {r['ratio']:.3f} (profiled below {MIN_RATIO})")
    return {"model": name, "px": out, "batch": batch, "precision": str(method.amp_dtype or torch.float32),
            "djc": r["djc"], "reference": r["reference"], "ratio": r["ratio"], "stats_bytes": stats_bytes,
            "bn_bytes": bn_bytes, "grad_bytes": grad_bytes, "flops": flops}


def bench_method(model: str, cfg: Config, device: torch.device, batch: int, steps: int, rounds: int,
                 warmup: int, profile: str = "auto", out_dir: Path | None = None) -> dict[str, float | str]:
    """cfg.method.name's djc step against PlainLoop at the model's setting."""
    backbone, side, out = CASES[model]
    loop = DjcLoop(cfg, device, side, batch, 50_000)
    plain = PlainLoop(cfg, backbone, 3 * out * out, device)

    def plain_step(step: int) -> None:
        plain.step(*loop.view_pair(step))

    loop.step(0)
    r = interleaved({"djc": loop.step, "plain": plain_step}, batch, steps, rounds, warmup, device,
                     f"{model} {cfg.method.name}")
    share = 1.0 - r["ratio"]
    if out_dir is not None and _wants_profile(profile, share > MAX_CLUSTER_SHARE):
        profile_loops({"djc": loop.step, "plain": plain_step}, device,
                      out_dir / f"profile-{device.type}-{model}-{cfg.method.name}.txt",
                      f"{cfg.method.name}: 1 - plain / djc = {share:.1%} (profiled above {MAX_CLUSTER_SHARE:.0%})")
    return {"method": cfg.method.name, "model": model, "batch": batch,
            "precision": str(loop.method.amp_dtype or torch.float32), "djc": r["djc"], "plain": r["plain"],
            "ratio": r["ratio"], "cluster_share": share}


def _bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def main(args: argparse.Namespace) -> int:
    dev = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # as djc/train.py's workers: one thread each unless DJC_THREADS_PER_WORKER says more
        torch.set_num_threads(max(1, int(os.environ.get("DJC_THREADS_PER_WORKER", "1"))))
    try:
        return _run(args, dev)
    finally:
        torch.set_num_threads(threads)


def _methods(arg: str | None, dev: torch.device) -> list[str]:
    arg = DEFAULTS[dev.type]["methods"] if arg is None else arg
    names = list(METHOD_NAMES) if arg == "all" else [m for m in arg.split(",") if m]
    for m in names:
        if m not in METHOD_NAMES:
            raise ConfigError(f"unknown method {m!r} for --methods; choose from all, {', '.join(METHOD_NAMES)}")
    return names


def _config(backbone: str, batch: int, out: int, overrides: list[str]) -> Config:
    k = min(10, batch)  # SeCu needs K <= the global batch
    return load_config(None, [f"model.backbone={backbone}", f"data.batch_size={batch}", "trainer.num_workers=1",
                              f"method.num_clusters={k}", f"augment.out_size={out}", *overrides])


def _free(dev: torch.device) -> None:
    if dev.type == "cuda":  # one model's and method's buffers at a time on the device
        torch.cuda.empty_cache()


def _run(args: argparse.Namespace, dev: torch.device) -> int:
    d = DEFAULTS[dev.type]
    models = args.models.split(",")
    for name in models:
        if name not in CASES:
            raise ConfigError(f"unknown model {name!r} for --models; choose from {', '.join(CASES)}")
    methods = _methods(getattr(args, "methods", None), dev)
    profile = getattr(args, "profile", "auto")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    peak, peak_what = matmul_tflops(dev)
    rows: list[dict] = []
    method_rows: list[dict] = []

    def write() -> str:  # after every case: a run stopped part-way keeps what it measured
        table = _tables(dev, rows, method_rows, peak, peak_what)
        (out_dir / f"throughput-{dev.type}.md").write_text(table + "\n")
        (out_dir / f"throughput-{dev.type}.json").write_text(json.dumps(
            {"device": device_name(dev), "matmul_tflops": peak, "matmul": peak_what, "models": rows,
             "methods": method_rows}, indent=1) + "\n")
        return table

    for name in models:
        backbone, _, out = CASES[name]
        batch, steps, rounds = d[name]
        batch = args.batch_size or batch
        cfg = _config(backbone, batch, out, args.overrides)
        if cfg.method.name != "secu":
            raise ConfigError("djc bench throughput compares SeCu with its plain-loop reference: "
                              "method.name must stay secu")
        torch.manual_seed(0)
        rows.append(bench_case(name, cfg, dev, batch, args.steps or steps, args.rounds or rounds, d["warmup"],
                               profile, out_dir))
        write()
        _free(dev)
    name = models[0]  # every method at the first model's setting
    for m in methods:
        backbone, _, out = CASES[name]
        batch, steps, rounds = d[name]
        batch = args.batch_size or batch
        cfg = _config(backbone, batch, out, [*args.overrides, f"method.name={m}", *METHOD_SETTINGS.get(m, [])])
        torch.manual_seed(0)
        method_rows.append(bench_method(name, cfg, dev, batch, args.steps or steps, args.rounds or rounds,
                                        d["warmup"], profile, out_dir))
        write()
        _free(dev)
    print("\n" + write())
    return 0


def _tables(dev: torch.device, rows: list[dict], method_rows: list[dict], peak: float, peak_what: str) -> str:
    head = ("| model | px | batch | precision | djc img/s | reference img/s | djc / reference | "
            "cluster statistics / step | global BN / step | gradients / step |")
    lines = [f"device: {device_name(dev)}", "", "throughput (images per second, two views each; median over rounds)",
             "", head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['px']} | {r['batch']} | {r['precision'].removeprefix('torch.')} | "
                     f"{r['djc']:.1f} | {r['reference']:.1f} | {r['ratio']:.3f} | {_bytes(r['stats_bytes'])} | "
                     f"{_bytes(r['bn_bytes'])} | {_bytes(r['grad_bytes'])} |")
    lines += ["", f"work per djc step (FlopCounterMode), against a dense {peak_what} matmul on the same device: "
              f"{peak:.3g} TFLOP/s", "", "| model | batch | GFLOP / step | steps/s | TFLOP/s | of matmul rate |",
              "|" + "---|" * 6]
    for r in rows:
        rate = r["djc"] / r["batch"]  # steps per second
        tflops = r["flops"] * rate / 1e12
        lines.append(f"| {r['model']} | {r['batch']} | {r['flops'] / 1e9:,.1f} | {rate:.2f} | {tflops:.3g} | "
                     f"{tflops / peak:.1%} |")
    if method_rows:
        m0 = method_rows[0]
        lines += ["", f"every method's djc step against the plain loop of its network ({m0['model']}, batch "
                  f"{m0['batch']}); cluster side = 1 - plain / djc", "",
                  "| method | precision | djc img/s | plain img/s | plain / djc | cluster side / step |",
                  "|" + "---|" * 6]
        for r in method_rows:
            lines.append(f"| {r['method']} | {r['precision'].removeprefix('torch.')} | {r['djc']:.1f} | "
                         f"{r['plain']:.1f} | {r['ratio']:.3f} | {r['cluster_share']:.1%} |")
    return "\n".join(lines)

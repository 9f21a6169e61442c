"""`djc bench throughput`: images/s of djc's training step against a plain PyTorch loop doing the same work, side
by side in one process, reported as a ratio.

  djc step   the body of djc/train.py's loop: engine.apply_lr, Views.for_method (the batched views on the
             device), engine.train_step on the real method built by engine.build_method and placed by
             engine.to_device (GlobalBatchNorm backbone, ModuleList of heads, state update through djc.dist).
  reference  SeCu as research code writes it: torchvision's ResNet with plain BatchNorm, a projection head, the
             centers as plain tensors, SeCu's losses (the same pure functions) and its state update inline, the
             same batched views, SGD with the same groups, the same precision (autocast of the backbone, NHWC on
             CUDA).
Both start from the same uint8 batch on the device (decoding is the loader's work, the same for both). Rounds
alternate which loop goes first, so drift in the machine's speed cancels; the ratio is the median of the
per-round ratios. Also reported: the bytes each worker puts into collectives per step, cluster statistics and
global batch norm (counted by djc.dist) against DDP's all-reduce of every gradient.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from djc import dist
from djc.config import Config, ConfigError, load_config
from djc.data import views as V
from djc.engine import Views, amp_dtype, apply_lr, build_method, lr_factor, make_optimizer, to_device, train_step
from djc.methods.base import DataInfo, EpochContext
from djc.methods.secu import auto_gamma, center_loss, dual_step, representation_loss
from djc.models.backbones import resnet

# name -> (backbone, stored image side, view side); ImageNet images are prepared at 256 and cropped to 224
CASES = {"resnet18_cifar": ("resnet18_cifar", 32, 32), "resnet50": ("resnet50", 256, 224)}
# per device and model: batch size (global = local: one process), timed steps per round, rounds; warm-up steps.
# On a CPU, one step per round and many rounds: a machine shared with other jobs drifts within seconds.
DEFAULTS = {"cpu": {"resnet18_cifar": (16, 1, 16), "resnet50": (8, 1, 12), "warmup": 1},
            "cuda": {"resnet18_cifar": (512, 20, 5), "resnet50": (256, 10, 5), "warmup": 5}}


class Reference(nn.Module):
    """SeCu's training step as a plain loop would write it (size constraint, the config's hyper-parameters)."""

    def __init__(self, cfg: Config, backbone: str, channels: int, device: torch.device):
        super().__init__()
        c, d, k = cfg.method.secu, cfg.model.proj_dim, cfg.method.num_clusters
        self.c, self.amp = c, amp_dtype(cfg.trainer.precision, device)
        self.gammas = [c.gamma if c.gamma != "auto" else auto_gamma(k * (h + 1), c.expected_imbalance)
                       for h in range(c.num_heads)]
        self.backbone = resnet(18 if backbone == "resnet18_cifar" else 50, channels, backbone == "resnet18_cifar").net
        feat = 512 if backbone == "resnet18_cifar" else 2048
        self.proj = nn.Sequential(nn.Linear(feat, cfg.model.proj_hidden), nn.BatchNorm1d(cfg.model.proj_hidden),
                                  nn.ReLU(inplace=True), nn.Linear(cfg.model.proj_hidden, d))
        self.centers = nn.ParameterList(nn.Parameter(F.normalize(torch.randn(d, k * (h + 1)), dim=0))
                                        for h in range(c.num_heads))
        self.w_prev = [w.detach().clone() for w in self.centers]
        self.rho = [torch.zeros(w.shape[1]) for w in self.centers]
        self.hist = [torch.zeros(w.shape[1], dtype=torch.long) for w in self.centers]
        self.memory: list[Tensor] = []
        self.to(device)
        if device.type == "cuda":
            self.backbone.to(memory_format=torch.channels_last)
        self.w_prev, self.rho, self.hist = ([t.to(device) for t in ts] for ts in (self.w_prev, self.rho, self.hist))
        groups = [{"params": [*self.backbone.parameters(), *self.proj.parameters()]},
                  {"params": list(self.centers), "lr": c.center_lr, "weight_decay": c.center_wd}]
        self.opt = torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                   weight_decay=cfg.optim.weight_decay)

    def step(self, index: Tensor, x1: Tensor, x2: Tensor, num_samples: int) -> Tensor:
        if not self.memory:
            self.memory = [torch.full((num_samples,), -1, dtype=torch.long, device=x1.device) for _ in self.centers]
        b, c = x1.shape[0], self.c
        with torch.autocast(x1.device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None):
            f = self.backbone(torch.cat([x1, x2]))
        f = F.normalize(self.proj(f.float()), dim=1)
        f1, f2 = f[:b], f[b:]
        loss, labels = f.new_zeros(()), []
        for h, weight in enumerate(self.centers):
            w = F.normalize(weight, dim=0)
            with torch.no_grad():
                y = (0.5 * (f1 + f2) @ w + self.rho[h]).argmax(dim=1)
                prev = self.memory[h][index]
                ybar = torch.where(prev >= 0, prev, y)
            z1, z2 = f1 @ self.w_prev[h] / c.t_x, f2 @ self.w_prev[h] / c.t_x
            loss = loss + center_loss(f1, w, y, c.t_w) + center_loss(f2, w, y, c.t_w)
            loss = loss + representation_loss(z1, z2, ybar, c.tau) + representation_loss(z2, z1, ybar, c.tau)
            labels.append(y)
        loss = loss / (2 * len(self.centers))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            for h, y in enumerate(labels):
                k = self.rho[h].shape[0]
                counts = torch.bincount(y, minlength=k)
                self.rho[h] = dual_step(self.rho[h], counts, b, c.eta, self.gammas[h])
                old = self.memory[h][index]
                self.hist[h] += counts - torch.bincount(old[old >= 0], minlength=k)
                self.memory[h][index] = y
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[int], object], steps: int, device: torch.device, start: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for s in range(steps):
        fn(start + s)
    _sync(device)
    return time.perf_counter() - t0


def bench_case(name: str, cfg: Config, device: torch.device, batch: int, steps: int, rounds: int,
               warmup: int) -> dict[str, float | str]:
    backbone, side, out = CASES[name]
    n = 50_000  # per-instance state sized like CIFAR's train split
    info = DataInfo(n, (side, side, 3), cfg.method.num_clusters)
    method = to_device(build_method(cfg, info), cfg, device)
    method.on_epoch_start(EpochContext(0, cfg.optim.epochs, 1000, map_train=None))
    opt = make_optimizer(cfg, method)
    views = Views(cfg, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25], side)
    ref = Reference(cfg, backbone, 3, device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, side, side), generator=g, dtype=torch.uint8).to(device)
    index = torch.randperm(n, generator=g)[:batch].to(device)
    mean, std = (torch.tensor(v, device=device) for v in ([0.5] * 3, [0.25] * 3))
    logs: list[Tensor] = []

    def djc_step(step: int) -> None:  # the body of djc/train.py's loop
        apply_lr(opt, lr_factor(cfg, step, 1000))
        x1, x2 = views.for_method(method, images, step, 0)
        o = train_step(method, method, opt, index, x1, x2)
        logs.append(torch.stack([o.loss.detach(), *o.logs.values()]))

    def ref_step(step: int) -> None:
        gen = torch.Generator(device=device).manual_seed(step)
        x1, x2 = V.two_views(images, views.specs, mean, std, generator=gen, out_size=out)
        ref.step(index, x1, x2, n)

    with dist.count_traffic() as traffic:
        djc_step(0)
    bn_bytes = traffic.pop("all_reduce_sum_with_grad", 0)  # SeCu's only with-gradient collective: global BN
    # Gradients: DDP's all-reduce of every parameter but the centers, plus what SeCu sends for the centers
    # (all of them, or only the assigned columns when a head has more clusters than the batch has samples).
    own = set(method.self_reduced_parameters())
    grad_bytes = traffic.pop("average_gradients", 0) + sum(
        p.numel() * p.element_size() for n, p in method.named_parameters() if p.requires_grad and n not in own)
    stats_bytes = sum(traffic.values())  # gathers of (index, labels), histograms
    _timed(djc_step, warmup, device, 1)
    _timed(ref_step, warmup, device, 1)
    ours, theirs, ratios = [], [], []
    for r in range(rounds):
        order = [("djc", djc_step), ("ref", ref_step)][:: 1 if r % 2 == 0 else -1]
        t = {who: _timed(fn, steps, device, 1 + warmup + r * steps) for who, fn in order}
        ours.append(batch * steps / t["djc"])
        theirs.append(batch * steps / t["ref"])
        ratios.append(t["ref"] / t["djc"])
        print(f"[djc bench] {name} round {r + 1}/{rounds}: djc {ours[-1]:.1f} img/s, reference "
              f"{theirs[-1]:.1f} img/s", flush=True)
    return {"model": name, "px": out, "batch": batch, "precision": str(method.amp_dtype or torch.float32),
            "djc": statistics.median(ours), "reference": statistics.median(theirs),
            "ratio": statistics.median(ratios), "stats_bytes": stats_bytes, "bn_bytes": bn_bytes,
            "grad_bytes": grad_bytes}


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


def _bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def main(args: argparse.Namespace) -> int:
    dev = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if dev.type == "cpu":  # as djc/train.py's workers: one thread each unless DJC_THREADS_PER_WORKER says more
        torch.set_num_threads(max(1, int(os.environ.get("DJC_THREADS_PER_WORKER", "1"))))
    try:
        return _run(args, dev)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, dev: torch.device) -> int:
    d = DEFAULTS[dev.type]
    rows = []
    for name in args.models.split(","):
        if name not in CASES:
            raise ConfigError(f"unknown model {name!r} for --models; choose from {', '.join(CASES)}")
        backbone, _, out = CASES[name]
        batch, steps, rounds = d[name]
        batch = args.batch_size or batch
        k = min(10, batch)  # SeCu needs K <= the global batch
        cfg = load_config(None, [f"model.backbone={backbone}", f"data.batch_size={batch}", "trainer.num_workers=1",
                                 f"method.num_clusters={k}", f"augment.out_size={out}", *args.overrides])
        if cfg.method.name != "secu":
            raise ConfigError("djc bench throughput compares SeCu with its plain-loop reference: "
                              "method.name must stay secu")
        torch.manual_seed(0)
        rows.append(bench_case(name, cfg, dev, batch, args.steps or steps, args.rounds or rounds, d["warmup"]))
    head = ("| model | px | batch | precision | djc img/s | reference img/s | djc / reference | "
            "cluster statistics / step | global BN / step | gradients / step |")
    lines = [f"device: {device_name(dev)}", "", head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['px']} | {r['batch']} | {r['precision'].removeprefix('torch.')} | "
                     f"{r['djc']:.1f} | {r['reference']:.1f} | {r['ratio']:.3f} | {_bytes(r['stats_bytes'])} | "
                     f"{_bytes(r['bn_bytes'])} | {_bytes(r['grad_bytes'])} |")
    table = "\n".join(lines)
    print("\nthroughput (images per second, two views each; median over rounds)\n" + table)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"throughput-{dev.type}.md").write_text(table + "\n")
    return 0

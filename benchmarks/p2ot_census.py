"""P2OT's cluster side on a GPU, counted op by op (djc/bench/census.py) at ImageNet-LT's N and K = 1000, per-GPU
batch 64, for each way of solving the two views' plans (method.p2ot.view_solves) side by side: kernels, host
reads, and the estimated device and host-dispatch time of one step. With two distinct image batches as the views
(what training sees) and with one batch as both (what `djc bench scale`'s GPU table used before 2026-12: the
second view's plan then equals the first's and its chained solve converges at once).

    python benchmarks/p2ot_census.py [K]
"""

import sys

import torch

from djc.bench import scale_cells as C
from djc.bench.census import census
from djc.methods.base import DataInfo, EpochContext
from djc.optim import make_optimizer
from djc.step import train_step

k = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
info = DataInfo(115846, (16, 16, 3), 1000)
batch = 64
print("| views | view_solves | kernels / step | host reads | sinkhorn loop iterations | device ms (est.) | "
      "host dispatch ms |")
print("|---|---|---|---|---|---|---|")
for same in (False, True):
    for solves in ("chained", "batched"):
        cfg = C.cell_config("p2ot", k, batch, [f"method.p2ot.view_solves={solves}"])
        method = C.build(cfg, info, batch)
        method.on_epoch_start(EpochContext(0, C.EPOCHS, 1000, map_train=None))
        opt = make_optimizer(cfg, method)
        g = torch.Generator().manual_seed(2)
        index = torch.randperm(info.num_samples, generator=g)[:batch]
        x1 = torch.randn(batch, 3, 16, 16, generator=g)
        x2 = x1 if same else torch.randn(batch, 3, 16, 16, generator=g)
        with torch.no_grad():
            _, outs = C.record_parts(method, lambda: method(index, x1, x2))
        logs = {}

        def cluster() -> None:
            with C.replayed(method, outs):
                logs.update(train_step(method, method, opt, index, x1, x2).logs)

        for _ in range(3):  # banks in their steady use, warm-started duals (as the bench's census)
            cluster()
        cen = census(cluster)
        print(f"| {'one batch twice' if same else 'two batches'} | {solves} | {cen.ops:,} | {cen.syncs} | "
              f"{float(logs['sinkhorn_loop']):.0f} | {cen.device_seconds() * 1e3:.1f} | "
              f"{cen.host_seconds() * 1e3:.1f} |")

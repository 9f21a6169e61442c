"""Peak resident memory of one `djc bench scale` cell, stage by stage, in a fresh process: which part of a
method's cell at ImageNet-LT's N and a given K holds the memory (random features and labels stand in for the
data; the stages are the bench's own functions).

    python benchmarks/cell_memory.py [METHOD] [K]          # default: secu 10000
"""

import resource
import sys
import time

import numpy as np
import torch

from djc import metrics
from djc.bench import scale_cells as C
from djc.bench import scale_work as W
from djc.methods.base import DataInfo

N, CLASSES, FEAT = 115_846, 1000, 64  # ImageNet-LT's N and classes; the bench encoder's feature width


def peak(tag: str, t0: float) -> None:
    print(f"{tag:<40} peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:6.2f} GiB "
          f"({time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "secu"
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    torch.set_num_threads(1)
    t0 = time.time()
    info = DataInfo(N, (16, 16, 3), CLASSES)
    cfg = C.cell_config(name, k, 256, [])
    peak("start", t0)
    x1, x2 = torch.randn(2, 256, 3, 16, 16)
    method = C.measure_step(cfg, info, x1, x2, 1)["method"]
    peak("build + the step (measure_step)", t0)
    _, z, _, conf = W.predict_all(method, torch.randn(N, FEAT))
    peak("the heads over N (predict_all)", t0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, CLASSES, N)
    clusters = rng.integers(0, k, N)  # every cluster used: the metrics' largest case
    W.measure_epoch(cfg, method, z, z, torch.from_numpy(clusters))
    peak("the epoch's work (measure_epoch)", t0)
    metrics.evaluate(labels, clusters, k, np.bincount(labels, minlength=CLASSES))
    peak(f"metrics at {k} used clusters", t0)
    W.kmeans_cost(z, k, cfg.method.kmeans.iters, cfg.method.kmeans.restarts)
    peak(f"k-means on the features at K = {k}", t0)


if __name__ == "__main__":
    main()

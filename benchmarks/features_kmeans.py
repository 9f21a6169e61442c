"""k-means (K = classes) on a run's cached frozen-backbone features (RUN/features/train-*.pt, djc/features.py),
as they are, L2-normalised and standardised per dimension: whether the backbone's features cluster better in
another form. Labels are read from the cache for the score only.

    python benchmarks/features_kmeans.py runs/pre/secu-seed0
"""

from __future__ import annotations

import glob
import sys

import torch
import torch.nn.functional as F

from djc import metrics
from djc.methods.kmeans import assign, kmeans


def main() -> None:
    torch.set_num_threads(2)
    (path,) = glob.glob(f"{sys.argv[1].rstrip('/')}/features/train-*.pt")
    cache = torch.load(path, weights_only=True)
    x, y = cache["features"].float(), cache["labels"].numpy()
    k = int(y.max()) + 1
    for name, z in (("as is", x), ("L2-normalised", F.normalize(x, dim=1)),
                    ("standardised", (x - x.mean(0)) / x.std(0).clamp_min(1e-6))):
        m = metrics.evaluate(y, assign(z, kmeans(z, k, seed=0).centers)[0].numpy(), k)
        print(f"{name:14s} balanced ACC {m['balanced_acc']:.3f}  NMI {m['nmi']:.3f}")


if __name__ == "__main__":
    main()

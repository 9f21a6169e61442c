"""Does averaging a run's features over the data's symmetries help clustering them? The shapes benchmark's
classes are invariant to rotation, mirroring and light-on-dark polarity, and its pretext learns that invariance
only approximately; this averages the run's `Prediction.features` of the eval view over 1, 8 (rotations x flips)
or 16 (x inversion) transformed copies, or over 5 zooms (`zoom`: the object's size, what splits the head classes) of each training image and scores k-means, knn-merge and the leave-one-out
20-NN vote (class-balanced: each vote divided by its class's size) on them (docs/results.md, "Where the gap to
0.60 sits").

usage: python benchmarks/features_tta.py RUN_DIR [--threads T] [--sets plain,d4,d4inv,zoom]
Each line printed is JSON: the set, its number of views, and the three balanced ACCs (train split, labels used for
the score only).
"""

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from djc import metrics
from djc.data import views as V
from djc.evaluate import local_slice
from djc.methods import knn_merge
from djc.methods.kmeans import assign, kmeans
from djc.predict import load_run


ZOOMS = (0.75, 0.87, 1.0, 1.19, 1.41)  # side of a central box over the image's: above 1 zooms out (1.41: 2x area)


def zoom(x: torch.Tensor, side: float) -> torch.Tensor:
    """The central box `side` times the image's side, resized back to the image's size, border pixels repeated
    around it when it is the larger: the scales the job's views draw (augment.crop_scale_max 2.0), without their
    offsets and aspect ratios."""
    n, _, h, w = x.shape
    bh, bw = round(h * side), round(w * side)
    box = torch.tensor([(h - bh) // 2, (w - bw) // 2, bh, bw]).expand(n, 4)
    return V.resized_crop(x, box, h)


def symmetries(name: str) -> list:
    """Transforms of (N, C, H, W) images in [0, 1]."""
    if name == "zoom":  # the nuisance that splits the head classes (benchmarks/shapes_nuisance.py): object size
        return [lambda x, s=s: zoom(x, s) for s in ZOOMS]
    rots = [lambda x, k=k: torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    flips = [lambda x: x, lambda x: torch.flip(x, dims=(-1,))]
    d4 = [lambda x, r=r, f=f: r(f(x)) for r in rots for f in flips]
    return {"plain": [lambda x: x], "d4": d4, "d4inv": [lambda x, t=t, i=i: (1 - t(x)) if i else t(x)
                                                         for t in d4 for i in (0, 1)]}[name]


def nn_vote(f: torch.Tensor, y: np.ndarray, k: int = 20) -> float:
    yt, counts = torch.as_tensor(y), torch.as_tensor(np.bincount(y), dtype=torch.float)
    pred = []
    for lo in range(0, len(f), 2048):
        s = f[lo:lo + 2048] @ f.T
        s[torch.arange(len(s)), torch.arange(lo, lo + len(s))] = -2
        votes = F.one_hot(yt[s.topk(k, dim=1).indices], len(counts)).float().sum(1) / counts
        pred.append(votes.argmax(1))
    p = torch.cat(pred).numpy()
    return float(np.mean([np.mean(p[y == c] == c) for c in range(len(counts))]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run"); ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sets", default="plain,d4,d4inv")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = load_run(a.run, torch.device("cpu"))
    mean, std = run.views._on(torch.device("cpu"))
    images, labels = [], []
    for batch in local_slice(run.cfg.data.train):
        images.append(batch["image"]); labels.append(batch["label"])
    images, y = torch.cat(images), torch.cat(labels).numpy()
    k, counts = run.cfg.method.num_clusters, np.bincount(y)

    def score(pred):
        return round(metrics.evaluate(y, np.asarray(pred), k, counts)["balanced_acc"], 3)

    @torch.no_grad()
    def features(t):
        out = [run.method.predict(V.eval_view(t(V._to_unit(images[lo:lo + 512])), mean, std, out_size=run.views.out))
               .features.float() for lo in range(0, len(images), 512)]
        return F.normalize(torch.cat(out), dim=1)

    for name in a.sets.split(","):
        ts = symmetries(name)
        f = F.normalize(torch.stack([features(t) for t in ts]).mean(0), dim=1)
        km = assign(f, kmeans(f, k, iters=50, restarts=3, seed=0).centers)[0].numpy()
        merged = knn_merge.fit(f, torch.arange(len(f)), k, seed=0).predict(f).numpy()
        print(json.dumps({"set": name, "views": len(ts), "kmeans": score(km), "knn_merge": score(merged),
                          "nn20": round(nn_vote(f, y), 3)}), flush=True)


if __name__ == "__main__":
    main()

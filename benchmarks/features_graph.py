"""How much more than k-means can a clustering get out of learned features? The same saved features (the probe's
`--save`), clustered K ways by label-free procedures that use the features' neighbourhoods rather than their
distance to K centres. The 20-NN accuracy of the shapes reference (0.52-0.59; 0.64-0.73 at 4x its lr) is far above its k-means
(0.31-0.39): the class is there locally, the classes are not K round blobs. This measures which procedure closes
that gap (docs/results.md, "The learning rate, and clustering the features' neighbourhood graph").

usage: python benchmarks/features_graph.py FEATURES.pt|PREDICT_DIR [--which features|backbone] [--threads T]
       [--only kmeans,spectral,...]  run only the procedures named (their first word)
PREDICT_DIR: the --out of `djc predict RUN --data LABELLED --embeddings` (its embeddings.npy and the labels of its
assignments.parquet), so a bench's run is measured the same way as a probe's saved features.
Each line printed is JSON: the procedure, then balanced ACC, tail ACC and NMI (labels used for the score only).
  kmeans          djc's k-means on the L2-normalised features (what `djc bench quality` reports)
  pca-white D     k-means after PCA to D dims, whitened, re-normalised
  smooth k t      each feature replaced t times by the mean of its k nearest neighbours (cosine), then k-means
  spectral k      Ng-Jordan-Weiss: the symmetric kNN graph's normalised Laplacian, its K leading eigenvectors,
                  rows normalised, k-means on them
  overcluster M   k-means to M pieces, merged to K by average linkage of the 10-NN graph's edges between pieces:
                  djc's knn-merge baseline (every run reports it since 2026-12-04; eval.knn_merge)
  peaks k         density peaks (Rodriguez & Laio 2014): density = mean cosine to the k nearest rows; the K rows
                  farthest from any denser row are the peaks, every other row joins its nearest denser row's
                  cluster, then every row its nearest cluster mean. Label-free; imbalanced sizes allowed
  gmm COV         scikit-learn's Gaussian mixture (spherical, diag, full covariance; 3 inits, reg_covar 1e-4)
Ceilings, which use the labels to place the clusters (how much a K-centre or a merge could get, not a method):
  ncm             nearest class mean: K centres at the class means, each row to the nearest. Also prints the
                  k-means objective (mean 1 - cosine to the row's centre) of that partition and of k-means': a
                  lower value for k-means' own says its objective, not its search, moves it off the classes
  gmm-oracle COV  the same mixture started at the class means with the classes' shares: where its EM leaves
                  the classes, its likelihood prefers another partition
  majority M      k-means to M pieces, each piece given its majority class: the best any merge of them can read
"""

import argparse
import json
import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from djc import metrics
from djc.methods import knn_merge
from djc.methods.kmeans import assign, kmeans


def score(y, pred, k, counts):
    r = metrics.evaluate(y, np.asarray(pred), k, counts)
    return round(r["balanced_acc"], 3), round(r["tail_acc"], 3), round(r["nmi"], 3)


def km(z, k, seed=0):
    return assign(z, kmeans(z, k, iters=50, restarts=3, seed=seed).centers)[0].numpy()


def knn(f, k):
    """Indices (N, k) of each row's k nearest neighbours by cosine, itself excluded."""
    out = []
    for lo in range(0, len(f), 2048):
        s = f[lo:lo + 2048] @ f.T
        s[torch.arange(len(s)), torch.arange(lo, lo + len(s))] = -2
        out.append(s.topk(k, dim=1).indices)
    return torch.cat(out)


def graph(f, k):
    """Symmetric kNN adjacency as a dense float tensor (N is ~8,000 here: 256 MB)."""
    n = len(f)
    idx = knn(f, k)
    a = torch.zeros(n, n)
    a[torch.arange(n)[:, None], idx] = 1.0
    return torch.maximum(a, a.T)


def spectral(f, kk, k):
    a = graph(f, kk)
    d = a.sum(1).rsqrt()
    m = d[:, None] * a * d[None]
    _, vecs = torch.linalg.eigh(m.double())  # ascending: the last K are the leading ones
    u = F.normalize(vecs[:, -k:].float(), dim=1)
    return km(u, k)


def overcluster(f, m, kk, k):
    """djc's knn-merge baseline (djc/methods/knn_merge.py) with m // k pieces per cluster, seed 0."""
    return knn_merge.fit(f, torch.arange(len(f)), k, pieces=m // k, neighbors=kk, seed=0).predict(f).numpy()


def peaks(f, kk, k):
    """Density-peak clusters of unit rows f (see the docstring); O(N^2) memory, N ~ 8,000 here."""
    s = f @ f.T
    s.fill_diagonal_(-2)
    rho = s.topk(kk, dim=1).values.mean(1)
    order = rho.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(f))
    best, parent = s.masked_fill(rank[None, :] >= rank[:, None], -3).max(1)  # nearest denser row
    delta = 1 - best
    delta[order[0]] = delta.max() + 1
    label = torch.full((len(f),), -1)
    label[delta.topk(k).indices] = torch.arange(k)
    for i in order.tolist():  # in density order a row's parent is labelled before it
        if label[i] < 0:
            label[i] = label[parent[i]]
    means = torch.stack([F.normalize(f[label == c].mean(0), dim=0) for c in range(k)])
    return assign(f, means)[0].numpy()


def objective(f, pred, k):
    """k-means' objective of a partition: mean 1 - cosine of a row to its cluster's (normalised) mean."""
    p = torch.as_tensor(pred)
    means = torch.stack([F.normalize(f[p == c].mean(0), dim=0) if (p == c).any() else f[0] * 0 for c in range(k)])
    return round(float(1 - (f * means[p]).sum(1).mean()), 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("path"); ap.add_argument("--which", default="features"); ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="kmeans,pca-white,smooth,spectral,overcluster,peaks,gmm,ncm,gmm-oracle,majority")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if os.path.isdir(a.path):  # a `djc predict --embeddings` output
        if a.which != "features":
            ap.error("a predict dir holds the run's features only (--which features)")
        rows = pd.read_parquet(os.path.join(a.path, "assignments.parquet"), columns=["label"])
        d = {a.which: torch.from_numpy(np.load(os.path.join(a.path, "embeddings.npy")).astype(np.float32)),
             "labels": torch.from_numpy(rows["label"].to_numpy().copy())}
    else:
        d = torch.load(a.path, weights_only=True)
    f = F.normalize(d[a.which].float(), dim=1); y = d["labels"].numpy(); k = int(y.max()) + 1
    counts = np.bincount(y, minlength=k)

    only = set(a.only.split(","))

    def out(name, compute):
        if name.split()[0] in only:
            print(json.dumps({"which": a.which, "dim": f.shape[1], "procedure": name,
                              "bacc_tail_nmi": score(y, compute(), k, counts)}), flush=True)

    def smooth(kk, t):
        g = f
        for _ in range(t):
            g = F.normalize(g[knn(g, kk)].mean(1) + g, dim=1)
        return km(g, k)

    def pca_white(dim):
        c = f - f.mean(0)
        _, s, v = torch.linalg.svd(c, full_matrices=False)
        return km(F.normalize(c @ v[:dim].T / s[:dim], dim=1), k)

    out("kmeans", lambda: km(f, k))
    for dim in (8, 16, 32):
        if dim < f.shape[1]:
            out(f"pca-white {dim}", lambda: pca_white(dim))
    for kk, t in ((10, 1), (10, 3), (20, 3)):
        out(f"smooth {kk} {t}", lambda: smooth(kk, t))
    for kk in (10, 20):
        out(f"spectral {kk}", lambda: spectral(f, kk, k))
    for m in (50, 100):
        out(f"overcluster {m}", lambda: overcluster(f, m, 10, k))
    for kk in (10, 20):
        out(f"peaks {kk}", lambda: peaks(f, kk, k))

    def gmm(cov, oracle=False):
        from sklearn.mixture import GaussianMixture

        x = f.numpy()
        init = dict(means_init=np.stack([x[y == c].mean(0) for c in range(k)]), weights_init=counts / counts.sum(),
                    n_init=1) if oracle else dict(n_init=3)
        return GaussianMixture(k, covariance_type=cov, random_state=0, max_iter=300, reg_covar=1e-4,
                               **init).fit(x).predict(x)

    for cov in ("spherical", "diag", "full"):
        out(f"gmm {cov}", lambda: gmm(cov))
    for cov in ("spherical", "diag", "full"):
        out(f"gmm-oracle {cov}", lambda: gmm(cov, oracle=True))

    yt = torch.as_tensor(y)
    ncm = assign(f, torch.stack([F.normalize(f[yt == c].mean(0), dim=0) for c in range(k)]))[0].numpy()
    if "ncm" in only:
        print(json.dumps({"which": a.which, "objective": {"ncm": objective(f, ncm, k),
                                                          "kmeans": objective(f, km(f, k), k)}}), flush=True)
    out("ncm", lambda: ncm)
    for m in (20, 100):
        def majority():
            piece = km(f, m)
            best = np.array([np.bincount(y[piece == j], minlength=k).argmax() if (piece == j).any() else 0
                             for j in range(m)])
            return best[piece]
        out(f"majority {m}", majority)


if __name__ == "__main__":
    main()

"""The label-free model-selection score that `djc tune` ranks trials by, computed every epoch on
`eval.select_split` (ideally a held-out `val` entry of data.eval) and reduced over workers.

    select_score = S x K_used / K

- S, stability: NMI between the clusters of the split's plain view and of one augmented view of it (the
  training views' first, each sample's drawn from the run's seed and its index, so the same every epoch and
  whatever the number of workers). Clusters that follow what the augmentations leave alone, not pixels.
- K_used / K: clusters left empty on the split are a share of the clustering lost; collapse to one cluster
  scores 0 (the NMI of a one-cluster labelling is 0 here).
- A, agreement (logged, no longer a factor): NMI between the clusters and k-means (K_used clusters) on the same
  features, on a fixed sample of at most SAMPLE rows; left out when the sample is too small for K_used
  clusters (K_used > SAMPLE / 5, e.g. K = 1000). It was a factor until 2026-12: it rewards clusters that k-means
  would find, and penalises what imbalance-aware methods do on purpose (SeCu's merge keeps tail classes by
  departing from k-means on its features), so it ranked the SeCu trial a search should keep below a worse one
  (docs/cluster.md, "The acceptance measurement").

NMIs are invariant to the scale of the features, which temperatures and loss weights change from trial to
trial: the variance ratio R = between / total scatter that was the score before (`select_r_used` = R x K_used /
K, logged with the Calinski-Harabasz CH) ranked SeCu's trials at rho 0.72 and P2OT's negatively
(`djc bench selection`, docs/cluster.md). Also logged: the silhouette on the sample (cosine), the stability's
ARI, its per-cluster Jaccard averaged over the K clusters (tail clusters count as much as head ones), the
normalised entropy of the cluster sizes, K_used. `CANDIDATES` are the scores that were measured.

z are `Prediction.features`, the clusters its evaluated head (column 0). When the split is labelled,
`select_acc`, `select_balanced_acc` and `select_nmi` (Hungarian-matched) are logged too, for `--metric acc` and
for validating the label-free score (`djc bench selection`). No Ray here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from djc import dist, metrics
from djc.data.shards import read_manifest
from djc.methods.base import ClusteringMethod

# djc tune --metric NAME -> the key the training loop reports; all are "higher is better".
METRICS = {"score": "select_score", "acc": "select_acc", "balanced_acc": "select_balanced_acc"}
SAMPLE = 2048  # rows of the silhouette and the k-means agreement: N x N distances 2048^2 x 8 B = 32 MB, ~0.1 s on one core


def variance_ratio(stats: torch.Tensor) -> tuple[float, float, int]:
    """(R, CH, K_used) from per-cluster sufficient statistics `stats` (K, D + 2): [count, sum |z|^2, sum z]."""
    s = stats.double()
    n_k, q_k, s_k = s[:, 0], s[:, 1], s[:, 2:]
    used = n_k > 0
    n, k_used = float(n_k.sum()), int(used.sum())
    total = float(q_k.sum() - s_k.sum(0).square().sum() / max(n, 1.0))  # T = sum |z|^2 - |sum z|^2 / N
    within = float((q_k[used] - s_k[used].square().sum(1) / n_k[used]).sum())  # W = sum_k (q_k - |s_k|^2 / n_k)
    if total <= 1e-12 * max(n, 1.0) or k_used < 2:
        return 0.0, 0.0, k_used
    r = min(1.0, max(0.0, 1.0 - within / total))
    ch = math.inf if r == 1.0 or n <= k_used else r / (1.0 - r) * (n - k_used) / (k_used - 1)
    return r, ch, k_used


def cluster_stats(features: torch.Tensor, clusters: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """(K, D + 2) float64 sufficient statistics [count, sum |z|^2, sum z] of features (n, D) per cluster (n,)."""
    z, c = features.float().flatten(1), clusters
    out = torch.zeros(num_clusters, z.shape[1] + 2, dtype=torch.float64, device=z.device)
    out[:, 0].index_add_(0, c, torch.ones_like(c, dtype=torch.float64))
    out[:, 1].index_add_(0, c, z.square().sum(1).double())
    out[:, 2:].index_add_(0, c, z.double())
    return out


def silhouette(z: torch.Tensor, c: torch.Tensor) -> float:
    """Mean silhouette of the clusters `c` (n,) of the rows of `z` (n, D) under cosine distance; samples alone in
    their cluster count 0 (scikit-learn's convention); 0 when fewer than 2 clusters are used."""
    labels, c = torch.unique(c, return_inverse=True)
    k = len(labels)
    if k < 2 or k >= len(c):
        return 0.0
    u = torch.nn.functional.normalize(z.double(), dim=1)
    d = (1.0 - u @ u.T).clamp_min(0.0)  # (n, n) cosine distances
    onehot = torch.nn.functional.one_hot(c, k).double()  # (n, k)
    sums = d @ onehot  # (n, k) sum of distances to each cluster's members
    size = onehot.sum(0)  # (k,)
    own = size[c]
    a = sums.gather(1, c[:, None]).squeeze(1) / (own - 1).clamp_min(1)  # mean distance to the others of its cluster
    other = sums / size
    other.scatter_(1, c[:, None], math.inf)
    b = other.min(1).values  # mean distance to the nearest other cluster
    s = torch.where(own > 1, (b - a) / torch.maximum(a, b).clamp_min(1e-12), torch.zeros_like(a))
    return float(s.mean())


def size_entropy(counts: np.ndarray, k: int) -> float:
    """Entropy of the cluster-size distribution over log K: 1 for equal sizes, 0 for one cluster."""
    p = counts[counts > 0] / max(counts.sum(), 1)
    return float(-(p * np.log(p)).sum() / math.log(k)) if k > 1 else 0.0


def stability_jaccard(c: np.ndarray, cv: np.ndarray, k: int) -> float:
    """Mean over all K clusters of the Jaccard index between cluster k on the plain view and cluster k on the
    augmented one: |A_k & B_k| / |A_k | B_k|, 0 for a cluster empty on both. A macro average, so a tail cluster
    that keeps its members counts as much as a head cluster does (the NMI is dominated by the big clusters),
    and unused clusters count 0 (the K_used / K factor of select_score comes with it)."""
    both = np.bincount(c[c == cv], minlength=k).astype(float)
    union = np.bincount(c, minlength=k) + np.bincount(cv, minlength=k) - both
    return float(np.divide(both, union, out=np.zeros(k), where=union > 0).sum() / k) if k else 0.0


def consensus(labelings: list[np.ndarray]) -> list[float]:
    """Each clustering's mean NMI with the others of the same samples (rows in the same order): agreement with
    the ensemble of runs, a score of one run that needs the other runs of a search. NaN with fewer than 2."""
    n = len(labelings)
    pair = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            pair[i, j] = pair[j, i] = normalized_mutual_info_score(labelings[i], labelings[j])
    return [float((pair[i].sum() - 1.0) / (n - 1)) if n > 1 else math.nan for i in range(n)]


def _or_one(x: float) -> float:
    """A factor that could not be computed (k-means on a sample too small for K_used) leaves the product as is."""
    return 1.0 if math.isnan(x) else x


# Label-free scores measured against balanced ACC by `djc bench selection` (docs/cluster.md has the table),
# each a function of the quantities selection_metrics logs; SCORE is the one trials are ranked by.
CANDIDATES: dict[str, Callable[[dict[str, float]], float]] = {
    "r_used": lambda m: m["select_r_used"],
    "r": lambda m: m["select_r"],
    "silhouette": lambda m: m["select_silhouette"],
    "stability_ari": lambda m: m["select_stability_ari"],
    "stability_nmi": lambda m: m["select_stability_nmi"],
    "size_entropy": lambda m: m["select_size_entropy"],
    "kmeans_nmi": lambda m: m["select_kmeans_nmi"],
    "kmeans_nmi x used": lambda m: m["select_kmeans_nmi"] * m["select_clusters_used"] / m["select_k"],
    "stability_nmi x kmeans_nmi x used": lambda m: (m["select_stability_nmi"] * _or_one(m["select_kmeans_nmi"])
                                                    * m["select_clusters_used"] / m["select_k"]),
    "stability_nmi x used": lambda m: m["select_stability_nmi"] * m["select_clusters_used"] / m["select_k"],
    # K^(H - 1) = exp(entropy in nats) / K: the share of the K clusters that the sizes effectively use
    "stability_nmi x effective": lambda m: m["select_stability_nmi"] * m["select_k"] ** (m["select_size_entropy"] - 1),
    "r_used x stability_nmi": lambda m: m["select_r_used"] * m["select_stability_nmi"],
    "r_used x stability_ari": lambda m: m["select_r_used"] * max(m["select_stability_ari"], 0.0),
    "silhouette x stability_ari": lambda m: max(m["select_silhouette"], 0.0) * max(m["select_stability_ari"], 0.0),
    "stability_jaccard": lambda m: m.get("select_stability_jaccard", math.nan),
    # consensus: set by `djc bench selection` from the runs it compares (not known to a run on its own)
    "consensus_nmi": lambda m: m.get("select_consensus_nmi", math.nan),
    "consensus_nmi x stability_nmi x used": lambda m: (m.get("select_consensus_nmi", math.nan)
                                                       * m["select_stability_nmi"]
                                                       * m["select_clusters_used"] / m["select_k"]),
}
SCORE = "stability_nmi x used"


def score(m: dict[str, float]) -> float:
    """The score trials are ranked by (SCORE of CANDIDATES)."""
    return CANDIDATES[SCORE](m)


@torch.no_grad()
def selection_metrics(method: ClusteringMethod, url: str, views, device, num_clusters: int,
                      on_corrupt: str = "error") -> dict[str, float]:
    """Every worker calls this with its own slice; all get the same numbers (reduced over workers)."""
    from djc.evaluate import local_slice  # the evaluation's batches of the split (imported late: no cycle)

    K = num_clusters
    num_samples = read_manifest(url).num_samples
    stats, cols = None, {"label": [], "cluster": [], "view_cluster": [], "index": [], "z": []}
    for batch in local_slice(url, on_corrupt, views):
        images = batch["image"].to(device)
        p = method.predict(views.eval(images))
        z, c = p.features.float().flatten(1), p.clusters[:, 0]
        part = cluster_stats(z, c, K)
        stats = part if stats is None else stats + part
        view = views.by_index(images, batch["index"], num_samples)
        for key, v in (("label", batch["label"]), ("cluster", c), ("view_cluster", method.predict(view).clusters[:, 0]),
                       ("index", batch["index"]), ("z", z)):
            cols[key].append(v.cpu())
    # A worker with an empty slice still joins the collectives (with zeros of the right shape).
    d = int(dist.all_reduce_max(torch.tensor([0 if stats is None else stats.shape[1]]))[0])
    local = stats.cpu() if stats is not None else torch.zeros(K, d, dtype=torch.float64)
    r, ch, k_used = variance_ratio(dist.all_reduce_sum(local))
    empty = {"z": torch.zeros(0, max(d - 2, 0)), "label": torch.zeros(0, dtype=torch.long)}
    g = {k: dist.all_gather_cat(torch.cat(v) if v else empty.get(k, torch.zeros(0, dtype=torch.long)))
         for k, v in cols.items() if k != "z"}
    # The silhouette's sample: the same indices on every worker (a fixed stride over the split's indices).
    index = g["index"]
    n = len(index)
    keep = torch.zeros(0, dtype=torch.long)
    if n:
        step = max(1, math.ceil(n / SAMPLE))
        chosen = torch.sort(index).values[::step]
        z_local = torch.cat(cols["z"]) if cols["z"] else empty["z"]
        i_local = torch.cat(cols["index"]) if cols["index"] else torch.zeros(0, dtype=torch.long)
        mask = torch.isin(i_local, chosen)
        zs, is_ = dist.all_gather_cat(z_local[mask]), dist.all_gather_cat(i_local[mask])
        order = torch.argsort(is_)
        zs, is_ = zs[order], is_[order]
        pos = torch.argsort(index)
        keep = pos[torch.searchsorted(index[pos], is_)]  # rows of the gathered columns in the sample
    c, cv, y = g["cluster"].numpy(), g["view_cluster"].numpy(), g["label"].numpy()
    kmeans_nmi = 0.0 if k_used < 2 else math.nan  # NaN: too few sample rows for k-means with K_used clusters
    if len(keep) >= 5 * k_used and k_used > 1:  # NMI of the clusters with k-means (K_used) on the same features
        from sklearn.cluster import KMeans

        u = torch.nn.functional.normalize(zs.double(), dim=1).numpy()
        km = KMeans(n_clusters=k_used, n_init=3, random_state=0).fit_predict(u)
        kmeans_nmi = float(normalized_mutual_info_score(g["cluster"][keep].numpy(), km))
    out = {"select_k": K, "select_r": r, "select_ch": ch, "select_clusters_used": k_used, "select_r_used": r * k_used / K,
           "select_silhouette": silhouette(zs, g["cluster"][keep]) if len(keep) else 0.0,
           # scikit-learn scores two one-cluster labelings 1 ("identical"); collapse is no agreement here
           "select_stability_ari": float(adjusted_rand_score(c, cv)) if k_used > 1 else 0.0,
           "select_stability_nmi": float(normalized_mutual_info_score(c, cv)) if k_used > 1 else 0.0,
           "select_stability_jaccard": stability_jaccard(c, cv, K) if k_used > 1 else 0.0,
           "select_size_entropy": size_entropy(np.bincount(c, minlength=K), K) if n else 0.0,
           "select_kmeans_nmi": kmeans_nmi}
    out["select_score"] = score(out)
    if (y >= 0).any():
        m = metrics.evaluate(y, c, K)
        out.update(select_acc=m["acc"], select_balanced_acc=m["balanced_acc"], select_nmi=m["nmi"])
    return out

"""The model-selection criterion: what `djc tune` ranks trials by, computed by the training loop every epoch.

The default is label-free, so it works on unlabelled data:

    score = R x (K_used / K)

- R = B / T is the share of the feature scatter that the clustering explains: T = sum_i |z_i - mean|^2 (total),
  W = sum_i |z_i - mu_c(i)|^2 (within the predicted clusters), B = T - W (between). R is the Calinski-Harabasz
  criterion brought to [0, 1]: CH = R / (1 - R) x (N - K_used) / (K_used - 1), also reported (`select_ch`).
  Unlike CH, R is comparable across trials whatever the number of used clusters, and unlike silhouette it needs
  no N x N distances: it comes from per-cluster sufficient statistics (count, sum z, sum |z|^2), one all-reduce.
- K_used / K is the cluster-health penalty: a trial that leaves clusters empty on the split loses that share.
  Collapse to one cluster gives R = 0; features that carry no variance (T ~ 0) give 0.

z are the method's `Prediction.features` on the non-augmented view of a split (`eval.select_split`, ideally a
held-out `val` entry of data.eval), and the clusters its evaluated head. R does not look at class sizes, so it
does not push long-tailed data towards equal clusters. What it cannot see: a clustering that is compact and
well separated but disagrees with the classes; that is what the labelled choices (`select_acc`,
`select_balanced_acc`, Hungarian-matched on the same split) are for when the split has labels.

No Ray here: every worker predicts its own slice of the split, and the reductions go through djc.dist.
"""

from __future__ import annotations

import math

import torch

from djc import dist, metrics
from djc.methods.base import ClusteringMethod
from djc.outputs import local_slice

# djc tune --metric NAME -> the key the training loop reports; all are "higher is better".
METRICS = {"score": "select_score", "acc": "select_acc", "balanced_acc": "select_balanced_acc"}


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


@torch.no_grad()
def selection_metrics(method: ClusteringMethod, url: str, views, device, num_clusters: int,
                      on_corrupt: str = "error") -> dict[str, float]:
    """Every worker calls this with its own slice; all get the same numbers (reduced over workers)."""
    K = num_clusters
    stats, labels, clusters = None, [], []
    for batch in local_slice(url, on_corrupt):
        p = method.predict(views.eval(batch["image"].to(device)))
        z, c = p.features.float().flatten(1), p.clusters[:, 0]
        part = torch.zeros(K, z.shape[1] + 2, dtype=torch.float64, device=z.device)  # (K, D + 2)
        part[:, 0].index_add_(0, c, torch.ones_like(c, dtype=torch.float64))
        part[:, 1].index_add_(0, c, z.square().sum(1).double())
        part[:, 2:].index_add_(0, c, z.double())
        stats = part if stats is None else stats + part
        labels.append(batch["label"])
        clusters.append(c.cpu())
    # A worker with an empty slice still joins the collectives (with zeros of the right shape).
    d = int(dist.all_reduce_max(torch.tensor([0 if stats is None else stats.shape[1]]))[0])
    local = stats.cpu() if stats is not None else torch.zeros(K, d, dtype=torch.float64)
    r, ch, k_used = variance_ratio(dist.all_reduce_sum(local))
    out = {"select_score": r * k_used / K, "select_r": r, "select_ch": ch, "select_clusters_used": k_used}

    y = dist.all_gather_cat(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)).numpy()
    c = dist.all_gather_cat(torch.cat(clusters) if clusters else torch.zeros(0, dtype=torch.long)).numpy()
    if (y >= 0).any():
        m = metrics.evaluate(y, c, K)
        out.update(select_acc=m["acc"], select_balanced_acc=m["balanced_acc"], select_nmi=m["nmi"])
    return out

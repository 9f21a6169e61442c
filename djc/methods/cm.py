"""The clustering module (CM) of Boubekki, Kampffmeyer, Jenssen and Brefeld (Machine Learning 2021),
docs/methods/aecm.md: the losses as pure functions, the module, and a scikit-learn-like estimator.

  gamma = softmax(V x + b) (n, K);  x_tilde = gamma U, centroids u_k = rows of U (K, d)
  E1 = sum_i |x_i - x_tilde_i|^2
  E2 = sum_k [sum_i gamma_ik (1 - gamma_ik)] |u_k|^2
  E3 = - sum_{k != l} [sum_i gamma_ik gamma_il] u_k.u_l
  E4 = sum_k (1 - alpha_(k)) log(mean_i gamma_i(k) + 1e-10), log-means and alpha both sorted ascending
Since sum_k gamma_ik = 1, E1 + E2 + E3 = sum_ik gamma_ik |x_i - u_k|^2: soft k-means, i.e. an isotropic GMM.
The paper's optional output bias c is absorbed into U (U^T gamma + c = (U + 1 c^T)^T gamma).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from djc.methods.base import profile_shares

LOG_FLOOR = 1e-10  # inside log(mean gamma): the official code's floor, so an emptied cluster stays finite


class CMTerms(NamedTuple):
    e1: Tensor  # reconstruction of x by the gamma-weighted centroids, summed over the batch
    e2: Tensor  # sum_k [sum_i gamma_ik (1 - gamma_ik)] |u_k|^2
    e3: Tensor  # - sum_{k != l} [sum_i gamma_ik gamma_il] u_k.u_l


def cm_terms(x: Tensor, gamma: Tensor, u: Tensor) -> CMTerms:
    """x (n, d), gamma (n, K) on the simplex, u (K, d). Sums over the batch (the caller normalises)."""
    e1 = (x - gamma @ u).pow(2).sum()
    sq = u.pow(2).sum(1)  # (K,)
    e2 = ((gamma * (1 - gamma)).sum(0) * sq).sum()
    gu = (gamma.T @ gamma) * (u @ u.T)  # (K, K)
    e3 = -(gu.sum() - gu.diagonal().sum())
    return CMTerms(e1, e2, e3)


def soft_distortion(x: Tensor, gamma: Tensor, u: Tensor) -> Tensor:
    """(n,) sum_k gamma_ik |x_i - u_k|^2: what E1 + E2 + E3 sum to. Expanded as |x|^2 - 2 x.u + |u|^2 (gamma's
    rows sum to 1), so no (n, K, d) difference tensor is made: at n = 512, K = 1000, d = 10 it was 20 MB per
    batch, and predicting ImageNet-LT's 115,846 images in such batches grew a worker to 9 GB (djc bench scale)."""
    return (x * x).sum(1) * gamma.sum(1) - 2 * ((gamma @ u) * x).sum(1) + gamma @ (u * u).sum(1)


def dirichlet_prior(mean_gamma: Tensor, alpha: Tensor, sort: bool = True) -> Tensor:
    """E4 = sum_k (1 - alpha_k) log(mean_gamma + 1e-10), the log-means sorted ascending against an ascending alpha:
    the largest cluster meets the largest alpha, whichever cluster it is. alpha_k > 1 rewards a large share.
    sort=False pairs alpha_k with cluster k instead (the release's CM-alone stage; the same for a uniform alpha)."""
    lmg = torch.log(mean_gamma + LOG_FLOOR)
    if sort:
        lmg = lmg.sort().values
    return ((1.0 - alpha.to(lmg.dtype)) * lmg).sum()


def orthonormality(u: Tensor) -> Tensor:
    """sum_kl |(U U^T - I)_kl|: AE-CM's penalty, which lets E2 drop |u_k|^2 and E3 vanish."""
    g = u @ u.T  # (K, K); |G - I| summed without materialising I or G - I (two more K x K tensors)
    d = g.diagonal()
    return g.abs().sum() - d.abs().sum() + (d - 1.0).abs().sum()


def alpha_vector(alpha: float | Sequence[float], k: int, mode: str = "uniform",
                 expected_imbalance: float = 1.0) -> Tensor:
    """The (K,) ascending Dirichlet parameters.

    uniform: alpha for every cluster (alpha > 1 pushes towards equal sizes);
    sorted:  the K given values;
    profile: 1 + (alpha - 1) K s_k, s the shares of an exponential profile of ratio expected_imbalance, so the
             mean of alpha is unchanged and alpha_k - 1 is proportional to the expected size (the Dirichlet's MAP).
    """
    if mode == "sorted":
        if isinstance(alpha, (int, float)) or len(alpha) != k:
            raise ValueError(f"alpha_mode 'sorted' needs a list of K={k} alphas, got {alpha!r}")
        vals = [float(a) for a in alpha]
    elif isinstance(alpha, (int, float)):
        a = float(alpha)
        vals = [a] * k
        if mode == "profile":
            vals = [1.0 + (a - 1.0) * k * s for s in profile_shares(k, expected_imbalance)]
    else:
        raise ValueError(f"alpha_mode '{mode}' needs a single alpha, got a list; use alpha_mode 'sorted'")
    return torch.tensor(sorted(vals), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# The module.


class CM(nn.Module):
    def __init__(self, dim: int, num_clusters: int):
        super().__init__()
        self.v = nn.Linear(dim, num_clusters)  # gamma = softmax(V x + b)
        self.u = nn.Parameter(nn.init.xavier_uniform_(torch.empty(num_clusters, dim)))  # (K, d) centroids

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(self.v(x), dim=1)

    @torch.no_grad()
    def init_from_centers(self, centers: Tensor, var: float | None = None) -> None:
        """U = centers. var None: V = pinv(U), b = 0 (the paper's "pre" init; V u_k = e_k for independent centers).
        var > 0: V = U / var, b_k = -|u_k|^2 / (2 var), i.e. gamma = the equal-weight isotropic GMM posterior."""
        c = centers.to(self.u.dtype)
        self.u.copy_(c)
        if var is None:
            self.v.weight.copy_(torch.linalg.pinv(c.double()).T.to(c.dtype))  # (K, d)
            self.v.bias.zero_()
        else:
            self.v.weight.copy_(c / var)
            self.v.bias.copy_(-c.pow(2).sum(1) / (2 * var))


def cm_loss(x: Tensor, gamma: Tensor, u: Tensor, alpha: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The paper's summed loss divided by n (one process): per-sample mean of E1 + E2 + E3, plus E4 / n."""
    n = x.shape[0]
    t = cm_terms(x, gamma, u)
    e4 = dirichlet_prior(gamma.mean(0), alpha)
    parts = {"e1": t.e1 / n, "e2": t.e2 / n, "e3": t.e3 / n, "e4": e4 / n}
    return sum(parts.values()), parts  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# A scikit-learn-like estimator on raw vectors or frozen features (one process).


class ClusteringModule:
    """`ClusteringModule(K, alpha=...).fit(X).predict(X)`, X an (n, d) array; Adam on mini-batches, one process.

    Init: k-means (k-means++, `init_iters` Lloyd steps, best of `restarts`), U = centers, then V, b from
    init="posterior" (the isotropic-GMM posterior at that solution) or "pinv" (the official V = pinv(U), b = 0,
    which left a cluster empty on a 5-blob test where K > d). The last epoch's weights are averaged over its steps,
    as in the paper. Loss = the paper's batch sum / batch size, so alpha - 1 is relative to `batch_size`.
    """

    def __init__(self, n_clusters: int, alpha: float | Sequence[float] = 1.0, *, alpha_mode: str | None = None,
                 expected_imbalance: float = 1.0, epochs: int = 200, batch_size: int = 256, lr: float = 1e-2,
                 init: str = "posterior", init_iters: int = 20, restarts: int = 3, seed: int = 0):
        self.n_clusters, self.alpha, self.epochs, self.batch_size = n_clusters, alpha, epochs, batch_size
        self.alpha_mode = alpha_mode or ("uniform" if isinstance(alpha, (int, float)) else "sorted")
        self.expected_imbalance, self.lr, self.init_iters, self.seed = expected_imbalance, lr, init_iters, seed
        self.init, self.restarts = init, restarts

    def fit(self, X: np.ndarray) -> ClusteringModule:
        from djc.methods.kmeans import kmeans

        x = torch.as_tensor(np.asarray(X), dtype=torch.float32)
        n, k = x.shape[0], self.n_clusters
        alpha = alpha_vector(self.alpha, k, self.alpha_mode, self.expected_imbalance)
        with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
            torch.manual_seed(self.seed)
            self.module_ = CM(x.shape[1], k)
        km = kmeans(x, k, iters=self.init_iters, restarts=self.restarts, seed=self.seed)
        var = km.inertia / x.numel() if self.init == "posterior" else None  # per-dimension variance
        self.module_.init_from_centers(km.centers, var)
        params = list(self.module_.parameters())
        opt = torch.optim.Adam(params, lr=self.lr)
        g = torch.Generator().manual_seed(self.seed)
        steps = math.ceil(n / self.batch_size)
        avg = [torch.zeros_like(p) for p in params]
        for epoch in range(self.epochs):
            last = epoch == self.epochs - 1
            for idx in torch.randperm(n, generator=g).split(self.batch_size):
                xb = x[idx]
                loss, _ = cm_loss(xb, self.module_(xb), self.module_.u, alpha)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if last:
                    for a, p in zip(avg, params):
                        a.add_(p.detach() / steps)
        with torch.no_grad():
            for a, p in zip(avg, params):
                p.copy_(a)
        self.cluster_centers_ = self.module_.u.detach().numpy().copy()
        self.weights_ = self.predict_proba(X).mean(0)
        return self

    @torch.no_grad()
    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.module_(torch.as_tensor(np.asarray(X), dtype=torch.float32)).numpy()

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X).argmax(1)

    def fit_predict(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).predict(X)

"""SeCu's losses and assignment rules (docs/methods/secu.md): pure functions of tensors, no state and no
collectives. djc/methods/secu.py holds the method that calls them on the replicated state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from djc.methods.agglomerate import merge_clusters
from djc.methods.base import profile_shares, size_rank


def center_loss(x: Tensor, centers: Tensor, y: Tensor, t_w: float) -> Tensor:
    """x (B, D) normalised features, centers (D, K) normalised, y (B,) labels. Gradient reaches centers only,
    and only through the assigned logit: no center is pushed away by negatives."""
    logits = x.detach() @ centers / t_w  # (B, K)
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    mixed = logits.detach() + onehot * (logits - logits.detach())
    return F.cross_entropy(mixed, y)


def representation_loss(z: Tensor, z_other: Tensor, ybar: Tensor, tau: float) -> Tensor:
    """z, z_other (B, K) logits of two views against the epoch-start centers; ybar (B,) previous labels.
    Target mixes the other view's prediction with the previous label; only the encoder learns."""
    q = (1.0 - tau) * F.softmax(z_other.detach(), dim=1) + tau * F.one_hot(ybar, z.shape[1]).to(z.dtype)
    return -(q * F.log_softmax(z, dim=1)).sum(dim=1).mean()


def _plogp(h: Tensor, n: float | Tensor) -> Tensor:
    p = h / n
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))


def share_norm(hist: Tensor, current: Tensor, n: int, rule: str) -> int | Tensor:
    """What the entropy constraint divides the histogram by to get the shares p_k.

    "dataset": N, the size of the training set (djc). "counted": the instances counted so far, plus 1 for an
    instance not counted yet (the release's `base + 1` in epoch 0, `base` after it), as (B, 1). They differ only
    in the first epoch, where after s of S batches the release's penalty is ~S / s times stronger (N / (s B + 1)).
    """
    if rule == "dataset":
        return n
    return (hist.sum() + (current < 0).long()).to(torch.float64).unsqueeze(1)  # (B, 1)


def entropy_delta(hist: Tensor, current: Tensor, n: int | Tensor) -> Tensor:
    """Exact change of sum_k p_k log p_k (p = hist / n) if instance i moved from `current[i]` to k.

    hist (K,) global counts; current (B,) the instance's label in the histogram, -1 if it is not counted yet;
    n a number or (B, 1) per instance (share_norm). Returns (B, K); 0 at the current cluster.
    """
    h = hist.to(torch.float64)
    c = current.clamp_min(0)
    n_row = n[:, 0] if torch.is_tensor(n) else n
    gain = _plogp(h + 1, n) - _plogp(h, n)  # (1 or B, K) adding one instance to k
    counted = current >= 0
    loss = _plogp(h[c] - 1, n_row) - _plogp(h[c], n_row)  # (B,) removing it from its cluster
    delta = gain + torch.where(counted, loss, torch.zeros_like(loss)).unsqueeze(1)
    delta = torch.where(F.one_hot(c, h.shape[0]).bool() & counted.unsqueeze(1), torch.zeros_like(delta), delta)
    return delta.to(torch.float32)


def prior_delta(hist: Tensor, current: Tensor, n: int | Tensor, log_shares: Tensor) -> Tensor:
    """Change of -sum_k p_k log pi_k if instance i moved from `current[i]` (-1: not counted yet) to k, where
    the size profile pi (log_shares, (K,), largest first) is matched to the clusters by rank: the largest
    cluster by hist gets the largest share.

    Added to entropy_delta, the constraint becomes KL(p || pi) = sum_k p_k log(p_k / pi_k), smallest at p = pi
    up to the order of the clusters, instead of -H(p), smallest at equal sizes. A uniform pi adds the same
    constant to every k and gives back SeCu's rule. Returns (B, K); 0 at the current cluster.
    """
    rank = size_rank(hist)  # (K,) 0 = largest cluster
    cost = -log_shares.to(torch.float64)[rank].unsqueeze(0) / n  # (1 or B, K) joining cluster k
    cost = cost.expand(current.shape[0], -1)  # (B, K)
    counted = current >= 0
    leave = torch.where(counted, cost.gather(1, current.clamp_min(0).unsqueeze(1))[:, 0], torch.zeros_like(cost[:, 0]))
    return (cost - leave.unsqueeze(1)).to(torch.float32)


def dual_step(rho: Tensor, counts: Tensor, batch: int, eta: float, gamma: float, clamp: str = "below_one") -> Tensor:
    """rho_k <- rho_k - eta n_k / B + eta gamma / K, a cluster below gamma B / K gains weight, then clamped at 0.

    clamp "below_one" clamps only when gamma < 1 (the release): at gamma = 1 the step's changes sum to 0 over k,
    so the unclamped duals keep a zero sum and only their differences act on the argmax. "always": djc's earlier rule.
    """
    k = rho.shape[0]
    rho = rho - eta * counts.to(rho.dtype) / batch + eta * gamma / k
    return rho.clamp_min(0.0) if clamp == "always" or gamma < 1 else rho


def auto_gamma(num_clusters: int, imbalance_ratio: float) -> float:
    """Smallest class share, as a fraction of N/K, under an exponential profile of this ratio (methods.md s6):
    gamma = K r / sum_c r^(c / (K - 1)), r = 1 / ratio. Ratio 1 gives 1; ratio 10 with K = 10 gives 0.244."""
    return num_clusters * profile_shares(num_clusters, imbalance_ratio)[-1]


def merge_centers(centers: Tensor, alive: Tensor, k: int) -> Tensor:
    """Group ids in [0, k) for the M columns of `centers` (D, M), normalised: average linkage (UPGMA) on the
    cosine distance between the alive columns (those holding instances), stopped at k groups; a dead column
    joins the group of its most similar alive one. Fewer than k alive columns give one group each.

    Each alive center is one piece of djc.methods.agglomerate's merge, criterion "average": the mean cosine
    similarity between the centers of two groups. The linkage sees the centers only, not how many instances
    each holds, so a small class that owns a center is no likelier to be merged away than a big one, while a
    big class that a balanced head splits over several nearby centers has them joined first. Deterministic
    (float64 on the host), so every worker computes the same groups from its replicated centers.
    """
    c = F.normalize(centers.detach().T.double().cpu(), dim=1)  # (M, D)
    live = alive.cpu().nonzero().squeeze(1)
    if live.numel() == 0:  # before any assignment: every center counts
        live = torch.arange(c.shape[0])
    cl = c[live]
    _, label = merge_clusters(torch.cat([torch.ones_like(cl[:, :1]), cl, cl * cl], dim=1), k, "average")
    # Renumbered by first alive column: which piece of a merged pair names the group depends on float ties,
    # which 1 and W workers break differently; the partition does not.
    _, inv = torch.unique(label, return_inverse=True)
    first = torch.full((int(inv.max()) + 1,), len(inv)).scatter_reduce(0, inv, torch.arange(len(inv)), "amin")
    group_of_live = torch.argsort(torch.argsort(first))[inv]
    nearest = (c @ cl.T).argmax(dim=1)  # (M,) most similar alive column; itself for an alive one
    return group_of_live[nearest]

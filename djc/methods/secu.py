"""SeCu: stable cluster discrimination (Qian, ICCV 2023), docs/methods/secu.md.

Per head h with K_h = K (h + 1) centers W (D, K_h), used column-normalised:
  assignment (no grad)  y_i = argmax_k s_ik + rho_k            (size constraint, duals rho >= 0)
                        y_i = argmax_k s_ik - alpha Delta_ik   (entropy constraint)
  center loss           CE over sg(x)^T w / t_w with every logit but (i, y_i) detached: only centers learn,
                        each instance pulls its own center with weight (1 - p_iy)
  representation loss   CE(q, softmax(x^T W_prev / t_x)), q = (1 - tau) softmax(sg(other view)) + tau onehot(ybar)
The state (duals, entropy histogram, assignment memory, W_prev) is replicated and changed only from global data.

Prediction: head 0's argmax (SeCu), or with predict=merge an over-clustered head's clusters merged to K by
average linkage on their centers (djc's rule for long-tailed data; docs/methods/secu.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from djc import dist
from djc.config import Config
from djc.methods.agglomerate import merge_clusters
from djc.methods.base import (ClusteringMethod, DataInfo, EpochContext, Prediction, StepOut, both_views,
                              cluster_counts)
from djc.models.backbones import build_backbone, projection_head

# ---------------------------------------------------------------------------------------------------------
# Losses and assignment rules: pure functions of tensors.


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
    rank = torch.argsort(torch.argsort(hist, descending=True, stable=True))  # (K,) 0 = largest cluster
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


def profile_shares(num_clusters: int, imbalance_ratio: float) -> list[float]:
    """Cluster shares of an exponential profile of this ratio (methods.md s6): s_c ~ r^(c / (K - 1)), r = 1 / ratio."""
    w = [(1.0 / imbalance_ratio) ** (c / (num_clusters - 1)) for c in range(num_clusters)]
    return [v / sum(w) for v in w]


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


# ---------------------------------------------------------------------------------------------------------
# State: one head's centers and replicated statistics.


class SeCuHead(nn.Module):
    def __init__(self, dim: int, num_clusters: int, num_samples: int, generator: torch.Generator):
        super().__init__()
        w = F.normalize(torch.randn(dim, num_clusters, generator=generator), dim=0)
        self.weight = nn.Parameter(w)  # (D, K) centers, used column-normalised
        self.register_buffer("w_prev", w.clone())  # (D, K) epoch-start snapshot for the representation loss
        self.register_buffer("rho", torch.zeros(num_clusters))  # size duals
        self.register_buffer("hist", torch.zeros(num_clusters, dtype=torch.long))  # global label histogram
        self.register_buffer("memory", torch.full((num_samples,), -1, dtype=torch.int32))  # label per index

    @property
    def num_clusters(self) -> int:
        return self.weight.shape[1]

    def centers(self) -> Tensor:
        return F.normalize(self.weight, dim=0)


class SeCu(ClusteringMethod):
    def __init__(self, cfg: Config, info: DataInfo):
        super().__init__()
        c = cfg.method.secu
        self.c, self.n = c, info.num_samples
        bb = build_backbone(cfg.model.backbone, info.image_shape, cfg.model.width)
        self.backbone = bb.net
        self.proj = projection_head(bb.feat_dim, cfg.model.proj_hidden, cfg.model.proj_dim)
        g = torch.Generator().manual_seed(cfg.seed)
        k = cfg.method.num_clusters
        self.heads = nn.ModuleList(
            SeCuHead(cfg.model.proj_dim, k * (h + 1), info.num_samples, g) for h in range(c.num_heads)
        )
        self.gammas = [c.gamma if c.gamma != "auto" else auto_gamma(hd.num_clusters, c.expected_imbalance)
                       for hd in self.heads]
        if c.size_prior == "profile":  # derived from the config, not state: a non-persistent buffer
            for hd in self.heads:
                hd.register_buffer("log_prior", torch.tensor(
                    profile_shares(hd.num_clusters, c.expected_imbalance)).log(), persistent=False)

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.proj(self.encode(x)), dim=1)

    def embed_views(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Both views' features, batch norm over both views together ("joint") or per view ("separate": the
        release's encoder(view1), encoder(view2))."""
        f = both_views(self.embed, x1, x2, self.c.bn_views == "separate")
        return f[: x1.shape[0]], f[x1.shape[0] :]

    def forward(self, index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
        f1, f2 = self.embed_views(x1, x2)
        lc, lr, labels = f1.new_zeros(()), f1.new_zeros(()), []
        for head in self.heads:
            w = head.centers()
            with torch.no_grad():
                s = 0.5 * (f1 + f2) @ w  # (B, K)
                prev = head.memory[index].long()
                if self.c.constraint == "size":
                    y = (s + head.rho).argmax(dim=1)
                else:
                    n = share_norm(head.hist, prev, self.n, self.c.share_norm)
                    delta = entropy_delta(head.hist, prev, n)  # (B, K)
                    if self.c.size_prior == "profile":  # KL(p || long-tailed profile) instead of -H(p)
                        delta = delta + prior_delta(head.hist, prev, n, head.log_prior)
                    y = (s - self.c.alpha * delta).argmax(dim=1)
                ybar = torch.where(prev >= 0, prev, y)  # epoch 0: the current label
            lc = lc + center_loss(f1, w, y, self.c.t_w) + center_loss(f2, w, y, self.c.t_w)
            z1, z2 = f1 @ head.w_prev / self.c.t_x, f2 @ head.w_prev / self.c.t_x
            lr = lr + representation_loss(z1, z2, ybar, self.c.tau) + representation_loss(z2, z1, ybar, self.c.tau)
            labels.append(y)
        scale = 1.0 / (2 * len(self.heads))  # mean over heads and views
        loss = (lc + lr) * scale
        # (B_global, 1 + H): every worker sees every (index, label); gathered here, once, because both
        # reduce_gradients (which center columns to average) and update_state need the global pairs
        update = dist.all_gather_same_size(torch.stack([index, *labels], dim=1))
        return StepOut(loss, {"center_loss": (lc * scale).detach(), "repr_loss": (lr * scale).detach()}, update)

    @torch.no_grad()
    def update_state(self, update: Tensor) -> None:
        index, bsz = update[:, 0], update.shape[0]  # the global pairs, gathered in forward
        for h, head in enumerate(self.heads):
            y = update[:, 1 + h]
            k = head.num_clusters
            counts = cluster_counts(y, k)
            head.rho.copy_(dual_step(head.rho, counts, bsz, self.c.eta, self.gammas[h], self.c.dual_clamp))
            old = head.memory[index].long()
            head.hist.add_(counts - cluster_counts(old.clamp_min(0), k, keep=old >= 0))
            head.memory[index] = y.to(head.memory.dtype)

    def self_reduced_parameters(self) -> list[str]:
        return [f"heads.{h}.weight" for h in range(len(self.heads))]

    @torch.no_grad()
    def reduce_gradients(self, update: Tensor) -> None:
        # The center loss detaches every logit but the assigned one, so a head's center gradient is zero outside
        # the columns this step's global batch was assigned to. Where the head has more clusters than the global
        # batch has samples (K = 10,000 on ImageNet), only those columns are averaged: D x B_global numbers per
        # head instead of DDP's dense D x K (268 MiB per step for 10 heads at K = 10,000).
        bsz = update.shape[0]  # the global pairs, gathered in forward
        grads, columns = [], []
        for h, head in enumerate(self.heads):
            if head.weight.grad is None:  # every worker must send the same shapes
                head.weight.grad = torch.zeros_like(head.weight)
            grads.append(head.weight.grad)
            columns.append(update[:, 1 + h].contiguous() if head.num_clusters > bsz else None)
        dist.average_gradients_(grads, columns)

    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> None:
        for head in self.heads:
            head.w_prev.copy_(head.centers())

    def param_groups(self) -> list[dict]:
        enc = list(self.backbone.parameters()) + list(self.proj.parameters())
        centers = [h.weight for h in self.heads]
        return [{"params": enc},
                {"params": centers, "lr": self.c.center_lr, "weight_decay": self.c.center_wd, "fixed_lr": True}]

    def merge_groups(self) -> Tensor:
        """(K_h,) group in [0, K) of each cluster of head `merge_head` (predict=merge). Recomputed only when its
        centers or histogram changed: the key is their in-place version counters."""
        head = self.heads[self.c.merge_head]
        key = (head.weight._version, head.hist._version, head.weight.device)
        if getattr(self, "_merge_cache", (None,))[0] != key:
            groups = merge_centers(head.centers(), head.hist > 0, self.heads[0].num_clusters)
            self._merge_cache = (key, groups.to(head.weight.device))
        return self._merge_cache[1]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        f = self.embed(x)
        logits = [f @ h.centers() for h in self.heads]
        clusters = [lg.argmax(dim=1) for lg in logits]
        if self.c.predict == "merge":  # column 0 = the merged over-clustered head; heads 1.. stay as they are
            groups, h = self.merge_groups(), self.c.merge_head
            clusters[0] = groups[clusters[h]]
            p = F.softmax(logits[h] / self.c.t_w, dim=1)
            merged = p.new_zeros(p.shape[0], self.heads[0].num_clusters).index_add_(1, groups, p)
            conf = merged.gather(1, clusters[0].unsqueeze(1)).squeeze(1)
        else:
            conf = F.softmax(logits[0] / self.c.t_w, dim=1).amax(dim=1)
        return Prediction(torch.stack(clusters, dim=1), conf, f)

    def health_counts(self) -> Tensor:
        if self.c.predict == "merge":  # the evaluated clustering's sizes (one host round trip per epoch)
            head = self.heads[self.c.merge_head]
            return torch.zeros_like(self.heads[0].hist).index_add_(0, self.merge_groups(), head.hist)
        return self.heads[0].hist


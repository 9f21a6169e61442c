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

from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from djc import dist
from djc.methods.base import (ClusteringMethod, EpochContext, MethodSettings, Prediction, Setup, StepOut,
                              both_views, cluster_counts, profile_shares)
from djc.methods.kmeans import kmeans
from djc.methods.secu_losses import (auto_gamma, center_loss, dual_step, entropy_delta, merge_centers, prior_delta,
                                     representation_loss, share_norm)
from djc.models.backbones import build_encoder, projection_head

class SeCuConfig(MethodSettings):
    """SeCu (docs/methods/secu.md)."""

    # The size duals compare per-step counts with gamma * B / K: a K above the global batch can never be filled.
    needs_k_le_batch: ClassVar[bool] = True
    num_heads: int = Field(10, gt=0)  # head h has K * (h + 1) clusters; head 0 is evaluated
    constraint: Literal["size", "entropy"] = "size"
    # Lower bound of every cluster's share, as a fraction of N/K. "auto" derives it from expected_imbalance:
    # the smallest class share of an exponential profile, so long-tailed data can satisfy it (docs/methods/secu.md).
    gamma: float | Literal["auto"] = 0.9
    expected_imbalance: float = Field(1.0, ge=1.0)  # for the "auto" settings: expected largest/smallest class ratio
    eta: float = Field(0.1, gt=0.0)  # dual step size of the size constraint
    # Clamp of the size duals at 0: "below_one" only when gamma < 1 (the release; at gamma = 1 the duals keep a
    # zero sum), "always" at every gamma (djc before; differs only at gamma = 1, e.g. gamma=auto at ratio 1)
    dual_clamp: Literal["below_one", "always"] = "below_one"
    # Sizes the entropy constraint pulls towards: uniform = SeCu's -H(p) (equal sizes); profile = KL(p || pi),
    # pi an exponential profile at expected_imbalance matched to the clusters by size rank (docs/methods/secu.md)
    size_prior: Literal["uniform", "profile"] = "uniform"
    alpha: float = Field(6000.0, ge=0.0)  # weight of the entropy constraint (constraint=entropy)
    # What the entropy constraint's shares p_k = n_k / norm divide by: "dataset" = N (djc); "counted" = the
    # instances counted so far (+1 for a new one), the release's rule. They differ in epoch 0 only; counted read
    # 0.745 against 0.783 on digits-LT (3 seeds, noise; docs/methods/secu.md)
    share_norm: Literal["dataset", "counted"] = "dataset"
    t_x: float = Field(0.05, gt=0.0)  # temperature of the representation loss
    t_w: float = Field(0.05, gt=0.0)  # temperature of the center loss
    tau: float = Field(0.2, ge=0.0, le=1.0)  # weight of the previous label in the representation target
    center_lr: float = Field(1.2, gt=0.0)  # constant lr of the centers (0.8 on CIFAR-100-20)
    center_wd: float = Field(0.0, ge=0.0)
    # Batch norm over the two views: "joint" = one encoder pass over both (statistics over 2B images, djc);
    # "separate" = one pass per view (the release; 0.764 against 0.783 on digits-LT, 3 seeds, noise). Only models
    # with batch norm see a difference.
    bn_views: Literal["joint", "separate"] = "joint"
    # The evaluated clustering (predict's column 0). "head": head 0's argmax, SeCu's rule. "merge": head
    # `merge_head`'s K (merge_head + 1) clusters merged to K by average linkage on their centers: on long-tailed
    # data the balanced head 0 splits big classes and merges small ones, while an over-clustered head gives
    # small classes clusters of their own that the merge keeps (docs/methods/secu.md, "SeCu on long-tailed data")
    predict: Literal["head", "merge"] = "head"
    merge_head: int = Field(1, ge=1)
    # The centers at step 0: "random" = unit Gaussian columns (the release); "kmeans" = each head's K_h centers
    # of k-means on the features of the whole training set (djc, for a frozen pretext: the method starts from
    # the partition k-means finds on the features it is handed; docs/methods/secu.md)
    init: Literal["random", "kmeans"] = "random"
    # Where the centers live: "projection" = on the normalised output of SeCu's projection head (the release);
    # "backbone" = on the encoder's own normalised features, no projection head (djc, for a frozen pretext, as
    # StatDEC's pool_space: the pretext's space, which k-means already clusters, rather than one the
    # representation loss re-spreads; on a frozen encoder SeCu is then its constrained assignment and centers)
    center_space: Literal["projection", "backbone"] = "projection"

    @model_validator(mode="after")
    def _consistent(self) -> SeCuConfig:
        if self.gamma != "auto" and not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"method.secu.gamma={self.gamma} must lie in [0, 1] or be 'auto'")
        if self.size_prior != "uniform" and self.constraint != "entropy":
            raise ValueError(f"method.secu.size_prior={self.size_prior} shapes the entropy constraint; it needs "
                             f"method.secu.constraint=entropy (got {self.constraint})")
        return self

    @model_validator(mode="after")
    def _merge_head_exists(self) -> SeCuConfig:
        if self.predict == "merge" and self.merge_head >= self.num_heads:
            raise ValueError(f"method.secu.merge_head={self.merge_head} needs method.secu.num_heads > "
                             f"{self.merge_head} (got {self.num_heads}): heads are numbered from 0")
        return self

class SeCuUpdate(NamedTuple):
    """A step's state update, the same on every worker."""

    pairs: Tensor  # (B_global, 1 + H) int64: [index, label of head 0, ..., head H-1], gathered in forward


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
    def __init__(self, c: SeCuConfig, s: Setup):
        super().__init__()
        self.c, self.n, self.seed, self.km = c, s.num_samples, s.seed, s.kmeans
        bb = build_encoder(s.model, s.image_shape)
        self.backbone = bb.net
        if c.center_space == "backbone":
            self.proj, dim = nn.Identity(), bb.feat_dim
        else:
            self.proj, dim = projection_head(bb.feat_dim, s.model.proj_hidden, s.model.proj_dim), s.model.proj_dim
        g = torch.Generator().manual_seed(s.seed)
        k = s.num_clusters
        self.heads = nn.ModuleList(SeCuHead(dim, k * (h + 1), s.num_samples, g) for h in range(c.num_heads))
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
        update = SeCuUpdate(dist.all_gather_same_size(torch.stack([index, *labels], dim=1)))
        return StepOut(loss, {"center_loss": (lc * scale).detach(), "repr_loss": (lr * scale).detach()}, update)

    @torch.no_grad()
    def update_state(self, update: SeCuUpdate) -> None:
        pairs = update.pairs
        index, bsz = pairs[:, 0], pairs.shape[0]  # the global pairs, gathered in forward
        for h, head in enumerate(self.heads):
            y = pairs[:, 1 + h]
            k = head.num_clusters
            counts = cluster_counts(y, k)
            head.rho.copy_(dual_step(head.rho, counts, bsz, self.c.eta, self.gammas[h], self.c.dual_clamp))
            old = head.memory[index].long()
            head.hist.add_(counts - cluster_counts(old.clamp_min(0), k, keep=old >= 0))
            head.memory[index] = y.to(head.memory.dtype)

    def self_reduced_parameters(self) -> list[str]:
        return [f"heads.{h}.weight" for h in range(len(self.heads))]

    @torch.no_grad()
    def reduce_gradients(self, update: SeCuUpdate) -> None:
        # The center loss detaches every logit but the assigned one, so a head's center gradient is zero outside
        # the columns this step's global batch was assigned to. Where the head has more clusters than the global
        # batch has samples (K = 10,000 on ImageNet), only those columns are averaged: D x B_global numbers per
        # head instead of DDP's dense D x K (268 MiB per step for 10 heads at K = 10,000).
        bsz = update.pairs.shape[0]  # the global pairs, gathered in forward
        grads, columns = [], []
        for h, head in enumerate(self.heads):
            if head.weight.grad is None:  # every worker must send the same shapes
                head.weight.grad = torch.zeros_like(head.weight)
            grads.append(head.weight.grad)
            columns.append(update.pairs[:, 1 + h].contiguous() if head.num_clusters > bsz else None)
        dist.average_gradients_(grads, columns)

    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> None:
        if ctx.epoch == 0 and self.c.init == "kmeans":  # a resumed run starts at a later epoch: centers kept
            f, index = ctx.map_train(lambda x, i: self.embed(x))
            for h, head in enumerate(self.heads):
                km = kmeans(f, head.num_clusters, iters=self.km.iters, restarts=self.km.restarts,
                            seed=self.seed + h, index=index)
                head.weight.copy_(F.normalize(km.centers, dim=1).T)
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


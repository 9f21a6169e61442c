"""StatDEC: statistics pooling for joint debiased representation and imbalanced clustering (Rezaei et al.).
The published equations could not be read: what follows is djc's own design
(docs/methods/statdec.md gives the equations and says which parts are djc's).

  representation   z = normalize(g(f(x))), debiased contrastive loss over the global batch (djc.methods.dcl) with
                   tau_i = pi_{c(i)} clipped to tau_max: the pooled prior is the cardinality estimate
  pooling block    per cluster k, EMA of the global sufficient statistics (sum w, sum w z, sum w z^2) / sum w
                   -> prior pi_k, mean mu_k, diagonal variance sigma^2_k
  clustering       log l_ik = -1/2 sum_d log sigma^2_kd - (nu + D)/2 log(1 + delta^2_ik / nu)  (Student-t,
                   delta^2 = Mahalanobis distance); q_ik = softmax_k(log pi_k + log l_ik)
  target           p_ik ~ pi_k l_ik^s (s = 2): sharpens the likelihood, keeps the prior. DEC's p ~ q^2 / f_k
                   (q without prior) multiplies by 1 / f_k ~ 1 / n_k instead, which pushes towards equal sizes.
  loss             L = L_contrastive + lam KL(P || Q); the statistics are pooled with weights P (no gradient)
  OOD              -max_k log l_ik (no prior: a tail cluster's members are not unusual)
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from djc import dist
from djc.methods import knn_merge
from djc.methods.agglomerate import Merge, merge_clusters
from djc.methods.base import ClusteringMethod, EpochContext, MethodSettings, Prediction, Setup, StepOut
from djc.methods.dcl import TemperatureSchedule, debiased_contrastive_loss
from djc.methods.kmeans import assign, kmeans
from djc.models.backbones import build_encoder, projection_head

Target = Literal["cardinality", "balanced"]
INIT_BLOCK = 4096  # rows scored at once at the init: a (4096, K) block, 16 MB at K = 1000

# ---------------------------------------------------------------------------------------------------------
# The statistics pooling block and the clustering rule: pure functions of tensors.


class Pooled(NamedTuple):
    prior: Tensor  # (K,) pi_k = n_k / sum n
    mean: Tensor  # (K, D) mu_k
    var: Tensor  # (K, D) sigma^2_k, diagonal, floored


def pooled_sums(z: Tensor, w: Tensor) -> Tensor:
    """Sufficient statistics of embeddings z (B, D) under assignment weights w (B, K), soft or one-hot:
    (K, 1 + 2D) = [sum_i w_ik, sum_i w_ik z_i, sum_i w_ik z_i^2]. Sums add over workers; means do not."""
    return torch.cat([w.sum(dim=0)[:, None], w.T @ z, w.T @ (z * z)], dim=1)


def pooled_sums_hard(z: Tensor, labels: Tensor, k: int) -> Tensor:
    """pooled_sums with one-hot weights, without the (B, K) one-hot matrix: (K, 1 + 2D) by index_add (at StatDEC's
    init, N rows x 3K pieces would be 1.4 GB of one-hot on ImageNet-LT)."""
    rows = torch.cat([torch.ones_like(z[:, :1]), z, z * z], dim=1)  # (B, 1 + 2D)
    return z.new_zeros(k, rows.shape[1]).index_add_(0, labels, rows)


def pooled_stats(sums: Tensor, var_floor: float) -> Pooled:
    d = (sums.shape[1] - 1) // 2
    n = sums[:, 0]
    m = n.clamp_min(1e-12)[:, None]
    mean = sums[:, 1 : 1 + d] / m
    var = (sums[:, 1 + d :] / m - mean * mean).clamp_min(var_floor)
    # 1e-8 pseudo-count: before any statistics exist the prior is uniform (1/K), never 0/0.
    prior = (n + 1e-8) / (n + 1e-8).sum()
    return Pooled(prior, mean, var)


def log_kernel(z: Tensor, mean: Tensor, var: Tensor, nu: float) -> Tensor:
    """log of a Student-t density (nu degrees of freedom, diagonal scale var_k) at z, up to a constant shared by
    every cluster and sample; nu = 0 means Gaussian. (B, K), built from (B, D) x (D, K) products, so the
    (B, K, D) difference tensor never exists (B = 1024, K = 1000, D = 128 would be 500 MB)."""
    d = z.shape[1]
    inv = 1.0 / var  # (K, D)
    maha = ((z * z) @ inv.T - 2.0 * z @ (mean * inv).T + (mean * mean * inv).sum(dim=1)).clamp_min(0.0)
    logdet = 0.5 * var.log().sum(dim=1)  # (K,)
    if nu == 0:
        return -0.5 * maha - logdet
    return -0.5 * (nu + d) * torch.log1p(maha / nu) - logdet


def cardinality_target(log_l: Tensor, log_prior: Tensor, sharpen: float) -> Tensor:
    """p_ik ~ pi_k l_ik^s: the likelihood is sharpened, the prior kept at power 1, so a 100:1 mixture stays
    100:1. (Equivalently q_ik^s / pi_k^(s-1) with q the posterior.)"""
    return F.softmax(log_prior + sharpen * log_l, dim=1)


def balanced_target(log_l: Tensor, sharpen: float, freq: Tensor) -> Tensor:
    """DEC's target: q = softmax(log l) (no prior), p_ik ~ q_ik^s / f_k with f_k = sum_i q_ik the (global) soft
    frequency. 1 / f_k ~ 1 / n_k favours small clusters: a 100x larger cluster loses its boundary points."""
    return F.softmax(sharpen * F.log_softmax(log_l, dim=1) - freq.clamp_min(1e-12).log(), dim=1)


def kl_target(p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) per sample, averaged; P is a fixed target (no gradient), 0 log 0 = 0."""
    p = p.detach()
    return (torch.xlogy(p, p) - p * log_q).sum(dim=1).mean()


# ---------------------------------------------------------------------------------------------------------
# State: the pooled statistics, replicated on every worker.


class StatPool(nn.Module):
    """EMA of the global, normalised sufficient statistics per cluster, and the mixture they define.

    Each step's all-reduced sums are divided by their total weight before the EMA, so a k-means init over N
    samples and a step over 2B samples weigh alike, and the n-column always holds the prior (sums to 1).
    Usable alone on fixed embeddings: `init_kmeans`, then `step(z)` repeatedly (tests/test_statdec.py)."""

    def __init__(self, num_clusters: int, dim: int, ema: float = 0.9, nu: float = 1.0, sharpen: float = 2.0,
                 var_floor: float = 1e-4, target: Target = "cardinality", hard: bool = False,
                 kernel_temperature: float = 1.0, merges: tuple[Merge | str, ...] = ("bhattacharyya", "ward")):
        super().__init__()
        self.ema, self.nu, self.sharpen, self.var_floor, self.kind, self.hard = ema, nu, sharpen, var_floor, \
            target, hard
        self.kernel_t, self.merges = kernel_temperature, merges
        self.register_buffer("sums", torch.zeros(num_clusters, 1 + 2 * dim))  # normalised (n, sum z, sum z^2)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))  # statistics initialised

    def stats(self) -> Pooled:
        return pooled_stats(self.sums, self.var_floor)

    def log_kernel(self, z: Tensor) -> Tensor:
        """log l / T: the tempered kernel every posterior, target and init score of this head uses."""
        s = self.stats()
        return log_kernel(z, s.mean, s.var, self.nu) / self.kernel_t

    def posterior(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(log q, log l), each (B, K); q has the prior pi for the cardinality target, none for DEC's."""
        log_l = self.log_kernel(z)
        if self.kind == "balanced":
            return F.log_softmax(log_l, dim=1), log_l
        return F.log_softmax(self.stats().prior.log() + log_l, dim=1), log_l

    def target(self, log_q: Tensor, log_l: Tensor) -> Tensor:
        """P (B, K), no gradient. The balanced target's f_k is all-reduced: call it on every worker."""
        with torch.no_grad():
            if self.kind == "balanced":
                return balanced_target(log_l, self.sharpen, dist.all_reduce_sum(log_q.exp().sum(dim=0)))
            return cardinality_target(log_l, self.stats().prior.log(), self.sharpen)

    def weights(self, p: Tensor) -> Tensor:
        return F.one_hot(p.argmax(dim=1), p.shape[1]).to(p.dtype) if self.hard else p

    @torch.no_grad()
    def update(self, local_sums: Tensor) -> None:
        """ONE collective for all three statistics, then `update_global`."""
        self.update_global(dist.all_reduce_sum(local_sums))

    @torch.no_grad()
    def update_global(self, glob: Tensor) -> None:
        """Divide the global sums by their total weight, then the EMA. Before `ready` the statistics stay as
        they are (a tensor condition: no host sync per step)."""
        glob = glob / glob[:, 0].sum().clamp_min(1e-12)
        self.sums.copy_(torch.where(self.ready, torch.lerp(glob, self.sums, self.ema), self.sums))

    @torch.no_grad()
    def reset(self, global_sums: Tensor) -> None:
        """Start from global sufficient statistics (identical on every worker)."""
        self.sums.copy_(global_sums / global_sums[:, 0].sum().clamp_min(1e-12))
        self.ready.fill_(True)

    @torch.no_grad()
    def init_kmeans(self, z_local: Tensor, iters: int = 50, restarts: int = 3, seed: int = 0,
                    over: int = 3, index: Tensor | None = None) -> None:
        """k-means with over * K centers (identical on every worker), one all-reduce of the pieces' statistics,
        both merges to K (deterministic), and the one under which the data are more likely (this head's mixture)
        wins. Plain k-means at 100:1 splits the big cluster (ACC 0.73, tests/test_statdec.py; merge 1.00); on
        contrastive digits features the size-free merge chains classes (0.41), Ward's does not (0.61)."""
        k, z = self.sums.shape[0], z_local.float()
        centers = kmeans(z, over * k, iters=iters, restarts=restarts, seed=seed, index=index).centers
        labels, _ = assign(z, centers)
        pieces = dist.all_reduce_sum(pooled_sums_hard(z, labels, over * k))
        if over == 1:
            self.reset(pieces)
            return
        if "knn" in self.merges and index is None:  # the rows' positions in the rank-order concatenation
            offset = int(dist.all_gather_cat(torch.tensor([len(z)], device=z.device))[: dist.rank()].sum().item())
            index = torch.arange(offset, offset + len(z), device=z.device)
        cands = [knn_merge.merge_pieces(z, index, labels, pieces, k, seed=seed) if c == "knn"
                 else merge_clusters(pieces, k, c) for c in self.merges]
        local = []
        for sums, piece_to_cluster in cands:
            st = pooled_stats(sums / sums[:, 0].sum(), self.var_floor)
            # Hard partition likelihood: each row scored in the cluster its piece was merged into; rows in blocks,
            # so the (rows, K) kernel never exists for all N rows at once (58k x 1000 x 4 B = 232 MB a worker).
            total = z.new_zeros(())
            for zb, lb in zip(z.split(INIT_BLOCK), labels.split(INIT_BLOCK)):
                lk = log_kernel(zb, st.mean, st.var, self.nu) / self.kernel_t + st.prior.log()
                total = total + lk.gather(1, piece_to_cluster[lb][:, None]).sum()
            local.append(total)
        score = dist.all_reduce_sum(torch.stack(local))  # ONE collective: the global log-likelihood of each
        self.reset(cands[int(score.argmax())][0])

    @torch.no_grad()
    def step(self, z: Tensor) -> None:
        """One pooling step on fixed embeddings: targets from the current statistics, then the EMA update."""
        log_q, log_l = self.posterior(z)
        self.update(pooled_sums(z, self.weights(self.target(log_q, log_l))))


class StatDECConfig(MethodSettings, TemperatureSchedule):
    """StatDEC (djc's own design, docs/methods/statdec.md)."""

    # temperature and its schedule: TemperatureSchedule (djc/methods/dcl.py), as DCL's
    tau_max: float = Field(0.3, ge=0.0, lt=1.0)  # cap of tau+ = prior of the anchor's cluster; 0 = plain NT-Xent
    lam: float = Field(1.0, ge=0.0)  # weight of KL(P || Q); 0 = clustering on fixed contrastive features
    # EMA of the pooled cluster statistics per step: ~1/(1-ema) = 10 steps of samples; raise (0.99) when a tail
    # cluster sees fewer than ~10 samples in that many steps (ImageNet-LT: 5 images in 115k)
    ema: float = Field(0.9, ge=0.0, lt=1.0)
    nu: float = Field(1.0, ge=0.0)  # Student-t degrees of freedom of the kernel; 0 = Gaussian (lighter tails)
    sharpen: float = Field(2.0, ge=1.0)  # power s of the likelihood in the target p ~ pi l^s (DEC's 2)
    # cardinality: p ~ pi l^s keeps the data's cluster sizes; balanced: DEC's p ~ q^2 / f (ablation only)
    target: Literal["cardinality", "balanced"] = "cardinality"
    assign: Literal["soft", "hard"] = "soft"  # statistics pooled with the target P, or with its argmax
    var_floor: float = Field(1e-4, gt=0.0)  # least per-dimension variance: raise if a cluster collapses to a point
    warmup_frac: float = Field(0.2, ge=0.0, le=1.0)  # share of epochs of contrastive-only training before init
    init_over: int = Field(3, ge=1)  # k-means with init_over * K centers, merged to K (1 = plain k-means)
    # Merges of the init's pieces tried; the one under which the data are most likely wins (docs/methods/statdec.md)
    # knn (djc's): the pieces merged by average linkage of their members' kNN edges (djc/methods/knn_merge.py)
    init_merges: list[Literal["bhattacharyya", "ward", "average", "knn"]] = Field(
        default_factory=lambda: ["bhattacharyya", "ward"], min_length=1)
    # T of the tempered kernel log l / T: at D = 128 the density's log-odds between clusters are ~40 nats, so Q is
    # one-hot, P = Q and KL has no gradient; T ~ D / 4 makes them O(1) (docs/methods/statdec.md)
    kernel_temperature: float = Field(1.0, gt=0.0)
    # Space of the pooled mixture and of the KL's pull (djc's extension): projection = z, where the contrastive loss
    # lives; backbone = the normalised backbone features f(x) / |f(x)| before the projection head, which keep the
    # classes together better on long-tailed digits (docs/methods/statdec.md); set kernel_temperature ~ dim / 4
    pool_space: Literal["projection", "backbone"] = "projection"

class StatDECUpdate(NamedTuple):
    """A step's state update, the same on every worker."""

    sums: Tensor  # (K, 1 + 2 D) the global batch's pooled (weight, sum u, sum u^2), all-reduced in forward


# ---------------------------------------------------------------------------------------------------------
# The method.


class StatDEC(ClusteringMethod):
    def __init__(self, c: StatDECConfig, s: Setup):
        super().__init__()
        self.c, self.n, self.seed, self.km = c, s.num_samples, s.seed, s.kmeans
        bb = build_encoder(s.model, s.image_shape)
        self.backbone = bb.net
        self.proj = projection_head(bb.feat_dim, s.model.proj_hidden, s.model.proj_dim)
        dim = bb.feat_dim if c.pool_space == "backbone" else s.model.proj_dim
        self.pool = StatPool(s.num_clusters, dim, c.ema, c.nu, c.sharpen, c.var_floor,
                             c.target, c.assign == "hard", c.kernel_temperature, tuple(c.init_merges))
        self._temperature = c.temperature_at(0)  # a host number, set at every epoch start (a resume starts one)

    def embed(self, x: Tensor) -> Tensor:
        """The pooled embedding u (what the mixture clusters and prediction returns as features)."""
        return self.embed_both(x)[1]

    def embed_both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z, u): the contrastive embedding z = normalize(g(f(x))) and the pooled one u, which is z, or with
        pool_space=backbone the normalised backbone features f(x) / |f(x)|."""
        f = self.encode(x)
        z = F.normalize(self.proj(f), dim=1)
        return z, (F.normalize(f, dim=1) if self.c.pool_space == "backbone" else z)

    def forward(self, index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
        c, b = self.c, x1.shape[0]
        z, u = self.embed_both(torch.cat([x1, x2]))  # (2b, .), one pass: BN statistics over both views
        log_q, log_l = self.pool.posterior(u)  # (2b, K); the statistics are buffers: only u gets gradients
        p = self.pool.target(log_q, log_l)
        with torch.no_grad():
            y = (p[:b] + p[b:]).argmax(dim=1)  # (b,) the anchor's cluster, both views agreeing
            # Uniform prior before init gives tau = 1/K, Chuang's choice for K balanced classes.
            tau = self.pool.stats().prior[y].clamp(0.0, c.tau_max).repeat(2)  # (2b,)
        z_all = dist.all_gather_with_grad(z)  # (W * 2b, D), blocks [worker w: view 1, view 2]
        j, off = torch.arange(2 * b, device=z.device), dist.rank() * 2 * b
        con = debiased_contrastive_loss(z, z_all, off + (j + b) % (2 * b), off + j, self._temperature, tau)
        # KL is per sample (a local mean); it is off (x 0) until the statistics exist.
        kl = kl_target(p, log_q) * self.pool.ready.to(z.dtype)
        loss = con.loss + c.lam * kl
        logs = {"contrastive": con.loss.detach(), "kl": kl.detach(), "tau_plus": tau.mean(),
                "min_prior": self.pool.stats().prior.min(), "temperature": z.new_full((), self._temperature)}
        # ONE collective for the three pooled statistics of the global batch
        sums = dist.all_reduce_sum(pooled_sums(u.detach(), self.pool.weights(p.detach())))
        return StepOut(loss, logs, StatDECUpdate(sums))

    @torch.no_grad()
    def update_state(self, update: StatDECUpdate) -> None:
        self.pool.update_global(update.sums)

    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> None:
        # After a contrastive warm-up the embeddings cluster; k-means on them seeds the statistics once
        # (`ready` is checkpointed, so a resumed run does not redo it). One host sync per epoch.
        self._temperature = self.c.temperature_at(ctx.epoch)
        start = min(ctx.epochs - 1, round(self.c.warmup_frac * ctx.epochs))
        if ctx.epoch >= start and not bool(self.pool.ready):
            z, index = ctx.map_train(lambda x, index: self.embed(x))  # global indices: seeding ignores sharding
            self.pool.init_kmeans(z, self.km.iters, self.km.restarts, self.seed, self.c.init_over, index)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        z = self.embed(x)
        log_q, log_l = self.pool.posterior(z)  # no collective here: workers predict different numbers of batches
        conf, y = log_q.exp().max(dim=1)
        return Prediction(y[:, None], conf, z, -log_l.amax(dim=1))

    def health_counts(self) -> Tensor:
        # Estimated sizes pi_k N from the replicated prior (no collective, no host sync).
        return (self.pool.stats().prior * self.n).round().long()

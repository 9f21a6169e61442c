"""Debiased contrastive clustering (Zheng, Nam, Dorigatti, Bischl, Azizi, Rezaei), docs/methods/dcl.md.

  L = L_debiased + lambda L_div, one backbone f, a projection z = normalize(g(f(x))) and a cluster head
  A = softmax(out(h)), h = BN(ReLU(Linear(f(x)))).
  L_debiased (Chuang et al. 2020), negatives over the GLOBAL batch, M = 2 B_global - 2:
     Ng_i = max((sum_j exp(z_i.z_j / t) - tau_i M exp(z_i.z_i+ / t)) / (1 - tau_i),  M exp(-1/t))
     loss_i = -log(exp(z_i.z_i+ / t) / (exp(z_i.z_i+ / t) + Ng_i))
  tau_i: one scalar tau_plus ("global"), or the share n_c(i) / (instances counted so far; N once every instance
     is counted) of the anchor's current cluster in the replicated cardinalities, clipped to [0, tau_max]
     ("cluster": djc's long-tail adaptation; tau_plus_share=dataset divides by N from the start).
  L_div (DDC, Kampffmeyer et al. 2019) = L1 + L2 + L3 on the global batch's A and h, per view, views averaged.
  Nearest-neighbour positives (nn_weight > 0, NNCLR, Dwibedi et al. 2021; djc's option): each anchor is also
     replaced by its nearest neighbour in a replicated bank of every instance's last view-1 z (itself left out),
     detached, with the same positive and negatives: L = (1 - w) L_debiased + w L_debiased(NN anchors) + lambda L_div.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from djc import dist
from djc.confignode import Node
from djc.methods.agglomerate import PieceStats
from djc.methods.base import (ClusteringMethod, EpochContext, MethodSettings, Prediction, Setup, StepOut, both_views,
                              cluster_counts)
from djc.models.backbones import build_encoder, projection_head
from djc.models.norm import globalize_batchnorm

class TemperatureSchedule(Node):
    """The contrastive loss's temperature over epochs, for the methods built on it (DCL, StatDEC).

    "constant": `temperature` throughout. "cosine" (Kukleva et al., ICLR 2023, "Temperature schedules for
    self-supervised contrastive methods on long-tail data"): t(e) = t_min + (t - t_min) (1 + cos(pi e / P)) / 2 at
    epoch e, from `temperature` down to `temperature_min` over P = temperature_half_period epochs and back. A high t
    weighs the loss towards telling groups apart, a low t towards telling instances apart; on long-tailed data the
    head classes gain from the first and the tail from the second. Their release steps it per epoch, 0.1 to 1.0
    with P = 200 of 2,000 epochs."""

    # t of the contrastive loss (the DCL release's 0.5; lower, 0.2, for sharper features); with the cosine schedule
    # its high end and start
    temperature: float = Field(0.5, gt=0.0)
    temperature_schedule: Literal["constant", "cosine"] = "constant"
    temperature_min: float = Field(0.1, gt=0.0)  # the cosine's low end
    temperature_half_period: int = Field(10, gt=0)  # epochs from the high end to the low one

    @model_validator(mode="after")
    def _low_below_high(self) -> TemperatureSchedule:
        if self.temperature_schedule == "cosine" and not self.temperature_min < self.temperature:
            raise ValueError(f"temperature_min={self.temperature_min} must be below temperature={self.temperature}: "
                             f"the cosine schedule runs from temperature down to temperature_min")
        return self

    def temperature_at(self, epoch: int) -> float:
        t, lo = self.temperature, self.temperature_min
        if self.temperature_schedule == "constant":
            return t
        return lo + (t - lo) * 0.5 * (1.0 + math.cos(math.pi * epoch / self.temperature_half_period))


class DCLConfig(MethodSettings, TemperatureSchedule):
    """Debiased contrastive clustering (docs/methods/dcl.md). The DCL release trains with Adam lr 1e-3,
    wd 1e-6 (set optim.name=adam in the job)."""

    # DDC's divergence needs every cluster reachable in one global batch.
    needs_k_le_batch: ClassVar[bool] = True
    # "cluster": tau+ per anchor = its cluster's share n_c / N (long-tailed data); "global": one tau_plus for all
    tau_plus_mode: Literal["cluster", "global"] = "cluster"
    tau_plus: float = Field(0.1, ge=0.0, lt=1.0)  # global tau+ (and the first step's in cluster mode): ~1 / classes
    tau_max: float = Field(0.3, ge=0.0, lt=1.0)  # cap of the per-anchor tau+; a head cluster above it is cut here
    # cluster mode: n_c divided by the instances counted so far ("counted") or by N ("dataset": a smaller tau+
    # until every instance has been seen once; the same after the first epoch)
    tau_plus_share: Literal["counted", "dataset"] = "counted"
    # Batch norm over the two views: one encoder pass over both ("joint", djc) or one pass per view ("separate",
    # Chuang et al.'s release: net(pos_1), net(pos_2))
    bn_views: Literal["joint", "separate"] = "joint"
    lam: float = Field(1.0, ge=0.0)  # weight of DDC's divergence loss; 0 = contrastive learning only
    cluster_hidden: int = Field(100, gt=0)  # hidden units h of the cluster head (DDC's 100)
    sigma_frac: float = Field(0.15, gt=0.0)  # kernel sigma^2 as a fraction of the median squared distance (DDC)
    # Over-cluster, then merge (djc's extension for long-tailed data): the cluster head has K x pieces outputs and
    # prediction merges them to K by average linkage on their mean normalised backbone features. DDC keeps the
    # pieces near equal in size, so a tail class can own one (digits-LT: 3 pieces; docs/methods/dcl.md); 1 = DCL
    pieces: int = Field(1, ge=1)
    # NNCLR's nearest-neighbour positive (djc's option): weight w of the loss whose anchors are their nearest
    # neighbours in the bank of every instance's last view-1 embedding, so that a sample is pulled towards what
    # resembles it, not only towards its own other view; 0 = off (no bank). nn_start_epoch: epochs of the plain
    # loss first, while the bank fills (an anchor without a filled neighbour keeps itself)
    nn_weight: float = Field(0.0, ge=0.0, le=1.0)
    nn_start_epoch: int = Field(1, ge=0)
    # The positive is the normalised mean of the anchor's nn_k nearest neighbours in the bank (mean-shift's target,
    # Koohpayegani et al. 2021); 1 = NNCLR's single neighbour
    nn_k: int = Field(1, ge=1)

    def check_run(self, cfg: Any) -> None:
        b = cfg.data.batch_size
        if self.pieces > 1 and cfg.method.num_clusters * self.pieces > b:
            raise ValueError(f"method.dcl.pieces={self.pieces} x method.num_clusters={cfg.method.num_clusters} head "
                             f"outputs exceed the global batch data.batch_size={b}; DDC needs every piece reachable")

class DCLUpdate(NamedTuple):
    """A step's state update, the same on every worker."""

    pairs: Tensor  # (B_global, 2) int64: [index, cluster], gathered in forward
    # pieces > 1: (K x pieces, 1 + 2 D) the global batch's (count, sum u, sum u^2) of the normalised backbone
    # features per piece, all-reduced in forward; None with the paper's K-way head
    piece_sums: Tensor | None = None
    # nn_weight > 0: (B_global, D) the global batch's detached view-1 z, rows in the order of `pairs`, for the bank
    nn_rows: Tensor | None = None


# ---------------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors.


class Debiased(NamedTuple):
    loss: Tensor  # scalar, mean over anchors
    clamped: Tensor  # detached fraction of anchors whose Ng sat on the floor M exp(-1/t)


def debiased_contrastive_loss(anchors: Tensor, z_all: Tensor, pos_index: Tensor, self_index: Tensor,
                              temperature: float, tau_plus: float | Tensor) -> Debiased:
    """anchors (A, D) and z_all (R, D) L2-normalised; pos_index / self_index (A,) the rows of z_all holding
    each anchor's positive and the anchor itself; the other M = R - 2 rows are its negatives.
    tau_plus: a scalar, or (A,) per anchor, in [0, 1). tau_plus = 0 is NT-Xent exactly."""
    t = temperature
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    # Every logit shifted by the largest possible cosine (1/t): exp() <= 1 at any t, and the shift cancels in
    # pos / (pos + Ng) because the floor moves with it (M e^{-1/t} -> M e^{-2/t}). t = 0.05 keeps e^{-40}.
    logits = (anchors @ z_all.T - 1.0) / t  # (A, R)
    pos_logit = logits[rows, pos_index]
    # scatter_ with a scalar fills on the device; `neg[rows, idx] = False` copies the False from the host, a
    # synchronising copy on CUDA (tests/test_step.py's detector, on an H200).
    neg = torch.ones_like(logits, dtype=torch.bool)
    neg.scatter_(1, pos_index[:, None], False)
    neg.scatter_(1, self_index[:, None], False)
    m = z_all.shape[0] - 2
    neg_sum = torch.where(neg, logits.exp(), torch.zeros_like(logits)).sum(dim=1)  # (A,)
    pos = pos_logit.exp()
    ng = (neg_sum - tau_plus * m * pos) / (1.0 - tau_plus)
    floor = m * math.exp(-2.0 / t)  # M e^{-1/t}, shifted: no negative can be less similar than cos = -1
    clamped = ng < floor
    ng = torch.where(clamped, torch.full_like(ng, floor), ng)
    loss = torch.log(pos + ng) - pos_logit  # -log(pos / (pos + Ng))
    return Debiased(loss.mean(), clamped.float().mean().detach())


def gaussian_kernel(h: Tensor, sigma_frac: float) -> Tensor:
    """G_ij = exp(-|h_i - h_j|^2 / (2 sigma^2)), sigma^2 = sigma_frac * median |h_i - h_j|^2 (detached, DDC's
    0.15): the bandwidth follows the feature scale, so no kernel width is tuned per dataset. (B, B)."""
    sq = (h * h).sum(dim=1)
    d2 = (sq[:, None] - 2.0 * h @ h.T + sq[None, :]).clamp_min(0.0)  # no sqrt: cdist's gradient is NaN at 0
    sigma2 = (sigma_frac * d2.detach().median()).clamp_min(1e-12)
    return torch.exp(-d2 / (2.0 * sigma2))


def cs_divergence(a: Tensor, g: Tensor, eps: float = 1e-9) -> Tensor:
    """d_cs(A, G) = 2 / (K (K - 1)) sum_{p<q} a_p^T G a_q / sqrt(a_p^T G a_p a_q^T G a_q), columns a_p of
    A (B, K). 0 when the clusters' kernel densities do not overlap, 1 when every column is the same."""
    k = a.shape[1]
    nom = a.T @ g @ a  # (K, K), symmetric since G is
    d = nom.diagonal()
    ratio = nom.clamp_min(eps) / (d[:, None] * d[None, :]).clamp_min(eps * eps).sqrt()
    # The release sums the upper triangle; the matrix is symmetric, so that is half of all but the diagonal,
    # without its K (K - 1) / 2 pairs of int64 indices and their gather (djc bench scale: K = 1000 -> 10,000).
    return (ratio.sum() - ratio.diagonal().sum()) / (k * (k - 1))


class DDC(NamedTuple):
    l1: Tensor  # cluster separation and compactness in the kernel's space
    l2: Tensor  # orthogonality of the assignment vectors of different samples
    l3: Tensor  # closeness of assignments to the simplex corners, through the same kernel

    @property
    def total(self) -> Tensor:
        return self.l1 + self.l2 + self.l3


def ddc_loss(a: Tensor, h: Tensor, sigma_frac: float) -> DDC:
    """DDC's divergence terms on a batch of assignments A (B, K) (rows on the simplex) and hidden h (B, H)."""
    b = a.shape[0]
    g = gaussian_kernel(h, sigma_frac)
    s = a.sum(dim=0)
    # 2 / (B (B - 1)) sum_{i<j} a_i^T a_j = (|sum_i a_i|^2 - sum_i |a_i|^2) / (B (B - 1)), without the B x B matrix.
    l2 = (s @ s - (a * a).sum()) / (b * (b - 1))
    # M_iq = exp(-|a_i - e_q|^2) = exp(-(|a_i|^2 - 2 a_iq + 1)).
    m = torch.exp(-((a * a).sum(dim=1, keepdim=True) - 2.0 * a + 1.0))
    return DDC(cs_divergence(a, g), l2, cs_divergence(m, g))


# ---------------------------------------------------------------------------------------------------------
# State: the evaluated head's cluster cardinalities, replicated on every worker.


class Cardinality(nn.Module):
    """Per-instance last label and the histogram of those labels over the N instances: n_k exactly, from
    global (index, label) pairs. n_c / N estimates the chance that a negative shares the anchor's class."""

    def __init__(self, num_clusters: int, num_samples: int):
        super().__init__()
        self.register_buffer("memory", torch.full((num_samples,), -1, dtype=torch.int32))  # label per index
        self.register_buffer("hist", torch.zeros(num_clusters, dtype=torch.long))  # n_k over remembered ones

    def tau_plus(self, y: Tensor, fallback: float, tau_max: float, share: str = "counted") -> Tensor:
        """(B,) the share of y_i's cluster, clipped to [0, tau_max]; `fallback` while no instance is counted (first
        step). share "counted": n_{y_i} / (instances counted so far), the share among those seen; "dataset":
        n_{y_i} / N, which in the first epoch, before every instance is counted, is that share times the fraction
        seen (a smaller tau+). A tensor condition, not an `if`: no host sync per step."""
        total = self.hist.sum()
        norm = total.clamp_min(1) if share == "counted" else self.memory.shape[0]
        p = self.hist.float()[y] / norm
        return torch.where(total > 0, p.clamp(0.0, tau_max), torch.full_like(p, fallback))

    @torch.no_grad()
    def update(self, index: Tensor, y: Tensor) -> None:
        k = self.hist.shape[0]
        old = self.memory[index].long()
        self.hist.add_(cluster_counts(y, k) - cluster_counts(old.clamp_min(0), k, keep=old >= 0))
        self.memory[index] = y.to(self.memory.dtype)


# ---------------------------------------------------------------------------------------------------------
# The method.


class DCL(ClusteringMethod):
    def __init__(self, c: DCLConfig, s: Setup):
        super().__init__()
        self.c, self.k = c, s.num_clusters
        k = self.k * c.pieces  # the head's outputs: K, or K x pieces merged to K at prediction
        bb = build_encoder(s.model, s.image_shape)
        self.backbone = bb.net
        self.proj = projection_head(bb.feat_dim, s.model.proj_hidden, s.model.proj_dim)
        hid = self.c.cluster_hidden
        self.cluster_hidden = globalize_batchnorm(
            nn.Sequential(nn.Linear(bb.feat_dim, hid), nn.ReLU(inplace=True), nn.BatchNorm1d(hid)))
        self.cluster_out = nn.Linear(hid, k)
        self.card = Cardinality(k, s.num_samples)
        # pieces > 1: the statistics of the head's pieces in the normalised backbone features, merged at prediction
        self.piece_stats = PieceStats(k, bb.feat_dim) if c.pieces > 1 else None
        self._temperature = c.temperature_at(0)  # a host number, set at every epoch start (a resume starts one)
        self._nn_on = False  # whether this epoch uses the bank's neighbours (set at every epoch start)
        if c.nn_weight > 0:  # the NNCLR bank: each instance's last view-1 z, keyed by dataset index, replicated
            self.register_buffer("nn_bank", torch.zeros(s.num_samples, s.model.proj_dim))
            self.register_buffer("nn_filled", torch.zeros(s.num_samples, dtype=torch.bool))

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        f = self.encode(x)
        h = self.cluster_hidden(f)
        return F.normalize(self.proj(f), dim=1), h, F.softmax(self.cluster_out(h), dim=1), f

    def forward(self, index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
        c, b = self.c, x1.shape[0]
        z, h, a, f = both_views(self._heads, x1, x2, c.bn_views == "separate")  # (2b, .) each, [view 1; view 2]
        d, e = z.shape[1], h.shape[1]
        # ONE gather (with gradient) for the contrastive negatives and DDC's global batch: (W * 2b, D + H + K),
        # rows in blocks [worker w: view 1 (b rows), view 2 (b rows)].
        glob = dist.all_gather_with_grad(torch.cat([z, h, a], dim=1))
        w = glob.shape[0] // (2 * b)
        z_all = glob[:, :d]
        j = torch.arange(2 * b, device=z.device)
        off = dist.rank() * 2 * b  # this worker's block
        with torch.no_grad():
            y = (a[:b] + a[b:]).argmax(dim=1)  # (b,) the anchor's current cluster, both views agreeing
        if c.tau_plus_mode == "cluster":
            tau: float | Tensor = self.card.tau_plus(y, c.tau_plus, c.tau_max, c.tau_plus_share).repeat(2)  # (2b,)
        else:
            tau = c.tau_plus
        deb = debiased_contrastive_loss(z, z_all, off + (j + b) % (2 * b), off + j, self._temperature, tau)
        con = deb.loss
        if self._nn_on:
            nn_loss = debiased_contrastive_loss(self._neighbors(z.detach(), index.repeat(2)), z_all,
                                                off + (j + b) % (2 * b), off + j, self._temperature, tau).loss
            con = (1.0 - c.nn_weight) * con + c.nn_weight * nn_loss
        # DDC per view on the global batch; DDC's terms are permutation invariant, so the block order is fine.
        views = glob.view(w, 2, b, -1)
        div = [ddc_loss(views[:, v, :, d + e:].reshape(w * b, -1), views[:, v, :, d:d + e].reshape(w * b, -1),
                        c.sigma_frac) for v in (0, 1)]
        ddc = DDC(*(0.5 * (p + q) for p, q in zip(div[0], div[1])))
        # Each worker returns the SAME global DDC value: the gather's backward sums the W workers' gradients and
        # DDP averages them, so W * L_div / W = the 1-process gradient. The contrastive part is a local mean.
        loss = con + c.lam * ddc.total
        logs = {"debiased": deb.loss.detach(), "ddc_l1": ddc.l1.detach(), "ddc_l2": ddc.l2.detach(),
                "ddc_l3": ddc.l3.detach(), "clamped": deb.clamped,
                "tau_plus": tau.mean().detach() if torch.is_tensor(tau) else z.new_full((), tau),
                "temperature": z.new_full((), self._temperature)}
        if self._nn_on:
            logs["nn_loss"] = nn_loss.detach()
        piece_sums = None
        if self.piece_stats is not None:  # both views' backbone features, in the anchor's piece: one all-reduce
            piece_sums = dist.all_reduce_sum(
                PieceStats.local_sums(F.normalize(f.detach(), dim=1), y.repeat(2), a.shape[1]))
        # The bank's rows: view 1 of every worker's block, in rank order, as `pairs` gathers the indices
        nn_rows = glob.detach()[:, :d].view(w, 2, b, d)[:, 0].reshape(w * b, d) if c.nn_weight > 0 else None
        return StepOut(loss, logs, DCLUpdate(dist.all_gather_same_size(torch.stack([index, y], dim=1)), piece_sums,
                                             nn_rows))

    @torch.no_grad()
    def _neighbors(self, z: Tensor, index: Tensor) -> Tensor:
        """(A, D) each row's nearest neighbour (cosine) in the bank, the row's own instance and unfilled entries left
        out; a row with no such neighbour keeps itself. A x N similarities: 2 B x N, no N x N matrix."""
        sims = z @ self.nn_bank.T  # (A, N)
        sims = sims.masked_fill(~self.nn_filled, float("-inf"))
        # scatter_ fills on the device; `sims[rows, index] = -inf` copies the -inf from the host (a sync on CUDA)
        sims.scatter_(1, index[:, None], float("-inf"))
        if self.c.nn_k == 1:
            best, nn_index = sims.max(dim=1)
            return torch.where(torch.isfinite(best)[:, None], self.nn_bank[nn_index], z)
        best, nn_index = sims.topk(min(self.c.nn_k, sims.shape[1]), dim=1)
        found = torch.isfinite(best)  # (A, k) neighbours that exist; the mean is over those
        near = (self.nn_bank[nn_index] * found[..., None]).sum(1)
        return torch.where(found[:, :1], F.normalize(near, dim=1), z)

    def on_epoch_start(self, ctx: EpochContext) -> None:
        self._temperature = self.c.temperature_at(ctx.epoch)
        self._nn_on = self.c.nn_weight > 0 and ctx.epoch >= self.c.nn_start_epoch

    @torch.no_grad()
    def update_state(self, update: DCLUpdate) -> None:
        self.card.update(update.pairs[:, 0], update.pairs[:, 1])
        if update.nn_rows is not None:
            self.nn_bank[update.pairs[:, 0]] = update.nn_rows
            self.nn_filled.index_fill_(0, update.pairs[:, 0], True)  # `[idx] = True` copies from the host
        if update.piece_sums is not None:
            self.piece_stats.update_global(update.piece_sums)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        z, _, a, _ = self._heads(x)
        if self.piece_stats is None:
            conf, y = a.max(dim=1)
            return Prediction(y[:, None], conf, z)
        # Over-clustered head: the piece among those that hold instances, then its group (column 1 keeps the piece).
        alive = self.card.hist > 0
        piece = a.masked_fill(~alive, -1.0).argmax(dim=1)
        groups = self.piece_stats.groups(self.k, alive)
        merged = a.new_zeros(a.shape[0], self.k).index_add_(1, groups, a)  # (B, K) probability of each group
        y = groups[piece]
        return Prediction(torch.stack([y, piece], dim=1), merged.gather(1, y[:, None]).squeeze(1), z)

    def health_counts(self) -> Tensor:
        if self.piece_stats is None:
            return self.card.hist
        return torch.zeros(self.k, dtype=torch.long, device=self.card.hist.device).index_add_(
            0, self.piece_stats.groups(self.k, self.card.hist > 0), self.card.hist)

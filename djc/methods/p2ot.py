"""P2OT: progressive partial optimal transport for imbalanced clustering (Zhang, Ren, He, ICLR 2024),
docs/methods/p2ot.md.

Pseudo-labels come from a partial, unbalanced OT between the samples of a logits bank and K clusters plus a
virtual cluster:
  cost C = -log softmax(logits) (float64), virtual column cost 0;  kernel Q = exp(-C / eps)
  row marginal 1/n (hard); virtual column 1 - rho (hard); real columns rho/K, KL-relaxed with weight lambda:
      a = (1/n) / (Q b);  b_k = (rho/K / (Q^T a)_k)^(lambda / (lambda + eps));  b_virtual = (1 - rho) / (Q^T a)_virtual
  plan P = diag(a) Q diag(b), total mass 1, mass rho on the real clusters.
  rho(t) = rho0 + (rho1 - rho0) exp(-5 (1 - t/T)^2) over the global step t of T.
Loss: soft cross-entropy of each view's logits against the other view's targets n P_i[:K] (row mass in [0, 1] =
the sample's confidence), mean over this worker's samples and the two directions.
Head: djc's Linear-BN-ReLU-Linear (unbounded logits) or the release's cosine classifier (head=cosine, |logit| <=
10). The first batch_only_epochs epochs solve on the global batch alone (the release: epoch 0).
Both views' plans are one batched solve (two problems in one loop), both warm-started from the last step's
column scalings; view_solves=chained solves them one after the other as the release does.
Distribution: the bank is replicated and filled from all-gathered logits (equal local batches, as the training
loop makes them: one gather, no size exchange), so every worker solves the same global problem (no collective
inside the Sinkhorn loop) and keeps its own rows' targets.
"""

from __future__ import annotations

import functools
import math
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from djc import dist
from djc.methods.base import (ClusteringMethod, EpochContext, MethodSettings, Prediction, Setup, StepOut,
                              cluster_counts, profile_shares, size_rank)
from djc.methods.kmeans import kmeans
from djc.models.backbones import build_encoder, projection_head

CHECK_EVERY = 16  # scaling iterations per host read of convergence (partial_ot)
TINY = 1e-300  # floor of (Q^T a): a cluster no sample can reach gets a huge but finite scaling, not inf * 0


class P2OTConfig(MethodSettings):
    """P2OT (docs/methods/p2ot.md)."""

    # The plan is solved on a bank of global batches and needs every cluster reachable in one of them.
    needs_k_le_batch: ClassVar[bool] = True
    eps: float = Field(0.1, gt=0.0)  # entropic regularisation of the transport plan
    lam: float = Field(1.0, gt=0.0)  # KL weight on the cluster marginal: larger = more balanced (1e6 ~ balanced OT)
    rho0: float = Field(0.1, gt=0.0, le=1.0)  # mass transported at step 0; lower = start from fewer, surer samples
    rho1: float = Field(1.0, gt=0.0, le=1.0)  # mass transported at the last step: rho0 + (rho1 - rho0) e^(-5 (1-t/T)^2)
    bank_batches: int = Field(10, gt=0)  # logits bank, in global batches, that the plan is solved on
    sinkhorn_iters: int = Field(1000, gt=0)  # cap on scaling iterations (warm-started solves converge in far fewer)
    sinkhorn_tol: float = Field(1e-6, gt=0.0)  # relative change of the column scalings that counts as converged
    weight_by_mass: bool = True  # targets keep each sample's transported mass; false = renormalise every row to 1
    # The cluster head: "mlp" = Linear-BN-ReLU-Linear on the features (model.proj_hidden), unbounded logits (djc);
    # "cosine" = the release's cosine classifier, logit_scale * cos(features, v_k), so |logit| <= logit_scale
    head: Literal["mlp", "cosine"] = "mlp"
    logit_scale: float = Field(10.0, gt=0.0)  # head=cosine: the logits' bound (the release's 10)
    # Epochs whose plan is solved on the current global batch alone, without the bank (the release: 1, its bank
    # starts at epoch 1); the bank is still written, so it is full when it starts
    batch_only_epochs: int = Field(0, ge=0)
    # The two views' plans: "batched" = one batched solve, both warm-started from the last step's scalings (djc:
    # half the launches and host reads); "chained" = one after the other, the second warm-started from the first's
    # (the release). Both converge to the same plans within sinkhorn_tol; only the starting points differ.
    view_solves: Literal["batched", "chained"] = "batched"
    # The cosine head's weights at step 0: "random" (the release's nn.Linear init); "kmeans" = the centers of
    # k-means on the features of the whole training set (djc, for a frozen pretext: the plan starts from the
    # partition k-means finds on the features it is handed; docs/methods/p2ot.md). Needs head=cosine: an MLP
    # head has no weight vector per cluster to place.
    init: Literal["random", "kmeans"] = "random"
    # The cluster marginal the plan's KL pulls towards: "uniform" = rho / K each (the release); "profile" = rho
    # times an exponential profile at expected_imbalance, its shares matched to the clusters by the rank of their
    # soft mass in the bank (the heaviest gets the largest), as SeCu's size_prior (djc, for long-tailed data:
    # the uniform pull splits head classes; docs/methods/p2ot.md)
    size_prior: Literal["uniform", "profile"] = "uniform"
    expected_imbalance: float = Field(1.0, ge=1.0)  # size_prior=profile: the expected largest/smallest class ratio

    @model_validator(mode="after")
    def _rho_grows(self) -> P2OTConfig:
        if self.rho0 > self.rho1:
            raise ValueError(f"method.p2ot.rho0={self.rho0} must not exceed method.p2ot.rho1={self.rho1}")
        return self

    @model_validator(mode="after")
    def _init_places_a_cosine_head(self) -> P2OTConfig:
        if self.init == "kmeans" and self.head != "cosine":
            raise ValueError(f"method.p2ot.init=kmeans places the cosine head's weight vectors; it needs "
                             f"method.p2ot.head=cosine (got {self.head})")
        return self


class OTResult(NamedTuple):
    plan: Tensor  # (n, K + 1) float64 (a batch: (P, n, K + 1)); column K is the virtual cluster; rows sum to 1/n
    duals: Tensor  # (K + 1,) column scalings b (a batch: (P, K + 1)): the warm start of the next solve
    iters: int | list[int]  # scaling iterations until converged (a batch: per problem)


def partial_ot(logits: Tensor, rho: float, eps: float = 0.1, lam: float = 1.0, iters: int = 1000,
               tol: float = 1e-6, warm_start: Tensor | None = None, prior: Tensor | None = None) -> OTResult:
    """Scaling iterations of P2OT's partial OT on (n, K) logits, in float64, until the column scalings change by
    less than `tol` (relative) or `iters` run out: partial_ot_batch on a batch of one."""
    res = partial_ot_batch(logits.unsqueeze(0), rho, eps, lam, iters, tol, warm_start, prior)
    return OTResult(res.plan[0], res.duals[0], res.iters[0])


def partial_ot_batch(logits: Tensor, rho: float, eps: float = 0.1, lam: float = 1.0, iters: int = 1000,
                     tol: float = 1e-6, warm_start: Tensor | None = None, prior: Tensor | None = None) -> OTResult:
    """P problems of (n, K) logits, each with its own scalings, in one loop: a step's two views are one batched
    solve, so each iteration's kernels serve both problems (half the launches and host reads of two solves, for a
    loop whose cost on a GPU is launches: djc bench scale). Each problem's result is its own first converged
    iterate, exactly what solving it alone gives; the loop runs until the slowest has converged.

    Convergence is read on the host once per CHECK_EVERY iterations, not once per iteration (a solve takes about
    160 on average on long-tailed digits; each read waits for the device). The block's scalings are kept, so the
    result is the first converged iterate, exactly as a per-iteration check gives; at most CHECK_EVERY - 1
    iterations are wasted. `warm_start`: (K + 1,) for every problem, or (P, K + 1). `prior`: (K,) cluster shares
    summing to 1 that the transported mass rho is spread over (None: rho / K each, the release)."""
    logp = F.log_softmax(logits.double(), dim=2)
    p, n, k = logp.shape
    q = torch.cat([torch.exp(logp / eps), logp.new_ones(p, n, 1)], dim=2)  # (P, n, K + 1); exp(-0 / eps) = 1 virtual
    qt = q.transpose(1, 2)
    row = logp.new_full((1,), 1.0 / n)
    share = logp.new_full((k,), 1.0 / k) if prior is None else prior.to(logp)
    col = torch.cat([rho * share, logp.new_full((1,), 1.0 - rho)])
    power = lam / (lam + eps)  # 1 / 1.1 = 0.909 at the defaults; -> 1 (balanced) as lam -> inf
    exponent = torch.cat([logp.new_full((k,), power), logp.new_ones(1)])  # the virtual column is not relaxed
    b = (warm_start.to(logp) if warm_start is not None else logp.new_full((k + 1,), 1.0 / (k + 1))).expand(p, k + 1)
    # Iterates of a block, row 0 the one before it: each iteration writes its b into its row (no copy), and the
    # block's changes are computed together after it: 6 kernels per iteration (two batched matrix-vector products
    # and four element-wise ops) instead of 12, for a loop whose cost on a GPU is launches (djc bench scale).
    its = logp.new_empty(CHECK_EVERY + 1, p, k + 1, 1)
    result: list[Tensor | None] = [None] * p
    counts = [0] * p
    done = 0
    b = b.unsqueeze(2)  # (P, K + 1, 1): column vectors for the batched products
    while done < iters:
        m = min(CHECK_EVERY, iters - done)
        its[0] = b
        for i in range(1, m + 1):
            t = qt @ torch.div(row, q @ b)
            torch.pow(torch.div(col[:, None], t.clamp_min_(TINY), out=t), exponent[:, None], out=its[i])
            b = its[i]
        new, old = its[1 : m + 1, ..., 0], its[:m, ..., 0]
        changes = torch.linalg.vector_norm(new - old, dim=2) / torch.linalg.vector_norm(new, dim=2)  # (m, P)
        converged = (changes < tol).T.tolist()  # the block's one host read
        for j in range(p):
            if result[j] is None and True in converged[j]:
                first = converged[j].index(True)
                result[j], counts[j] = its[1 + first, j].clone(), done + first + 1
        done += m
        if all(r is not None for r in result):
            break
        b = its[m].clone()
    for j in range(p):  # not converged within `iters`: the last iterate
        if result[j] is None:
            result[j], counts[j] = its[m, j].clone(), done
    b = torch.stack(result)  # (P, K + 1, 1)
    a = torch.div(row, q @ b)  # last row scaling: every row holds exactly 1/n
    return OTResult(a * q * b.transpose(1, 2), b[..., 0], counts)


def ranked_prior(logits: Tensor, shares: Tensor) -> Tensor:
    """(K,) the profile `shares` (largest first) given to the clusters by the rank of their soft mass in the
    (..., K) logits: the heaviest cluster gets the largest share. Ties keep the lower index first."""
    mass = F.softmax(logits.double(), dim=-1).reshape(-1, logits.shape[-1]).sum(0)
    return shares.to(mass)[size_rank(mass)]


def rho_schedule(step: int, total: int, rho0: float, rho1: float = 1.0) -> float:
    """rho0 at t = 0 (plus (rho1 - rho0) e^-5 = 0.6% of the gap), rho1 at t = T."""
    t = min(1.0, step / max(1, total))
    return rho0 + (rho1 - rho0) * math.exp(-5.0 * (1.0 - t) ** 2)


class CosineHead(nn.Module):
    """The release's cosine classifier: logits = scale * normalize(f) @ normalize(v_k), one weight vector v_k per
    cluster (a weight-normalised linear layer without bias whose norm g is fixed at 1), so |logit| <= scale. The
    transport cost -log softmax(logits) then has a bounded range: at scale 10 the most and least likely cluster
    of a sample differ by at most 20 nats, whatever the features."""

    def __init__(self, dim: int, num_clusters: int, scale: float):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(nn.Linear(dim, num_clusters, bias=False).weight.detach().clone())  # (K, D) v

    def forward(self, f: Tensor) -> Tensor:
        return self.scale * F.normalize(f, dim=1) @ F.normalize(self.weight, dim=1).T  # (B, K)


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """mean_i -sum_k target_ik log softmax(logits)_ik; a row's mass weights its sample."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class P2OTUpdate(NamedTuple):
    """A step's state update, the same on every worker (the bank's logits were gathered in forward)."""

    logits: Tensor  # (B_global, K) the second view's detached logits, for the bank
    duals: Tensor  # (K + 1,) warm start for the next step
    counts: Tensor  # (K,) global argmax counts of the first view


class P2OT(ClusteringMethod):
    def __init__(self, c: P2OTConfig, s: Setup):
        super().__init__()
        self.c, self.k, self.seed, self.km = c, s.num_clusters, s.seed, s.kmeans
        bb = build_encoder(s.model, s.image_shape)
        self.backbone = bb.net
        if self.c.head == "cosine":  # the release's head, on the backbone's features
            self.head: nn.Module = CosineHead(bb.feat_dim, self.k, self.c.logit_scale)
        else:  # djc's: Linear-BN-ReLU-Linear, unbounded logits
            self.head = projection_head(bb.feat_dim, s.model.proj_hidden, self.k)  # (B, K) logits
        rows = self.c.bank_batches * s.global_batch  # 10 x global batch
        self.register_buffer("bank", torch.zeros(rows, self.k))  # ring of detached global logits
        self.register_buffer("duals", torch.full((self.k + 1,), 1.0 / (self.k + 1), dtype=torch.float64))
        # [global step t, rows ever written to the bank, total steps T], checkpointed.
        self.register_buffer("counters", torch.zeros(3, dtype=torch.long))
        self.register_buffer("hist", torch.zeros(self.k, dtype=torch.long))  # this epoch's global argmax counts
        if c.size_prior == "profile":  # derived from the config, not state: a non-persistent buffer
            self.register_buffer("shares", torch.tensor(profile_shares(self.k, c.expected_imbalance),
                                                        dtype=torch.float64), persistent=False)
        # Host copy of `counters`, advanced in step with it: the slots, the bank fill and rho are host numbers,
        # and reading them from the device would stall every step. Read back once after a checkpoint load.
        self._host: list[int] | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_host", None))
        self._batch_only = self.c.batch_only_epochs > 0  # set at every epoch start (a resume starts an epoch)

    def _counters(self) -> list[int]:
        if self._host is None:
            self._host = [int(v) for v in self.counters.tolist()]
        return self._host

    def forward(self, index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
        b, k, c = x1.shape[0], self.k, self.c
        z = self.head(self.encode(torch.cat([x1, x2])))  # one pass: BN statistics over both views
        z1, z2 = z[:b], z[b:]
        with torch.no_grad():
            glob = dist.all_gather_same_size(torch.cat([z1.detach().double(), z2.detach().double()], dim=1))
            offset = dist.rank() * b  # rank-order concatenation of equal local batches: our rows start here
            step, written, total = self._counters()
            m, bg = self.bank.shape[0], glob.shape[0]
            rho = rho_schedule(step, total, c.rho0, c.rho1)
            # Both views' plans in one batched solve (partial_ot_batch), each on the bank with the current global
            # batch's rows taken from its view, both warm-started from the last step's scalings.
            views = glob[:, : 2 * k].view(bg, 2, k).transpose(0, 1)  # (2, B_global, K)
            if self._batch_only:  # the release's epoch 0: the plan on this global batch alone, no bank
                slots, n = torch.arange(bg, device=z.device), bg
                mem = views.contiguous()
            else:
                slots = (written + torch.arange(bg, device=z.device)) % m  # the oldest rows, overwritten in turn
                n = min(written + bg, m)  # bank rows in use (it fills over the first bank_batches steps)
                mem = self.bank[:n].to(torch.float64).repeat(2, 1, 1)  # (2, n, K): one float64 copy per view
                mem[:, slots] = views
            # size_prior=profile: the shares ranked on both views' bank, which every worker holds the same
            prior = ranked_prior(mem, self.shares) if c.size_prior == "profile" else None
            solve = functools.partial(partial_ot_batch, rho=rho, eps=c.eps, lam=c.lam, iters=c.sinkhorn_iters,
                                      tol=c.sinkhorn_tol, prior=prior)
            if c.view_solves == "batched":
                res = solve(mem, warm_start=self.duals)
                plans, duals, iters = res.plan, res.duals[1], res.iters
            else:  # the release: view 2's solve starts from view 1's scalings
                first = solve(mem[:1], warm_start=self.duals)
                second = solve(mem[1:], warm_start=first.duals[0])
                plans, duals, iters = torch.cat([first.plan, second.plan]), second.duals[0], first.iters + second.iters
            targets = []  # the second view's scalings warm-start the next step
            for v in range(2):
                t = plans[v, slots[offset : offset + b], :k] * n  # (b, K), row mass = confidence in [0, 1]
                if not c.weight_by_mass:
                    t = t / t.sum(1, keepdim=True).clamp_min(1e-12)
                targets.append(t.to(z.dtype))
            counts = cluster_counts(glob[:, :k].argmax(1), k)
        loss = 0.5 * (soft_cross_entropy(z1, targets[1]) + soft_cross_entropy(z2, targets[0]))
        # new_full fills on the device; new_tensor would copy a host number in, a stream sync on a GPU
        logs = {"rho": z.new_full((), rho), "mass": 0.5 * (targets[0].sum(1).mean() + targets[1].sum(1).mean()),
                "sinkhorn_iters": z.new_full((), sum(iters) / 2),
                "sinkhorn_loop": z.new_full((), max(iters) if c.view_solves == "batched" else sum(iters))}
        return StepOut(loss, logs, P2OTUpdate(glob[:, k : 2 * k].float(), duals, counts))

    @torch.no_grad()
    def update_state(self, update: P2OTUpdate) -> None:
        # Every input is global (gathered in forward), so every worker writes the same rows.
        m, bg = self.bank.shape[0], update.logits.shape[0]
        host = self._counters()
        slots = (host[1] + torch.arange(bg, device=self.bank.device)) % m
        self.bank[slots] = update.logits
        self.duals.copy_(update.duals)
        self.hist.add_(update.counts)
        self.counters[0] += 1
        self.counters[1] += bg
        host[0], host[1] = host[0] + 1, host[1] + bg

    @torch.no_grad()
    def on_epoch_start(self, ctx: EpochContext) -> None:
        self.counters[2] = ctx.epochs * ctx.steps_per_epoch  # T of the rho schedule
        self._counters()[2] = ctx.epochs * ctx.steps_per_epoch
        self._batch_only = ctx.epoch < self.c.batch_only_epochs
        self.hist.zero_()
        if ctx.epoch == 0 and self.c.init == "kmeans":  # a resumed run starts at a later epoch: head kept
            f, index = ctx.map_train(lambda x, i: F.normalize(self.encode(x), dim=1))
            km = kmeans(f, self.k, iters=self.km.iters, restarts=self.km.restarts, seed=self.seed, index=index)
            self.head.weight.copy_(km.centers)  # the head normalises them

    @torch.no_grad()
    def predict(self, x: Tensor) -> Prediction:
        f = self.encode(x)
        p = F.softmax(self.head(f), dim=1)
        conf, y = p.max(dim=1)
        return Prediction(y.unsqueeze(1), conf, f)

    def health_counts(self) -> Tensor:
        return self.hist

"""P2OT's partial OT and its method behave as docs/methods/p2ot.md says, and 2 gloo workers == 1 worker."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from djc.config import from_dict
from djc.optim import apply_lr, make_optimizer
from djc.step import build_method, train_step, wrap_ddp
from djc.methods.base import DataInfo, EpochContext, profile_shares
from djc.methods.kmeans import assign, kmeans
from djc.methods.p2ot import (CHECK_EVERY, TINY, CosineHead, partial_ot, partial_ot_batch, ranked_prior,
                              rho_schedule, soft_cross_entropy)
from tests.gloo import assert_two_workers_equal_one, sharded_map_train, state_tensors

SIZES = [500, 250, 125, 75, 50]  # a 10:1 long tail over K = 5


def _imbalanced_logits(scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((s,), k) for k, s in enumerate(SIZES)])
    return scale * F.one_hot(y, len(SIZES)).float() + torch.randn(len(y), len(SIZES), generator=g), y


@pytest.mark.parametrize("rho", [0.1, 0.5, 1.0])
def test_plan_marginals_match_their_definitions(rho):
    logits, _ = _imbalanced_logits(3.0)
    n, k = logits.shape
    res = partial_ot(logits, rho=rho)
    p = res.plan
    assert p.dtype == torch.float64 and p.shape == (n, k + 1) and (p >= 0).all()
    torch.testing.assert_close(p.sum(1), torch.full((n,), 1.0 / n, dtype=torch.float64))  # row marginal 1/n
    assert (p[:, :k].sum(1) <= 1.0 / n + 1e-15).all()
    assert p[:, :k].sum().item() == pytest.approx(rho, abs=1e-4)  # mass rho on the real clusters
    assert p[:, k].sum().item() == pytest.approx(1.0 - rho, abs=1e-4)  # the rest on the virtual one


def test_small_rho_transports_the_most_confident_samples():
    logits, _ = _imbalanced_logits(3.0)
    p = partial_ot(logits, rho=0.1).plan
    mass = p[:, :-1].sum(1)
    conf = F.softmax(logits.double(), 1).amax(1)
    top = mass.argsort(descending=True)[:100]
    assert conf[top].mean() > conf.mean() + 0.05


def test_large_lambda_reduces_to_balanced_ot():
    logits, _ = _imbalanced_logits(6.0)
    for rho in (0.5, 1.0):
        p = partial_ot(logits, rho=rho, lam=1e6).plan
        torch.testing.assert_close(p[:, :-1].sum(0), torch.full((5,), rho / 5, dtype=torch.float64), rtol=2e-3,
                                   atol=1e-5)


def test_kl_relaxation_assigns_the_true_imbalanced_sizes():
    logits, y = _imbalanced_logits(6.0)
    n = len(y)
    relaxed = partial_ot(logits, rho=1.0, lam=1.0).plan[:, :-1].sum(0) * n
    balanced = partial_ot(logits, rho=1.0, lam=1e6).plan[:, :-1].sum(0) * n
    sizes = torch.tensor(SIZES, dtype=torch.float64)
    assert ((relaxed - sizes).abs() / sizes).max() < 0.15, relaxed  # 500 .. 50 kept within 15%
    assert ((balanced - sizes).abs() / sizes).max() > 1.5  # balanced OT forces 200 each: the tail quadruples


def test_a_profile_prior_spreads_the_mass_over_long_tailed_sizes_by_rank():
    """size_prior=profile: the shares go to the clusters by the rank of their mass (the heaviest the largest), the
    balanced plan's columns then hold rho x those shares instead of rho / K, and a uniform profile (ratio 1) gives
    back the release's plan exactly."""
    logits, _ = _imbalanced_logits(6.0)
    shares = torch.tensor(profile_shares(5, 10.0), dtype=torch.float64)
    prior = ranked_prior(logits[:, [3, 0, 4, 1, 2]], shares)  # columns reordered: masses rank 3, 0, 4, 1, 2
    torch.testing.assert_close(prior, shares[[3, 0, 4, 1, 2]])
    for rho in (0.5, 1.0):
        p = partial_ot(logits, rho=rho, lam=1e6, prior=ranked_prior(logits, shares)).plan
        torch.testing.assert_close(p[:, :-1].sum(0), rho * shares, rtol=2e-3, atol=1e-5)
    flat = torch.tensor(profile_shares(5, 1.0), dtype=torch.float64)
    for lam in (1.0, 1e6):
        torch.testing.assert_close(partial_ot(logits, rho=0.7, lam=lam, prior=flat).plan,
                                   partial_ot(logits, rho=0.7, lam=lam).plan, rtol=0, atol=1e-15)


def test_a_profile_prior_keeps_the_tail_where_the_uniform_pull_splits_the_head():
    """On logits whose classes hold 500 .. 50 samples but are only weakly separated, the balanced pull moves head
    samples into tail clusters; the matching profile (ratio 10) keeps the sizes near the truth (the test can fail:
    the uniform plan's sizes are far from them)."""
    logits, y = _imbalanced_logits(2.0)
    n, sizes = len(y), torch.tensor(SIZES, dtype=torch.float64)
    shares = torch.tensor(profile_shares(5, 10.0), dtype=torch.float64)
    uniform = partial_ot(logits, rho=1.0, lam=1e6).plan[:, :-1].sum(0) * n
    profile = partial_ot(logits, rho=1.0, lam=1e6, prior=ranked_prior(logits, shares)).plan[:, :-1].sum(0) * n
    err = lambda got: ((got - sizes).abs() / sizes).max().item()  # noqa: E731
    assert err(profile) < 0.3 < 1.5 < err(uniform), (profile, uniform)


def test_warm_start_converges_faster_to_the_same_plan():
    logits, _ = _imbalanced_logits(3.0)
    cold = partial_ot(logits, rho=1.0)
    warm = partial_ot(logits + 0.01, rho=1.0, warm_start=cold.duals)
    ref = partial_ot(logits + 0.01, rho=1.0)
    assert warm.iters < ref.iters / 3
    torch.testing.assert_close(warm.plan, ref.plan, rtol=1e-3, atol=1e-8)


def _per_iteration(logits, rho, eps=0.1, lam=1.0, iters=1000, tol=1e-6, warm_start=None):
    """The solver with a host check after every iteration: what partial_ot's blocked checks must reproduce."""
    logp = torch.log_softmax(logits.double(), dim=1)
    n, k = logp.shape
    q = torch.cat([torch.exp(logp / eps), logp.new_ones(n, 1)], dim=1)
    col = torch.cat([logp.new_full((k,), rho / k), logp.new_full((1,), 1.0 - rho)])
    b = warm_start.clone() if warm_start is not None else logp.new_full((k + 1,), 1.0 / (k + 1))
    row = logp.new_full((1,), 1.0 / n)
    exponent = torch.cat([logp.new_full((k,), lam / (lam + eps)), logp.new_ones(1)])
    for done in range(1, iters + 1):
        new = torch.pow(col / (q.T @ (row / (q @ b))).clamp_min(TINY), exponent)
        change, b = float(torch.linalg.vector_norm(new - b) / torch.linalg.vector_norm(new)), new
        if change < tol:
            break
    a = row / (q @ b)
    return a.unsqueeze(1) * q * b.unsqueeze(0), b, done


@pytest.mark.parametrize("iters,tol,warm", [(1000, 1e-6, False), (1000, 1e-6, True), (1000, 1e-3, False),
                                            (CHECK_EVERY * 2 + 5, 1e-12, False), (1, 1e-6, False)])
def test_blocked_convergence_checks_give_the_per_iteration_result_exactly(iters, tol, warm):
    logits, _ = _imbalanced_logits(3.0)
    duals = partial_ot(logits, rho=0.5).duals if warm else None
    got = partial_ot(logits + 0.01, rho=0.5, iters=iters, tol=tol, warm_start=duals)
    plan, b, done = _per_iteration(logits + 0.01, rho=0.5, iters=iters, tol=tol, warm_start=duals)
    assert got.iters == done  # the cases stop mid-block (259, 93), at once (warm: 1) and at caps 37 and 1
    assert torch.equal(got.duals, b) and torch.equal(got.plan, plan)


def test_rho_schedule_grows_from_rho0_to_one():
    assert rho_schedule(0, 100, 0.1) == pytest.approx(0.1 + 0.9 * math.exp(-5))
    assert rho_schedule(100, 100, 0.1) == pytest.approx(1.0)
    assert rho_schedule(50, 100, 0.1) == pytest.approx(0.1 + 0.9 * math.exp(-1.25))
    values = [rho_schedule(t, 100, 0.1) for t in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))


def test_soft_cross_entropy_weights_rows_by_their_mass():
    z = torch.randn(4, 3)
    t = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    assert torch.allclose(soft_cross_entropy(z, t), F.cross_entropy(z, t.argmax(1)))
    assert torch.allclose(soft_cross_entropy(z, 0.5 * t), 0.5 * F.cross_entropy(z, t.argmax(1)))


# ---------------------------------------------------------------------------------------------------------
# The release's rules (rhfeiyang/PPOT), transcribed on small tensors.


class _ReleaseCosClassifier(torch.nn.Module):
    """models/classifer.py Cos_classifier: weight-normalised Linear without bias, g fixed at 1, logits x 10."""

    def __init__(self, dim, k, v, logit_factor=10.0):
        super().__init__()
        self.logit_factor = logit_factor
        lin = torch.nn.Linear(dim, k, bias=False)
        lin.weight.data.copy_(v)
        self.embedding = torch.nn.utils.parametrizations.weight_norm(lin)  # weight = g v / |v|, per output row
        self.embedding.parametrizations.weight.original0.data.fill_(1)  # weight_g
        self.embedding.parametrizations.weight.original0.requires_grad = False

    def forward(self, x):
        return self.embedding(F.normalize(x, dim=1, p=2)) * self.logit_factor


def _release_semicurr_sk(logits, rho, b=None, epsilon=0.1, gamma=1.0, stoperr=1e-6, num_itermax=1000):
    """utils/sinkhorn_knopp.py SemiCurrSinkhornKnopp.forward; returns (n P[:, :K], b) (the release keeps b)."""
    p = -torch.log(torch.softmax(logits.detach().double(), dim=1))
    n, k = p.shape
    q = torch.exp(-torch.cat([p, torch.zeros(n, 1, dtype=p.dtype)], dim=1) / epsilon)
    pa = torch.ones(n, 1, dtype=p.dtype) / n
    pb = rho * torch.ones(q.shape[1], 1, dtype=p.dtype) / k
    pb[-1] = 1 - rho
    b = torch.ones(q.shape[1], 1, dtype=p.dtype) / q.shape[1] if b is None else b
    fi = gamma / (gamma + epsilon)
    err, last_b, it = 1.0, b.clone(), 0
    while err > stoperr and it < num_itermax:
        a = pa / (q @ b)
        b = pb / (q.t() @ a)
        b[:-1, :] = torch.pow(b[:-1, :], fi)
        err = torch.norm(b - last_b)
        last_b, it = b.clone(), it + 1
    plan = q.shape[0] * a * q * b.T
    return plan[:, :-1].float(), b


def test_cosine_head_is_the_releases_cos_classifier():
    g = torch.Generator().manual_seed(0)
    f = 3 * torch.randn(7, 12, generator=g)
    head = CosineHead(12, 5, scale=10.0)
    ref = _ReleaseCosClassifier(12, 5, head.weight.detach())
    ours, theirs = head(f), ref(f)
    assert torch.allclose(ours, theirs, atol=1e-5) and ours.abs().max() <= 10.0
    w = torch.randn(7, 5, generator=g)
    (ours * w).sum().backward()
    (theirs * w).sum().backward()
    assert torch.allclose(head.weight.grad, ref.embedding.parametrizations.weight.original1.grad, atol=1e-5)


@pytest.mark.parametrize("iters,warm", [(1000, False), (1000, True), (CHECK_EVERY + 3, False)])
def test_a_batched_solve_gives_each_problem_its_own_solution_exactly(iters, warm):
    """Two problems in one batched loop (a step's two views): each ends at its own first converged iterate,
    with its own count, although the loop runs until the slower one has converged. To rounding, not to the bit:
    a batched product sums in another order than a single one (one problem alone is bitwise: the test above)."""
    logits, _ = _imbalanced_logits(3.0)
    duals = partial_ot(logits, rho=0.5).duals if warm else None
    pair = torch.stack([logits + 0.01, logits.flip(0) * 1.5])  # different problems, different iteration counts
    got = partial_ot_batch(pair, rho=0.5, iters=iters, warm_start=duals)
    for j in range(2):
        plan, b, done = _per_iteration(pair[j], rho=0.5, iters=iters, warm_start=duals)
        assert got.iters[j] == done
        torch.testing.assert_close(got.duals[j], b, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(got.plan[j], plan, rtol=1e-12, atol=1e-300)
    if iters == 1000:
        assert got.iters[0] != got.iters[1]


def test_batch_only_epoch_solves_each_view_on_the_batch_as_the_release():
    """batch_only_epochs=1: in epoch 0 each view's plan is the release's on the batch alone (no bank), view 2
    warm-started from view 1's column scalings; from epoch 1 the bank, written during epoch 0, is used."""
    cfg = from_dict({"model": {"backbone": "mlp", "width": 16}, "data": {"batch_size": 24},
                     "method": {"name": "p2ot", "num_clusters": 4,
                                "p2ot": {"head": "cosine", "batch_only_epochs": 1, "bank_batches": 2,
                                         "view_solves": "chained"}}})
    method = build_method(cfg, DataInfo(96, (8, 8, 1), 4)).train()
    g = torch.Generator().manual_seed(1)
    b_rel = None
    for epoch, steps in ((0, 3), (1, 1)):
        method.on_epoch_start(EpochContext(epoch, 2, 3, map_train=None))
        for _ in range(steps):
            x1, x2 = torch.randn(24, 1, 8, 8, generator=g), torch.randn(24, 1, 8, 8, generator=g)
            with torch.no_grad():
                z = method.head(method.encode(torch.cat([x1, x2])))  # train-mode BN: what forward computes
            rho = rho_schedule(int(method.counters[0]), int(method.counters[2]), 0.1)
            t1, b_rel = _release_semicurr_sk(z[:24], rho, b_rel)
            t2, b_rel = _release_semicurr_sk(z[24:], rho, b_rel)
            release = 0.5 * (F.cross_entropy(z[:24], t2) + F.cross_entropy(z[24:], t1))  # the release sums; djc means
            out = method(torch.arange(24), x1, x2)
            method.update_state(out.update)
            if epoch == 0:
                assert out.loss.item() == pytest.approx(release.item(), rel=1e-4)
            else:  # the bank's 48 rows (2 batches written in epoch 0) change the plan
                assert out.loss.item() != pytest.approx(release.item(), rel=1e-3)
    assert int(method.counters[1]) == 4 * 24  # the bank was written in every step


# ---------------------------------------------------------------------------------------------------------
# Equivalence: one step on 2 gloo workers with local batches b1, b2 == one step on 1 worker on concat(b1, b2).
# bank_batches = 2 and 4 steps: the bank fills, then wraps.

N, B, STEPS = 64, 16, 4


VARIANTS = {"djc": {}, "release": {"head": "cosine", "batch_only_epochs": 1, "view_solves": "chained"},
            "kmeans": {"head": "cosine", "init": "kmeans"},
            "profile": {"head": "cosine", "init": "kmeans", "size_prior": "profile", "expected_imbalance": 10.0}}


def _cfg(world: int, variant: str = "djc"):
    p2ot = {"bank_batches": 2} | VARIANTS[variant]
    return from_dict({
        "model": {"backbone": "smallconv", "width": 8, "proj_hidden": 32},
        "method": {"name": "p2ot", "num_clusters": 4, "p2ot": p2ot, "kmeans": {"iters": 10, "restarts": 2}},
        "optim": {"name": "sgd", "lr": 0.1},
        "data": {"batch_size": B}, "trainer": {"num_workers": world},
    })


def p2ot_steps(rank: int, world: int, variant: str = "djc") -> dict[str, np.ndarray]:
    cfg = _cfg(world, variant)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    model = wrap_ddp(method) if world > 1 else method
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 1.0)
    g = torch.Generator().manual_seed(123)
    lo, hi = rank * B // world, (rank + 1) * B // world
    map_train = sharded_map_train(method, torch.randn(N, 1, 8, 8, generator=g), rank, world)
    for step in range(STEPS):
        if step % (STEPS // 2) == 0:  # two epochs of 2 steps: with `release`, epoch 0 solves on the batch alone
            method.on_epoch_start(EpochContext(step // (STEPS // 2), 2, STEPS // 2, map_train))
        index = torch.randperm(N, generator=g)[:B]
        x1, x2 = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
        train_step(model, method, opt, index[lo:hi], x1[lo:hi], x2[lo:hi])
    return {k: v.numpy() for k, v in state_tensors(method).items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_workers_equal_one_worker_on_the_concatenated_batch(variant):
    """release: the cosine head and an epoch 0 solved on the batch alone; kmeans: the cosine head placed by
    k-means on the (sharded) training set at epoch 0."""
    single = assert_two_workers_equal_one(p2ot_steps, variant)
    assert single["counters"].tolist() == [STEPS, STEPS * B, STEPS]
    assert (single["bank"] != 0).all()  # 4 global batches through a 2-batch ring: full, every row written


@pytest.mark.parametrize("init", ["random", "kmeans"])
def test_kmeans_init_places_the_cosine_head_at_the_k_means_partition_of_the_features(init):
    """init=kmeans: at epoch 0 the head's weight vectors are k-means' centers of the normalised features of the
    training set, so its argmax is k-means' partition (four well-separated image patterns); a random head's is
    not (the test can fail)."""
    cfg = from_dict({"model": {"backbone": "smallconv", "width": 8},
                     "method": {"name": "p2ot", "num_clusters": 4, "kmeans": {"iters": 10, "restarts": 2},
                                "p2ot": {"head": "cosine", "init": init}}})
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    g = torch.Generator().manual_seed(5)
    truth = torch.arange(N) % 4
    data = 3 * torch.randn(4, 1, 8, 8, generator=g)[truth] + 0.05 * torch.randn(N, 1, 8, 8, generator=g)
    method.on_epoch_start(EpochContext(0, 2, 3, sharded_map_train(method, data, 0, 1)))
    method.eval()
    f = F.normalize(method.encode(data), dim=1)
    km = kmeans(f, 4, iters=10, restarts=2, seed=cfg.seed)
    same = (method.predict(data).clusters[:, 0] == assign(f, km.centers)[0]).float().mean().item()
    assert (same == 1.0) == (init == "kmeans"), same


def test_kmeans_init_needs_the_cosine_head():
    with pytest.raises(ValueError, match="method.p2ot.init=kmeans .* method.p2ot.head=cosine"):
        from_dict({"method": {"name": "p2ot", "p2ot": {"init": "kmeans"}}})

"""StatDEC: the statistics pooling block is exact, the cardinality-aware target keeps a 100:1 mixture that DEC's
target splits, the OOD score ranks far samples first, and 2 gloo workers == 1 worker (docs/methods/statdec.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import multivariate_normal, multivariate_t
from sklearn.metrics import roc_auc_score

from djc.config import from_dict
from djc.optim import apply_lr, make_optimizer
from djc.step import build_method, train_step, wrap_ddp
from djc.methods.agglomerate import merge_clusters
from djc.methods.base import DataInfo, EpochContext
from djc.methods.statdec import (StatPool, balanced_target, cardinality_target, kl_target, log_kernel, pooled_stats,
                                 pooled_sums)
from djc.metrics import cluster_acc, match_clusters
from tests.gloo import assert_two_workers_equal_one, sharded_map_train, state_tensors


@pytest.mark.parametrize("hard", [False, True])
def test_pooling_gives_the_exact_counts_means_and_variances(hard):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(50, 6, generator=g, dtype=torch.float64)
    w = F.softmax(3 * torch.randn(50, 4, generator=g, dtype=torch.float64), dim=1)
    if hard:
        w = F.one_hot(w.argmax(1), 4).double()
    s = pooled_stats(pooled_sums(z, w), var_floor=1e-12)
    zn, wn = z.numpy(), w.numpy()
    for k in range(4):
        n = wn[:, k].sum()
        mu = (wn[:, k, None] * zn).sum(0) / n
        var = (wn[:, k, None] * (zn - mu) ** 2).sum(0) / n  # weighted, biased (the ML estimate)
        if hard:
            members = zn[wn[:, k] == 1]
            assert n == len(members)
            np.testing.assert_allclose(mu, members.mean(0), rtol=1e-10)
            np.testing.assert_allclose(var, members.var(0), rtol=1e-10)
        np.testing.assert_allclose(s.mean[k].numpy(), mu, rtol=1e-10)
        np.testing.assert_allclose(s.var[k].numpy(), var, rtol=1e-8)
        assert s.prior[k].item() == pytest.approx(n / wn.sum(), rel=1e-6)


def test_pool_update_is_one_ema_of_normalised_global_sums():
    pool = StatPool(3, 2, ema=0.75)
    a = pooled_sums(torch.randn(40, 2), F.one_hot(torch.randint(0, 3, (40,)), 3).float())
    b = pooled_sums(torch.randn(10, 2), F.one_hot(torch.randint(0, 3, (10,)), 3).float())
    pool.update(b)
    assert (pool.sums == 0).all()  # before init the statistics do not move
    pool.reset(a)
    pool.update(b)
    torch.testing.assert_close(pool.sums, 0.75 * a / 40 + 0.25 * b / 10)  # 40 and 10 rows weigh alike
    assert pool.stats().prior.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("nu", [0.0, 3.0])
def test_log_kernel_is_the_density_up_to_a_shared_constant(nu):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64)
    mean = torch.randn(3, 4, generator=g, dtype=torch.float64)
    var = 0.2 + torch.rand(3, 4, generator=g, dtype=torch.float64)
    ours = log_kernel(z, mean, var, nu).numpy()
    ref = np.stack([(multivariate_normal(mean[k].numpy(), np.diag(var[k].numpy())) if nu == 0 else
                     multivariate_t(mean[k].numpy(), np.diag(var[k].numpy()), df=nu)).logpdf(z.numpy())
                    for k in range(3)], axis=1)
    np.testing.assert_allclose(ours - ours[:1, :1], ref - ref[:1, :1], rtol=1e-8, atol=1e-8)


def test_targets_differ_in_how_they_treat_cluster_size():
    # One point exactly between a cluster of prior 0.99 and one of 0.01, equal likelihoods.
    log_l = torch.zeros(1, 2)
    p = cardinality_target(log_l, torch.tensor([0.99, 0.01]).log(), 2.0)
    assert p[0, 0].item() == pytest.approx(0.99)  # the prior is kept, not squared, not inverted
    # DEC: f_k = soft frequency over a batch where cluster 0 holds 99x the mass of cluster 1.
    q = balanced_target(log_l, 2.0, torch.tensor([99.0, 1.0]))
    assert q[0, 1].item() == pytest.approx(0.99)  # 1 / f_k hands the point to the small cluster
    # KL(P || Q) is 0 at P = Q and positive elsewhere.
    lq = torch.tensor([[0.7, 0.3]]).log()
    assert kl_target(lq.exp(), lq).item() == pytest.approx(0.0, abs=1e-7)
    assert kl_target(torch.tensor([[1.0, 0.0]]), lq).item() > 0


def test_tempered_kernel_gives_kl_a_gradient_that_pulls_members_to_their_cluster():
    # 4 clusters of 100 unit vectors in D = 128 (cosine ~0.65 to their mean, as contrastive features). The
    # density's log-odds between clusters are tens of nats: Q is one-hot, P = Q, and KL has no gradient at all.
    g = torch.Generator().manual_seed(3)
    d, k, n = 128, 4, 100
    means = F.normalize(torch.randn(k, d, generator=g), dim=1)
    y = torch.arange(k).repeat_interleave(n)
    z0 = F.normalize(means[y] + 1.2 * torch.randn(k * n, d, generator=g) / d**0.5, dim=1)

    def descend(t: float) -> tuple[float, float]:
        """(|grad KL| at z0, mean cosine of z to its cluster's mean after 20 SGD steps on KL alone)"""
        pool = StatPool(k, d, kernel_temperature=t)
        pool.reset(pooled_sums(z0, F.one_hot(y, k).float()))
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.SGD([z], lr=100.0)
        for i in range(20):
            log_q, log_l = pool.posterior(z)
            loss = kl_target(pool.target(log_q, log_l), log_q)
            opt.zero_grad()
            loss.backward()
            grad = z.grad.norm().item() if i == 0 else grad
            opt.step()
        return grad, (F.normalize(z.detach(), dim=1) * F.normalize(pool.stats().mean, dim=1)[y]).sum(1).mean().item()

    grad1, cos1 = descend(1.0)
    grad32, cos32 = descend(32.0)
    assert grad1 < 1e-10 and cos1 == pytest.approx(0.647, abs=0.01)  # nothing moves (measured 3e-16)
    assert grad32 > 1e-2 and cos32 > 0.95  # members pulled onto their cluster (measured 0.047; 0.65 -> 0.99)


def test_average_merge_is_average_linkage_on_cosine_similarity():
    # One piece per point: merging by -mu_a . mu_b from the sums is exactly UPGMA with the cosine distance 1 - cos,
    # since the mean of 1 - z_i . z_j over a x b is 1 - mu_a . mu_b for unit vectors.
    from scipy.cluster.hierarchy import fcluster, linkage

    g = torch.Generator().manual_seed(4)
    z = F.normalize(torch.randn(60, 5, generator=g, dtype=torch.float64) + 2 * torch.eye(5, dtype=torch.float64)[
        torch.arange(60) % 3], dim=1)
    _, ours = merge_clusters(pooled_sums(z, torch.eye(60, dtype=torch.float64)), 6, "average")
    ref = fcluster(linkage(z.numpy(), method="average", metric="cosine"), 6, criterion="maxclust")
    assert len(set(ours.tolist())) == 6
    assert cluster_acc(ref - 1, ours.numpy()) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Imbalance: 10 Gaussian clusters in 16-d, exponential profile 1000 -> 10 (ratio 100), fixed embeddings.

RATIO_SIZES = [int(1000 * 0.01 ** (c / 9)) for c in range(10)]  # 1000, 599, ..., 16, 10: 2478 points


def _mixture(seed: int = 0, dim: int = 16, sep: float = 6.0) -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = F.normalize(torch.randn(10, dim, generator=g), dim=1) * sep  # pairwise ~8.5 apart
    scales = 0.5 + torch.rand(10, generator=g)  # per-cluster std 0.5 .. 1.5
    z = torch.cat([means[c] + scales[c] * torch.randn(n, dim, generator=g) for c, n in enumerate(RATIO_SIZES)])
    y = np.repeat(np.arange(10), RATIO_SIZES)
    return z, y, means


def _fit(z: torch.Tensor, target: str, steps: int = 100) -> StatPool:
    pool = StatPool(10, z.shape[1], ema=0.9, nu=1.0, target=target)
    pool.init_kmeans(z, iters=50, restarts=3, seed=0, over=3)
    for _ in range(steps):
        pool.step(z)
    return pool


def _recalls(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    m = match_clusters(y, pred)
    mapped = np.array([m.get(int(c), -1) for c in pred])
    return np.array([(mapped[y == c] == c).mean() for c in range(10)])


def test_cardinality_target_keeps_a_100_to_1_mixture_that_dec_splits():
    torch.set_num_threads(1)
    z, y, _ = _mixture()
    ours = _fit(z, "cardinality").posterior(z)[0].argmax(1).numpy()
    dec = _fit(z, "balanced").posterior(z)[0].argmax(1).numpy()
    # StatDEC recovers every cluster, the 10-point one included.
    assert cluster_acc(y, ours) >= 0.95
    assert _recalls(y, ours).min() >= 0.9
    # DEC's 1 / f_k target on the same init: a small cluster eats ~37% of the 1000-point one (measured: its
    # largest piece keeps 0.63, ACC 0.85).
    big = np.bincount(dec[y == 0], minlength=10)
    assert big.max() / big.sum() < 0.8
    assert (big >= 0.1 * big.sum()).sum() >= 2  # the big cluster is split in two sizeable parts
    assert cluster_acc(y, dec) < cluster_acc(y, ours) - 0.05


def test_plain_kmeans_init_splits_the_big_cluster_which_the_merge_repairs():
    torch.set_num_threads(1)
    z, y, _ = _mixture()
    plain = StatPool(10, z.shape[1])
    plain.init_kmeans(z, iters=50, restarts=3, seed=0, over=1)
    merged = StatPool(10, z.shape[1])
    merged.init_kmeans(z, iters=50, restarts=3, seed=0, over=3)
    acc_plain = cluster_acc(y, plain.posterior(z)[0].argmax(1).numpy())
    acc_merged = cluster_acc(y, merged.posterior(z)[0].argmax(1).numpy())
    assert acc_plain < 0.9 < 0.95 <= acc_merged  # measured 0.73 and 1.00
    by_edges = StatPool(10, z.shape[1], merges=("knn",))  # the pieces merged by their kNN edges repair it too
    by_edges.init_kmeans(z, iters=50, restarts=3, seed=0, over=3)
    assert cluster_acc(y, by_edges.posterior(z)[0].argmax(1).numpy()) >= 0.95


def test_ood_score_ranks_far_samples_above_cluster_members():
    torch.set_num_threads(1)
    z, y, means = _mixture()
    pool = _fit(z, "cardinality", steps=20)
    g = torch.Generator().manual_seed(5)
    # Far from every cluster: random directions at twice the clusters' radius.
    far = F.normalize(torch.randn(300, z.shape[1], generator=g), dim=1) * 12.0
    inliers = z[torch.randperm(len(z), generator=g)[:300]]
    score = -pool.log_kernel(torch.cat([inliers, far])).amax(dim=1)  # the OOD score Prediction.ood carries
    auroc = roc_auc_score(np.r_[np.zeros(300), np.ones(300)], score.numpy())
    assert auroc >= 0.9
    # Tail-cluster members are not outliers: the score ignores the prior.
    tail = z[torch.as_tensor(y == 9)]
    assert (-pool.log_kernel(tail).amax(dim=1)).median() < score[300:].median()


# ---------------------------------------------------------------------------------------------------------
# Equivalence: steps on 2 gloo workers with local batches b1, b2 == steps on 1 worker on concat(b1, b2), through
# an epoch before the statistics exist, the k-means + merge init (a data pass), and pooled updates.

N, B = 64, 16


def _cfg(world: int, target: str, space: str = "projection", merges: str = "bhattacharyya,ward"):
    return from_dict({
        "model": {"backbone": "smallconv", "width": 8, "proj_hidden": 32, "proj_dim": 8},
        "method": {"name": "statdec", "num_clusters": 4,
                   "statdec": {"target": target, "warmup_frac": 0.34, "pool_space": space,
                               "init_merges": merges.split(",")},
                   "kmeans": {"iters": 10, "restarts": 2}},  # every Lloyd step is a collective: keep it short
        "data": {"batch_size": B}, "trainer": {"num_workers": world},
    })


def statdec_steps(rank: int, world: int, target: str, space: str = "projection",
                  merges: str = "bhattacharyya,ward") -> dict[str, np.ndarray]:
    cfg = _cfg(world, target, space, merges)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    model = wrap_ddp(method) if world > 1 else method
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 1.0)
    g = torch.Generator().manual_seed(11)
    data = torch.randn(N, 1, 8, 8, generator=g)
    lo, hi = rank * B // world, (rank + 1) * B // world
    map_train = sharded_map_train(method, data, rank, world)  # this worker's slice of the training set
    for epoch in range(3):  # round(0.34 * 3) = 1: epoch 0 before the statistics, init at the start of epoch 1
        method.on_epoch_start(EpochContext(epoch, 3, 1, map_train))
        index = torch.randperm(N, generator=g)[:B]
        x1, x2 = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
        train_step(model, method, opt, index[lo:hi], x1[lo:hi], x2[lo:hi])
    return {k: v.numpy() for k, v in state_tensors(method).items()}


@pytest.mark.parametrize("target,space,merges", [("cardinality", "projection", "bhattacharyya,ward"),
                                                 ("balanced", "projection", "bhattacharyya,ward"),
                                                 ("cardinality", "backbone", "bhattacharyya,ward"),
                                                 ("cardinality", "projection", "knn")])
def test_two_workers_equal_one_worker_on_the_concatenated_batch(target, space, merges):
    single = assert_two_workers_equal_one(statdec_steps, target, space, merges)
    assert single["pool.ready"] and single["pool.sums"][:, 0].sum() == pytest.approx(1.0, rel=1e-5)
    # the pool lives in z (D = 8) or in the smallconv's 2 x width = 16 backbone features
    assert single["pool.sums"].shape == (4, 1 + 2 * (16 if space == "backbone" else 8))


def test_backbone_pool_clusters_the_normalised_backbone_features_and_pulls_only_the_backbone():
    cfg = _cfg(1, "cardinality", "backbone")
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 1, 8, 8, generator=g)
    # the init, on the backbone features
    method.on_epoch_start(EpochContext(1, 3, 1, sharded_map_train(method, x, 0, 1)))
    method.eval()
    p = method.predict(x)
    f = F.normalize(method.backbone(x), dim=1)
    assert torch.allclose(p.features, f, atol=1e-6)
    assert torch.equal(p.clusters[:, 0], method.pool.posterior(f)[0].argmax(dim=1))
    # The KL term reaches the backbone, never the projection head (which only the contrastive loss trains).
    method.train()
    z, u = method.embed_both(torch.cat([x[:8], x[8:16]]))
    log_q, log_l = method.pool.posterior(u)
    kl_target(method.pool.target(log_q, log_l), log_q).backward()
    assert all(q.grad is None or q.grad.abs().max() == 0 for q in method.proj.parameters())
    assert any(q.grad is not None and q.grad.abs().max() > 0 for q in method.backbone.parameters())


def test_the_contrastive_loss_uses_the_epochs_scheduled_temperature():
    # StatDEC shares DCL's TemperatureSchedule: at epoch 2 of a cosine 1.0 -> 0.1 over 4 epochs the loss is the
    # constant schedule's at t = 0.55 (before the init, so KL is off and only the contrastive term counts)
    g = torch.Generator().manual_seed(3)
    index, x1, x2 = torch.arange(B), torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)

    def loss(epoch: int, **statdec) -> float:
        torch.manual_seed(0)
        cfg = from_dict({"model": {"backbone": "smallconv", "width": 8, "proj_hidden": 32, "proj_dim": 8},
                         "method": {"name": "statdec", "num_clusters": 4, "statdec": {"warmup_frac": 1.0} | statdec},
                         "data": {"batch_size": B}, "optim": {"epochs": 20}})
        method = build_method(cfg, DataInfo(N, (8, 8, 1), 4)).train()
        method.on_epoch_start(EpochContext(epoch, 20, 4, lambda fn: (torch.empty(0), torch.empty(0))))
        return method(index, x1, x2).loss.item()

    cosine = {"temperature": 1.0, "temperature_schedule": "cosine", "temperature_min": 0.1, "temperature_half_period": 4}
    assert loss(2, **cosine) == pytest.approx(loss(0, temperature=0.55), rel=1e-6)
    assert loss(2, **cosine) != pytest.approx(loss(0, **cosine), rel=1e-3)

"""The clustering module and AE-CM behave as methods.md section 4 says, and 2 gloo workers == 1 worker."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from djc.config import from_dict
from djc.engine import apply_lr, build_method, make_optimizer, state_tensors, train_step, wrap_ddp
from djc.methods.base import DataInfo, EpochContext
from djc.methods.cm import (ClusteringModule, alpha_vector, cm_terms, dirichlet_prior, orthonormality,
                            soft_distortion)
from tests.gloo import assert_two_workers_equal_one


def test_e1_e2_e3_sum_to_the_soft_kmeans_distortion():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    u = torch.randn(6, 7, generator=g, dtype=torch.float64)
    gamma = F.softmax(3 * torch.randn(50, 6, generator=g, dtype=torch.float64), dim=1)
    t = cm_terms(x, gamma, u)
    direct = (gamma * torch.cdist(x, u).pow(2)).sum()
    assert torch.allclose(t.e1 + t.e2 + t.e3, direct, rtol=1e-12, atol=1e-10)
    assert torch.allclose(soft_distortion(x, gamma, u).sum(), direct, rtol=1e-12)


def test_prior_pairs_the_largest_alpha_with_the_largest_cluster():
    alpha = alpha_vector([1.0, 50.0, 5.0], 3, "sorted")
    assert alpha.tolist() == [1.0, 5.0, 50.0]
    m = torch.tensor([0.2, 0.7, 0.1])
    # Which cluster is large does not matter: the prior only sees the sorted sizes.
    assert torch.allclose(dirichlet_prior(m, alpha), dirichlet_prior(m[[2, 0, 1]], alpha))
    expect = sum((1 - a) * np.log(p + 1e-10) for a, p in zip([1.0, 5.0, 50.0], [0.1, 0.2, 0.7]))
    assert dirichlet_prior(m, alpha).item() == pytest.approx(expect, rel=1e-6)
    # profile: alpha - 1 proportional to an exponential profile of ratio 10, mean alpha unchanged.
    prof = alpha_vector(11.0, 4, "profile", expected_imbalance=10.0)
    assert prof.mean().item() == pytest.approx(11.0) and (prof[-1] - 1) / (prof[0] - 1) == pytest.approx(10.0)
    assert alpha_vector(3.0, 4, "profile", 1.0).tolist() == [3.0] * 4


def test_orthonormality_is_zero_for_orthonormal_centroids():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert orthonormality(q[:4]).item() == pytest.approx(0.0, abs=1e-12)
    assert orthonormality(2 * q[:4]).item() == pytest.approx(4 * 3.0)


def _mixture(sizes: list[int], means: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(s, k) for k, s in enumerate(sizes)])
    return means[y] + rng.normal(0.0, 1.0, (len(y), means.shape[1])), y


def test_cm_partition_matches_spherical_gmm_and_kmeans():
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score as ari
    from sklearn.mixture import GaussianMixture

    torch.set_num_threads(1)
    x, y = _mixture([300] * 5, np.random.default_rng(0).normal(0.0, 4.0, (5, 4)), seed=0)
    cm = ClusteringModule(5, alpha=1.0, epochs=100).fit_predict(x)
    gmm = GaussianMixture(5, covariance_type="spherical", n_init=3, random_state=0).fit_predict(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kmeans = KMeans(5, n_init=10, random_state=0).fit_predict(x)
    assert ari(cm, gmm) >= 0.9 and ari(cm, kmeans) >= 0.9 and ari(gmm, kmeans) >= 0.9
    assert ari(cm, y) >= 0.9


def test_sorted_alpha_recovers_a_10_to_1_mixture_that_uniform_alpha_does_not():
    from sklearn.metrics import adjusted_rand_score as ari

    torch.set_num_threads(1)
    x, y = _mixture([1000, 100], np.array([[0.0, 0.0], [5.0, 0.0]]), seed=1)
    # Same mean alpha (300 at batch 256) either way; only the sorted vector says "one cluster is 10x the other".
    shares = np.array([10.0, 1.0]) / 11.0
    sorted_alpha = list(1.0 + 299.0 * 2 * shares)  # [544.6, 55.4]
    uniform = ClusteringModule(2, alpha=300.0, epochs=100).fit(x)
    vector = ClusteringModule(2, alpha=sorted_alpha, epochs=100).fit(x)
    ari_uniform, ari_vector = ari(y, uniform.predict(x)), ari(y, vector.predict(x))
    assert ari_vector >= 0.95, ari_vector
    assert ari_uniform <= 0.6, ari_uniform  # pushed towards 50:50, it cuts the large cluster
    assert sorted(vector.weights_) == pytest.approx([1 / 11, 10 / 11], abs=0.02)


# ---------------------------------------------------------------------------------------------------------
# AE-CM: stages, the averaging epoch, and equivalence of 2 gloo workers with 1 worker on the concatenated batch.

N, B, EPOCHS, STEPS = 48, 16, 5, 2


def _cfg(world: int, init: str = "pre", cm_init: str = "posterior"):
    return from_dict({
        "method": {"name": "aecm", "num_clusters": 3,
                   "aecm": {"hidden": [16, 16, 32], "code_dim": 4, "alpha": 3.0, "alpha_mode": "profile",
                            "expected_imbalance": 4.0, "init": init, "pretrain_epochs": 1, "cm_epochs": 1,
                            "cm_init": cm_init}},
        "optim": {"name": "adam", "lr": 1e-2, "weight_decay": 0.0, "epochs": EPOCHS},
        "data": {"batch_size": B}, "trainer": {"num_workers": world},
    })


DATA = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def aecm_run(rank: int, world: int, init: str = "pre", record: bool = False) -> dict[str, np.ndarray]:
    cfg = _cfg(world, init)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 3))
    model = wrap_ddp(method) if world > 1 else method
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 0.0)  # constant_lr: the groups keep their lr whatever the schedule says
    mine = torch.arange(rank, N, world)  # this worker's slice of the training set, interleaved

    def map_train(fn):
        return fn(DATA[mine], mine), mine

    g = torch.Generator().manual_seed(123)
    lo, hi = rank * B // world, (rank + 1) * B // world
    after_last_steps = []
    for epoch in range(EPOCHS):
        method.on_epoch_start(EpochContext(epoch, EPOCHS, STEPS, map_train))
        for _ in range(STEPS):
            index = torch.randperm(N, generator=g)[:B]
            x = DATA[index]
            train_step(model, method, opt, index[lo:hi], x[lo:hi], x[lo:hi])
            if epoch == EPOCHS - 1:
                after_last_steps.append(torch.nn.utils.parameters_to_vector(method.parameters()).detach().clone())
    method.on_train_end()
    out = {k: v.numpy() for k, v in state_tensors(method).items()}
    if record:
        out["_expected_average"] = torch.stack(after_last_steps).mean(0).numpy()
        out["_final"] = torch.nn.utils.parameters_to_vector(method.parameters()).detach().numpy()
    return out


def test_final_weights_are_the_average_over_the_last_epoch():
    torch.set_num_threads(1)
    out = aecm_run(0, 1, record=True)
    np.testing.assert_allclose(out["_final"], out["_expected_average"], rtol=1e-6, atol=1e-7)
    assert out["avg_count"] == STEPS and out["phase"].tolist() == [2, 1]


def test_cm_alone_stage_keeps_the_autoencoder_exactly_still():
    # Its gradient is 0 then, but Adam's momentum from pretraining would keep moving it: the method restores it.
    torch.set_num_threads(1)
    cfg = _cfg(1)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 3))
    opt = make_optimizer(cfg, method)
    all_rows = torch.arange(N)
    ae = lambda: torch.nn.utils.parameters_to_vector(  # noqa: E731
        list(method.encoder.parameters()) + list(method.decoder.parameters())).detach().clone()
    cm = lambda: torch.nn.utils.parameters_to_vector(method.cm.parameters()).detach().clone()  # noqa: E731
    for epoch in range(2):  # pretrain, then CM alone
        method.on_epoch_start(EpochContext(epoch, EPOCHS, STEPS, lambda fn: (fn(DATA, all_rows), all_rows)))
        before_ae, before_cm = ae(), cm()
        for s in range(3):
            index = all_rows[s * B : (s + 1) * B]
            train_step(method, method, opt, index, DATA[index], DATA[index])
        moved_ae, moved_cm = not torch.equal(ae(), before_ae), not torch.equal(cm(), before_cm)
        assert (moved_ae, moved_cm) == ((True, False) if epoch == 0 else (False, True))


@pytest.mark.parametrize("cm_init", ["posterior", "pinv"])
def test_pre_init_puts_u_on_the_code_centers(cm_init):
    torch.set_num_threads(1)
    cfg = _cfg(1, cm_init=cm_init)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 3))
    all_rows = torch.arange(N)
    method.on_epoch_start(EpochContext(1, EPOCHS, STEPS, lambda fn: (fn(DATA, all_rows), all_rows)))
    u, v, bias = method.cm.u.detach(), method.cm.v.weight.detach(), method.cm.v.bias.detach()
    with torch.no_grad():
        codes = method.encoder(DATA.flatten(1))
    d2 = torch.cdist(codes, u).pow(2)
    labels = d2.argmin(1)
    for k in range(3):  # each center is the mean of its Voronoi cell: a Lloyd fixed point
        torch.testing.assert_close(u[k], codes[labels == k].mean(0), rtol=1e-4, atol=1e-4)
    if cm_init == "pinv":
        torch.testing.assert_close(v @ u.T, torch.eye(3), rtol=1e-4, atol=1e-4)  # V u_k = e_k
        assert bias.abs().max() == 0
    else:  # gamma = the equal-weight isotropic GMM posterior, variance = inertia per dimension
        var = d2.min(1).values.sum() / codes.numel()
        torch.testing.assert_close(method.cm(codes), F.softmax(-d2 / (2 * var), dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["pre", "rand"])
def test_two_workers_equal_one_worker_on_the_concatenated_batch(init):
    single = assert_two_workers_equal_one(aecm_run, init)
    assert single["hist"].sum() == STEPS * B  # the last epoch's argmax counts cover the global batches

"""The clustering module and AE-CM behave as docs/methods/aecm.md says, and 2 gloo workers == 1 worker."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from djc.config import from_dict
from djc.optim import apply_lr, make_optimizer
from djc.step import build_method, train_step, wrap_ddp
from tests.gloo import state_tensors
from djc.methods.base import DataInfo, EpochContext
from djc.methods import knn_merge
from djc.methods.aecm import CM_ONLY, JOINT, PRETRAIN
from djc.methods.kmeans import kmeans
from djc.methods.cm import (ClusteringModule, alpha_vector, cm_terms, dirichlet_prior, orthonormality,
                            soft_distortion)
from djc.methods.stage_optim import StageOptimizer
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


# The release's settings: SGD pretraining, a fresh Adam per stage with epsilon hat, alpha by index when CM alone.
RELEASE = {"pretrain_optimizer": "sgd", "fresh_optimizer": True, "adam_eps_hat": True, "cm_alpha_order": "index"}


def _cfg(world: int, init: str = "pre", cm_init: str = "posterior", release: bool = False):
    """init "cm": no autoencoder (method.aecm.autoencoder=false), the CM alone on the pixels from epoch 0;
    "knn": init "pre" with the CM started from knn-merge's groups (cm_init_from=knn_merge)."""
    no_ae = {"init": "pre", "autoencoder": False} if init == "cm" else {}
    if init == "knn":
        init, no_ae = "pre", {"cm_init_from": "knn_merge"}
    return from_dict({
        "method": {"name": "aecm", "num_clusters": 3,
                   "aecm": {"hidden": [16, 16, 32], "code_dim": 4, "alpha": 3.0, "alpha_mode": "profile",
                            "expected_imbalance": 4.0, "init": init, "pretrain_epochs": 1, "cm_epochs": 1,
                            "cm_init": cm_init} | (RELEASE if release else {}) | no_ae},
        "optim": {"name": "adam", "lr": 1e-2, "weight_decay": 0.0, "epochs": EPOCHS},
        "data": {"batch_size": B}, "trainer": {"num_workers": world},
    })


DATA = torch.randn(N, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def aecm_run(rank: int, world: int, init: str = "pre", record: bool = False, release: bool = False
             ) -> dict[str, np.ndarray]:
    cfg = _cfg(world, init, release=release)
    # The release's Adam restarts at every stage, where m / sqrt(v) is g / |g|: float32 summation differences
    # between 1 and 2 workers (~1e-7) flip near-zero gradients' steps. Compared in float64 there. From knn-merge's
    # start the same float32 differences grow to 6e-5 over the 5 epochs (the groups themselves are equal): also
    # compared in float64.
    dtype = torch.float64 if release or init == "knn" else torch.float32
    torch.set_default_dtype(dtype)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 3))
    data = DATA.to(dtype)
    model = wrap_ddp(method) if world > 1 else method
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 0.0)  # constant_lr: the groups keep their lr whatever the schedule says
    mine = torch.arange(rank, N, world)  # this worker's slice of the training set, interleaved

    def map_train(fn):
        return fn(data[mine], mine), mine

    g = torch.Generator().manual_seed(123)
    lo, hi = rank * B // world, (rank + 1) * B // world
    after_last_steps = []
    for epoch in range(EPOCHS):
        method.on_epoch_start(EpochContext(epoch, EPOCHS, STEPS, map_train))
        for _ in range(STEPS):
            index = torch.randperm(N, generator=g)[:B]
            x = data[index]
            train_step(model, method, opt, index[lo:hi], x[lo:hi], x[lo:hi])
            if epoch == EPOCHS - 1:
                after_last_steps.append(torch.nn.utils.parameters_to_vector(method.parameters()).detach().clone())
    method.on_train_end()
    torch.set_default_dtype(torch.float32)
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


def test_knn_merge_init_puts_u_on_the_means_of_knn_merges_groups():
    torch.set_num_threads(1)
    method = build_method(_cfg(1, "knn"), DataInfo(N, (8, 8, 1), 3))
    all_rows = torch.arange(N)
    method.on_epoch_start(EpochContext(1, EPOCHS, STEPS, lambda fn: (fn(DATA, all_rows), all_rows)))
    with torch.no_grad():
        codes = method.encoder(DATA.flatten(1))
    groups = knn_merge.fit(codes, all_rows, 3, iters=50, restarts=3, seed=0).predict(codes)
    assert len(groups.unique()) == 3
    u = method.cm.u.detach()
    for k in range(3):  # the group means, not k-means' Voronoi means
        torch.testing.assert_close(u[k], codes[groups == k].mean(0), rtol=1e-4, atol=1e-4)
    km = kmeans(codes, 3, seed=0).centers
    assert torch.cdist(u, km).min(1).values.max() > 1e-3  # a different start from the paper's


@pytest.mark.parametrize("init,release", [("pre", False), ("rand", False), ("pre", True), ("cm", False),
                                          ("knn", False)])
def test_two_workers_equal_one_worker_on_the_concatenated_batch(init, release):
    single = assert_two_workers_equal_one(aecm_run, init, False, release)
    assert single["hist"].sum() == STEPS * B  # the last epoch's argmax counts cover the global batches


def test_without_an_autoencoder_the_cm_alone_fits_the_input_from_kmeans_every_epoch():
    torch.set_num_threads(1)
    method = build_method(_cfg(1, "cm"), DataInfo(N, (8, 8, 1), 3))
    assert list(method.parameters()) == list(method.cm.parameters())  # nothing but the CM trains
    all_rows = torch.arange(N)
    method.on_epoch_start(EpochContext(0, EPOCHS, STEPS, lambda fn: (fn(DATA, all_rows), all_rows)))
    x, u = DATA.flatten(1), method.cm.u.detach()
    labels = torch.cdist(x, u).argmin(1)
    for k in range(3):  # k-means on the input itself at epoch 0, not on a code
        torch.testing.assert_close(u[k], x[labels == k].mean(0), rtol=1e-4, atol=1e-4)
    assert method.cm(x).argmax(1).tolist() == labels.tolist()  # the posterior at k-means: its partition
    out = aecm_run(0, 1, "cm")
    assert out["phase"].tolist() == [1, 1]  # the CM-alone stage up to the last, averaged, epoch
    for bad, message in (({"init": "rand"}, "needs method.aecm.init=pre"), ({"augment": True}, "augment")):
        with pytest.raises(ValueError, match=message):
            from_dict({"method": {"name": "aecm", "aecm": {"autoencoder": False} | bad}})


# ---------------------------------------------------------------------------------------------------------
# The release's rules (Ahcene-B/clustering-Module, Module/module_AECM.py and Module/utils.py, TensorFlow),
# transcribed on small tensors.


def _release_cm_prior(g, alpha):
    """AECM.loss_cm's loss_op4: sum(log(mean(g, 0) + 1e-10) * (1 - alpha)), alpha sorted ascending by pre_fit."""
    return (torch.log(g.mean(0) + 1e-10) * (1 - torch.as_tensor(np.sort(alpha)))).sum()


def _tf_adam(p, grads, lr, eps, b1=0.9, b2=0.999):
    """tf.keras.optimizers.Adam(lr, .9, .999, eps): epsilon hat, the bias correction folded into the step size."""
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (torch.sqrt(v) + eps)
    return p


def _tf_sgd(p, grads, lr, momentum):
    """tf.keras.optimizers.SGD(lr, momentum, nesterov=False): velocity = momentum v - lr g; p += velocity."""
    vel = torch.zeros_like(p)
    for g in grads:
        vel = momentum * vel - lr * g
        p = p + vel
    return p


def test_index_alpha_order_is_the_releases_cm_alone_prior():
    g = F.softmax(torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    alpha = [9.0, 1.0, 3.0, 20.0]
    vec = alpha_vector(alpha, 4, "sorted")
    assert dirichlet_prior(g.mean(0), vec, sort=False).item() == pytest.approx(_release_cm_prior(g, alpha).item())
    assert dirichlet_prior(g.mean(0), vec).item() != pytest.approx(_release_cm_prior(g, alpha).item())


@pytest.mark.parametrize("order", ["sorted", "index"])
def test_cm_alone_stage_pairs_alpha_as_configured(order):
    torch.set_num_threads(1)
    cfg = _cfg(1).model_copy(deep=True)
    cfg = from_dict({**cfg.model_dump(), "method": {**cfg.method.model_dump(), "aecm": {
        **cfg.method.aecm.model_dump(), "cm_alpha_order": order}}})
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 3))
    all_rows = torch.arange(N)
    method.on_epoch_start(EpochContext(1, EPOCHS, STEPS, lambda fn: (fn(DATA, all_rows), all_rows)))
    out = method(all_rows[:B], DATA[:B], DATA[:B])
    with torch.no_grad():
        gamma = method.cm(method.encoder(DATA[:B].flatten(1)))
    alpha = method.alpha.numpy()
    release = _release_cm_prior(gamma, alpha) / B
    ranked = dirichlet_prior(gamma.mean(0), method.alpha) / B
    assert out.logs["prior"].item() == pytest.approx((release if order == "index" else ranked).item(), rel=1e-5)
    assert release.item() != pytest.approx(ranked.item(), rel=1e-3)  # the profile's alphas differ per cluster


def _stage_optimizer(p, stage, **kw):
    groups = [{"params": [p], "lr": 1e-2, "eps": 1e-3, "weight_decay": 0.0}]
    return StageOptimizer(groups, lambda: stage[0], lr=1e-2, eps=1e-3, **kw)


def _run(opt, p, grads):
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach().clone()


def test_stage_optimizer_is_torch_adam_or_the_releases_adam_and_sgd():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=gen) * 10 ** (-k % 4) for k in range(30)]  # small grads: eps matters
    start = torch.randn(5, generator=gen)

    p = start.clone().requires_grad_()
    ours = _run(_stage_optimizer(p, [JOINT], eps_hat=False, fresh=False), p, grads)
    q = start.clone().requires_grad_()
    torch_adam = _run(torch.optim.Adam([q], lr=1e-2, eps=1e-3), q, grads)
    torch.testing.assert_close(ours, torch_adam, rtol=1e-6, atol=1e-7)

    p = start.clone().requires_grad_()
    hat = _run(_stage_optimizer(p, [JOINT], eps_hat=True, fresh=False), p, grads)
    torch.testing.assert_close(hat, _tf_adam(start, grads, 1e-2, 1e-3), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(hat, torch_adam, atol=1e-4)  # epsilon hat is a different rule

    p = start.clone().requires_grad_()
    sgd = _run(_stage_optimizer(p, [PRETRAIN], eps_hat=True, fresh=True, sgd_stage=PRETRAIN, sgd_lr=0.05,
                                sgd_momentum=0.9), p, grads)
    torch.testing.assert_close(sgd, _tf_sgd(start, grads, 0.05, 0.9), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fresh", [True, False])
def test_a_fresh_optimizer_per_stage_restarts_adam_at_each_stage(fresh):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(5, generator=gen) for _ in range(12)]
    start = torch.randn(5, generator=gen)
    stage = [PRETRAIN]
    p = start.clone().requires_grad_()
    opt = _stage_optimizer(p, stage, eps_hat=True, fresh=fresh, sgd_stage=PRETRAIN, sgd_lr=0.05, sgd_momentum=0.9)
    _run(opt, p, grads[:4])
    stage[0] = CM_ONLY
    after_cm = _run(opt, p, grads[4:8])
    stage[0] = JOINT
    after_joint = _run(opt, p, grads[8:])
    # The release: SGD, then a new Adam for the CM stage and another for the joint stage.
    cm_expected = _tf_adam(_tf_sgd(start, grads[:4], 0.05, 0.9), grads[4:8], 1e-2, 1e-3)
    torch.testing.assert_close(after_cm, cm_expected, rtol=1e-6, atol=1e-7)  # SGD -> Adam always restarts
    joint_fresh = _tf_adam(cm_expected, grads[8:], 1e-2, 1e-3)
    joint_kept = _tf_adam(_tf_sgd(start, grads[:4], 0.05, 0.9), grads[4:], 1e-2, 1e-3)
    torch.testing.assert_close(after_joint, joint_fresh if fresh else joint_kept, rtol=1e-6, atol=1e-7)
    assert opt.state_dict()["param_groups"][0]["stage"] == JOINT  # a checkpoint carries the stage


def test_release_pretraining_lr_is_converted_to_djcs_loss_scale():
    """The release's AE loss sum_i mean_d (x - x^)^2 has n / d times djc's gradient (sum_i |x - x^|^2 / n), so
    make_optimizer's SGD runs at pretrain_lr * n / d: one step moves the weights as the release's step."""
    torch.set_num_threads(1)
    cfg = _cfg(1, release=True)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 3))
    opt = make_optimizer(cfg, method)
    assert isinstance(opt, StageOptimizer) and opt.sgd_lr == pytest.approx(0.01 * B / 64)
    method.on_epoch_start(EpochContext(0, EPOCHS, STEPS, map_train=None))
    x = DATA[:B].flatten(1)
    ae = copy.deepcopy(torch.nn.Sequential(method.encoder, method.decoder))  # the release's AE, same weights
    ((x - ae(x)) ** 2).mean(1).sum().backward()  # tf.losses.mean_squared_error per sample, summed by the tape
    train_step(method, method, opt, torch.arange(B), DATA[:B], DATA[:B])
    ours = list(method.encoder.parameters()) + list(method.decoder.parameters())
    for p, r in zip(ours, ae.parameters()):  # release: SGD lr 1e-2, first step (velocity = -lr g)
        torch.testing.assert_close(p.detach(), r.detach() - 0.01 * r.grad, rtol=1e-5, atol=1e-6)


def test_augment_trains_on_view_1_and_leaves_the_paper_default_plain():
    # The option changes only which images the loop hands the step (djc/data/augment.py for_method): the step and
    # its one collective are unchanged, so the equivalence test above covers it.
    tree = {"model": {"backbone": "mlp"}, "method": {"name": "aecm", "num_clusters": 3,
                                                      "aecm": {"hidden": [16], "code_dim": 4, "init": "rand"}}}
    assert not build_method(from_dict(tree), DataInfo(32, (8, 8, 1), 3)).augmented
    tree["method"]["aecm"]["augment"] = True
    method = build_method(from_dict(tree), DataInfo(32, (8, 8, 1), 3))
    assert method.augmented  # the loop hands it two augmented views
    g = torch.Generator().manual_seed(0)
    x1, x2, x3 = (torch.randn(8, 1, 8, 8, generator=g) for _ in range(3))
    index = torch.arange(8)
    # Reconstruction and clustering read view 1 only, and rebuild it as it is.
    assert torch.equal(method(index, x1, x2).loss, method(index, x1, x3).loss)
    assert not torch.equal(method(index, x1, x2).loss, method(index, x2, x2).loss)

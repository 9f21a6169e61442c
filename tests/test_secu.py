"""SeCu: the losses and state rules behave as docs/methods/secu.md says, and 2 gloo workers == 1 worker."""

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
from djc.methods.secu_losses import (auto_gamma, center_loss, dual_step, entropy_delta, merge_centers, prior_delta,
                                     representation_loss, share_norm)
from tests.gloo import assert_two_workers_equal_one, sharded_map_train, state_tensors


def test_center_loss_moves_only_the_assigned_centers():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_()
    w = torch.randn(8, 5, generator=g).requires_grad_()
    y = torch.tensor([0, 0, 2, 2, 2, 0])
    center_loss(x, F.normalize(w, dim=0), y, t_w=0.05).backward()
    moved = w.grad.abs().sum(0) > 0
    assert moved.tolist() == [True, False, True, False, False]
    assert x.grad is None  # the encoder does not learn from the center loss


def test_center_loss_pulls_centers_towards_their_instances():
    g = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(32, 8, generator=g), dim=1)
    y = torch.randint(0, 4, (32,), generator=g)
    w = torch.randn(8, 4, generator=g, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)

    def alignment() -> float:
        wn = F.normalize(w.detach(), dim=0)
        return float(sum((x[y == k] @ wn[:, k]).sum() for k in range(4)))

    before = alignment()
    losses = []
    for _ in range(20):
        loss = center_loss(x, F.normalize(w, dim=0), y, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert alignment() > before


def test_representation_loss_targets_previous_label_and_other_view():
    z = torch.randn(4, 3, requires_grad=True)
    z_other = torch.randn(4, 3, requires_grad=True)
    ybar = torch.tensor([0, 1, 2, 0])
    # tau = 1: the target is the previous label alone, i.e. plain cross-entropy.
    assert torch.allclose(representation_loss(z, z_other, ybar, 1.0), F.cross_entropy(z, ybar))
    representation_loss(z, z_other, ybar, 0.2).backward()
    assert z.grad is not None and z_other.grad is None  # the other view is a stop-gradient target


def test_duals_rise_for_starved_clusters_and_never_go_negative():
    rho = torch.zeros(4)
    counts = torch.tensor([16, 0, 0, 0])
    rho = dual_step(rho, counts, batch=16, eta=0.1, gamma=0.9)
    assert rho[0] == 0 and (rho[1:] > 0).all()
    # Starved clusters keep rising until the assignment rule hands them instances.
    s = 0.01 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    s[:, 0] += 0.1  # every instance prefers cluster 0
    assert (torch.bincount(s.argmax(1), minlength=4)[1:] == 0).all()
    for _ in range(20):
        y = (s + rho).argmax(1)
        rho = dual_step(rho, torch.bincount(y, minlength=4), 16, 0.1, 0.9)
    assert (rho >= 0).all()
    assert (torch.bincount((s + rho).argmax(1), minlength=4)[1:] > 0).any()


def _sum_plogp(h: np.ndarray, n: int) -> float:
    p = h / n
    return float(sum(v * math.log(v) for v in p if v > 0))


def test_entropy_delta_is_the_exact_change():
    hist = torch.tensor([5, 0, 3, 1])
    current = torch.tensor([0, 2, -1, 3])
    n = 10
    delta = entropy_delta(hist, current, n)
    base = _sum_plogp(hist.numpy(), n)
    for i, c in enumerate(current.tolist()):
        for k in range(4):
            h = hist.numpy().copy()
            if c >= 0:
                h[c] -= 1
            h[k] += 1
            expect = 0.0 if k == c else _sum_plogp(h, n) - (base if c >= 0 else _sum_plogp(hist.numpy(), n))
            assert delta[i, k].item() == pytest.approx(expect, abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The release's rules (idstcv/SeCu, secu/builder.py), transcribed on small tensors: each djc setting that restores
# the release must reproduce them.


def _release_gen_label_entropy(obj_val, labels, counter, alpha, epoch):
    """SeCu.gen_label_entropy: obj_val = -s (B, K), labels the remembered ones (epoch > 0), counter the histogram."""
    if epoch == 0:
        base = torch.sum(counter)
        if base == 0:
            return torch.argmin(obj_val, dim=1)
        tmp_prob = counter / (base + 1.0)
        tmp_entropy = torch.zeros_like(tmp_prob)
        tmp_entropy[tmp_prob > 0] = tmp_prob[tmp_prob > 0] * torch.log(tmp_prob[tmp_prob > 0])
        inc = tmp_prob + 1.0 / (base + 1.0)
        entropy = inc * torch.log(inc) - tmp_entropy
        return torch.argmin(obj_val + alpha * entropy.repeat(obj_val.shape[0], 1), dim=1)
    base = torch.sum(counter)
    tmp_prob = counter / base
    tmp_entropy = torch.zeros_like(tmp_prob)
    tmp_entropy[tmp_prob > 0] = tmp_prob[tmp_prob > 0] * torch.log(tmp_prob[tmp_prob > 0])
    inc = tmp_prob + 1.0 / base
    label_prob = tmp_prob[labels]
    new_prob = label_prob - 1.0 / base
    new_entropy = torch.zeros_like(new_prob)
    new_entropy[new_prob > 0] = new_prob[new_prob > 0] * torch.log(new_prob[new_prob > 0])
    entropy = (new_entropy - label_prob * torch.log(label_prob)).reshape(-1, 1) - tmp_entropy + inc * torch.log(inc)
    entropy.scatter_(1, labels.reshape(-1, 1), 0)
    return torch.argmin(obj_val + alpha * entropy, dim=1)


def _release_update_dual(ldual, labels, dual_lr, lratio):
    """SeCu.update_dual_mini_batch (lbound = lratio / K)."""
    k = ldual.shape[0]
    idx, count = torch.unique(labels, return_counts=True)
    ldual = ldual.clone()
    ldual[idx] -= dual_lr / len(labels) * count
    ldual += dual_lr * lratio / k
    if lratio < 1:
        ldual[ldual < 0] = 0
    return ldual


def _djc_entropy_labels(s, hist, current, n, rule, alpha):
    norm = share_norm(hist, current, n, rule)
    return (s - alpha * entropy_delta(hist, current, norm)).argmax(1)


def test_counted_share_norm_assigns_as_the_release_in_epoch_0_and_after():
    """share_norm=counted: epoch 0 divides by the instances counted so far + 1, later epochs by those counted."""
    g = torch.Generator().manual_seed(0)
    N, K, B, alpha = 60, 5, 12, 40.0
    hist = torch.zeros(K, dtype=torch.long)
    memory = torch.full((N,), -1)
    differs = 0
    for step in range(15):  # 5 batches make an epoch: epoch 0, then epochs 1 and 2 with removals
        epoch = step // 5
        index = torch.arange(step % 5 * B, (step % 5 + 1) * B)
        s = 0.2 * torch.randn(B, K, generator=g, dtype=torch.float64)
        prev = memory[index]
        y = _djc_entropy_labels(s, hist, prev, N, "counted", alpha)
        ref = _release_gen_label_entropy(-s, None if epoch == 0 else prev, hist.double(), alpha, epoch)
        assert torch.equal(y, ref), f"step {step}"
        differs += int((y != _djc_entropy_labels(s, hist, prev, N, "dataset", alpha)).sum())
        hist += torch.bincount(y, minlength=K) - torch.bincount(prev.clamp_min(0), weights=(prev >= 0).long(),
                                                                  minlength=K).long()
        memory[index] = y
    assert (memory >= 0).all() and int(hist.sum()) == N
    assert differs > 0  # the rule matters: djc's default divides by N and assigns some instances elsewhere


def test_share_norms_agree_once_every_instance_is_counted():
    hist = torch.tensor([20, 5, 10, 25])
    current = torch.tensor([0, 3, 1])
    assert torch.equal(entropy_delta(hist, current, share_norm(hist, current, 60, "counted")),
                       entropy_delta(hist, current, 60))


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_dual_clamp_below_one_is_the_releases_dual_update(gamma):
    g = torch.Generator().manual_seed(1)
    rho, ref, old = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    for _ in range(10):
        y = torch.randint(0, 4, (16,), generator=g)
        y[y == 3] = 0  # cluster 3 starved, cluster 0 crowded: unclamped duals would go below 0
        counts = torch.bincount(y, minlength=4)
        rho = dual_step(rho, counts, 16, 0.1, gamma)  # default clamp: the release's
        ref = _release_update_dual(ref, y, 0.1, gamma)
        old = dual_step(old, counts, 16, 0.1, gamma, clamp="always")
        assert torch.allclose(rho, ref, atol=1e-6)
    if gamma == 1.0:
        assert rho.min() < 0 and abs(float(rho.sum())) < 1e-5  # zero-sum duals
        assert not torch.allclose(rho, old)  # djc's earlier rule clamped here
    else:
        assert torch.equal(rho, old)


def test_separate_bn_views_encode_each_view_in_its_own_pass():
    cfg = _cfg(1, "entropy-separate")
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4)).train()
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(B, 1, 8, 8, generator=g), 3 * torch.randn(B, 1, 8, 8, generator=g) + 1
    f1, f2 = method.embed_views(x1, x2)
    # the release: x1 = encoder(view1); x2 = encoder(view2), each view normalised by its own batch statistics
    assert torch.allclose(f1, method.embed(x1)) and torch.allclose(f2, method.embed(x2))
    joint = method.embed(torch.cat([x1, x2]))
    assert not torch.allclose(f1, joint[:B], atol=1e-3)  # one pass over both views normalises differently


def test_auto_gamma_is_the_smallest_class_share_of_the_profile():
    assert auto_gamma(10, 1.0) == pytest.approx(1.0)
    # exp profile, ratio 10, 10 classes: the tail class holds 0.1 / sum_c 0.1^(c/9) of the data.
    assert auto_gamma(10, 10.0) == pytest.approx(10 * 0.1 / sum(0.1 ** (c / 9) for c in range(10)))
    assert auto_gamma(10, 10.0) < 0.3


def test_prior_delta_is_the_exact_change_of_the_cross_term_under_the_size_ranks():
    hist = torch.tensor([2, 7, 0, 4])  # ranks by size: cluster 1, 3, 0, 2
    current = torch.tensor([0, 1, -1])
    n = 13
    log_pi = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()  # largest share first
    delta = prior_delta(hist, current, n, log_pi)
    pi_of = log_pi[torch.tensor([2, 0, 3, 1])]  # log pi matched to clusters 0..3 by their rank

    def cross(h):  # -sum_k p_k log pi_k with the ranks of the step-start histogram
        return float(-(h.double() / n * pi_of.double()).sum())

    for i, c in enumerate(current.tolist()):
        for k in range(4):
            h = hist.clone()
            if c >= 0:
                h[c] -= 1
            h[k] += 1  # an uncounted instance (c = -1) only adds itself to k
            assert delta[i, k].item() == pytest.approx(cross(h) - cross(hist), abs=1e-6)


def test_a_uniform_prior_gives_back_secus_assignment():
    g = torch.Generator().manual_seed(3)
    hist = torch.randint(0, 20, (6,), generator=g)
    current = torch.tensor([0, 3, -1, 5, -1])
    s = torch.randn(5, 6, generator=g)
    ent = entropy_delta(hist, current, 100)
    uniform = torch.full((6,), -math.log(6))
    with_prior = ent + prior_delta(hist, current, 100, uniform)
    assert torch.equal((s - 50 * with_prior).argmax(1), (s - 50 * ent).argmax(1))


@pytest.mark.parametrize("prior", [False, True])
def test_the_profile_prior_holds_a_long_tailed_histogram_where_entropy_equalises(prior):
    # Equal similarities, so only the constraint decides: every instance starts in cluster 0 and is reassigned
    # one at a time for a few passes. -H(p) spreads them evenly; KL(p || pi) settles on the profile's sizes.
    N, K, R = 200, 4, 8.0
    mem = torch.zeros(N, dtype=torch.long)
    hist = torch.bincount(mem, minlength=K)
    log_pi = torch.tensor(profile_shares(K, R)).log()
    for _ in range(4):
        for i in range(N):
            cur = mem[i : i + 1]
            d = entropy_delta(hist, cur, N) + (prior_delta(hist, cur, N, log_pi) if prior else 0)
            y = int((-d).argmax(1))
            hist[cur] -= 1
            hist[y] += 1
            mem[i] = y
    sizes = hist.sort(descending=True).values.tolist()
    if prior:  # shares 0.533, 0.267, 0.133, 0.067 of 200
        assert sizes == pytest.approx([N * p for p in profile_shares(K, R)], abs=1.5)
    else:
        assert sizes == [50, 50, 50, 50]


# ---------------------------------------------------------------------------------------------------------
# Equivalence: one step on 2 gloo workers with local batches b1, b2 == one step on 1 worker on concat(b1, b2).

N, B = 64, 16


def _cfg(world: int, constraint: str, heads: int = 2):
    # "entropy-profile": the entropy constraint with the long-tailed size prior (ranks read the histogram);
    # "-counted", "-separate": the release's share normalisation, one BN pass per view
    constraint, *options = constraint.split("-")
    # Temperatures 0.5, not SeCu's 0.05: on this tiny net and batch, logits at 1 / 0.05 make the 3 epochs chaotic,
    # growing the fp32 rounding by which a 2-worker sum differs from one batch's to 5e-5 in the weights (one
    # Xeon's oneDNN kernels, torch 2.14) where 0.5 leaves it at 1e-6. Equivalence is a property of the
    # collectives, which both temperatures exercise alike; every assignment must still match exactly.
    secu = {"num_heads": heads, "constraint": constraint, "alpha": 50.0, "t_x": 0.5, "t_w": 0.5}
    if "profile" in options:
        secu |= {"size_prior": "profile", "expected_imbalance": 10.0}
    if "counted" in options:
        secu |= {"share_norm": "counted"}
    if "separate" in options:
        secu |= {"bn_views": "separate"}
    if "kmeans" in options:
        secu |= {"init": "kmeans"}
    if "backbone" in options:
        secu |= {"center_space": "backbone"}
    # "frozen": nothing left for DDP (the centers reduce themselves), so workers run the method unwrapped
    freeze = "all" if "frozen" in options else "none"
    return from_dict({
        "model": {"backbone": "smallconv", "width": 8, "proj_hidden": 32, "proj_dim": 16, "freeze": freeze},
        "method": {"num_clusters": 4, "secu": secu, "kmeans": {"iters": 10, "restarts": 2}},
        "data": {"batch_size": B}, "trainer": {"num_workers": world},
    })


def secu_steps(rank: int, world: int, constraint: str, heads: int = 2) -> dict[str, np.ndarray]:
    cfg = _cfg(world, constraint, heads)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    model = wrap_ddp(method) if world > 1 else method
    if world > 1 and cfg.model.freeze == "all" and cfg.method.secu.center_space == "backbone":
        assert model is method  # no parameter of DDP's own to average
    elif world > 1:  # DDP leaves the centers to SeCu.reduce_gradients
        assert model.parameters_to_ignore == {f"heads.{h}.weight" for h in range(heads)}
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 1.0)
    g = torch.Generator().manual_seed(123)
    lo, hi = rank * B // world, (rank + 1) * B // world
    map_train = sharded_map_train(method, torch.randn(N, 1, 8, 8, generator=g), rank, world)
    for epoch in range(3):  # epoch > 0 exercises the memory (ybar) and the histogram's removals
        method.on_epoch_start(EpochContext(epoch, 3, 1, map_train))
        index = torch.randperm(N, generator=g)[:B]
        x1, x2 = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
        train_step(model, method, opt, index[lo:hi], x1[lo:hi], x2[lo:hi])
    out = {k: v.numpy() for k, v in state_tensors(method).items()}
    # predict=merge reads only this replicated state, so every worker merges head 1 into the same groups
    out["merge_groups"] = merge_centers(method.heads[1].centers(), method.heads[1].hist > 0, 4).numpy()
    return out


@pytest.mark.parametrize("constraint", ["size", "entropy", "entropy-profile", "entropy-counted-separate",
                                        "size-separate", "entropy-kmeans", "entropy-backbone",
                                        "entropy-backbone-frozen"])
def test_two_workers_equal_one_worker_on_the_concatenated_batch(constraint):
    single = assert_two_workers_equal_one(secu_steps, constraint)
    # The state did change: memory filled, histogram counts every remembered instance.
    mem = single["heads.0.memory"]
    assert (mem >= 0).sum() == single["heads.0.hist"].sum() > 0


def test_heads_with_more_clusters_than_the_batch_average_only_the_assigned_columns():
    """Heads of K_h = 4 .. 20 clusters against a global batch of 16: the 20-cluster head's centers leave DDP and
    only the columns the global batch was assigned to are averaged (djc.dist.average_gradients_); the step still
    equals one worker's on the concatenated batch."""
    single = assert_two_workers_equal_one(secu_steps, "entropy", 5)
    assert single["heads.4.weight"].shape[1] == 20 > B


def test_center_gradients_are_zero_outside_the_assigned_columns():
    """What averaging only the assigned columns relies on: the center loss reaches no other column."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g, requires_grad=True)
    x = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    y = torch.tensor([3, 3, 7, 0, 11])
    center_loss(x, F.normalize(w, dim=0), y, 0.05).backward()
    touched = torch.zeros(12, dtype=torch.bool)
    touched[y] = True
    assert (w.grad[:, ~touched] == 0).all() and (w.grad[:, touched].abs().sum(0) > 0).all()


# ---------------------------------------------------------------------------------------------------------
# predict=merge: an over-clustered head merged to K (long-tailed data).


def _split_centers(seed: int = 0):
    """20 columns in 32-d for 10 classes, as an over-clustered head holds them on long-tailed data: the big class
    0 spread over 6 nearby centers, class 1 over 4, each small class 2..9 on one center of its own (however few
    instances it has); columns 18 and 19 hold no instance and lie nearest classes 3 and 5."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(10, 32, generator=g), dim=1)
    owner = torch.tensor([0] * 6 + [1] * 4 + list(range(2, 10)) + [3, 5])
    cols = F.normalize(dirs[owner] + 0.06 * torch.randn(20, 32, generator=g), dim=1)
    alive = torch.ones(20, dtype=torch.bool)
    alive[18:] = False
    return cols.T, alive, owner


def test_merge_joins_a_split_big_class_and_keeps_small_classes_that_own_a_center():
    centers, alive, owner = _split_centers()
    groups = merge_centers(centers, alive, 10)
    assert groups.dtype == torch.long and groups.shape == (20,) and set(groups.tolist()) == set(range(10))
    # the partition of the columns is the classes' (group ids numbered by first alive column: class order here)
    assert torch.equal(groups, owner)
    # a dead column joins its nearest alive one's group; it played no part in the linkage
    assert torch.equal(merge_centers(centers[:, :18], alive[:18], 10), groups[:18])


def test_merge_with_fewer_alive_columns_than_k_keeps_each_alive_column():
    centers, alive, _ = _split_centers()
    alive[:] = False
    alive[[2, 7, 11]] = True
    groups = merge_centers(centers, alive, 10)
    assert groups[[2, 7, 11]].tolist() == [0, 1, 2] and set(groups.tolist()) == {0, 1, 2}
    assert torch.equal(merge_centers(centers, torch.zeros(20, dtype=torch.bool), 10),
                       merge_centers(centers, torch.ones(20, dtype=torch.bool), 10))  # no counts yet: all


def test_predict_merge_maps_the_over_clustered_head_through_its_groups():
    cfg = from_dict({"model": {"backbone": "mlp", "width": 16, "proj_hidden": 32, "proj_dim": 32},
                     "method": {"num_clusters": 10, "secu": {"num_heads": 2, "predict": "merge"}}})
    method = build_method(cfg, DataInfo(100, (8, 8, 1), 10)).eval()
    centers, alive, owner = _split_centers()
    head = method.heads[1]
    with torch.no_grad():
        head.weight.copy_(centers)
        head.hist.copy_(alive.long() * 5)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    p = method.predict(x)
    fine = (method.embed(x) @ head.centers()).argmax(dim=1)
    assert torch.equal(p.clusters[:, 0], owner[fine]) and torch.equal(p.clusters[:, 1], fine)
    assert ((p.confidence > 0) & (p.confidence <= 1 + 1e-6)).all()
    assert torch.equal(method.health_counts(), torch.tensor([30, 20] + [5] * 8))  # merged sizes
    with torch.no_grad():  # new centers (an optimiser step, a checkpoint load): the cached groups are stale
        head.weight.copy_(centers[:, torch.cat([torch.randperm(18, generator=torch.Generator().manual_seed(2)),
                                                torch.tensor([18, 19])])])
    fine = (method.embed(x) @ head.centers()).argmax(dim=1)
    fresh = merge_centers(head.centers(), alive, 10)
    assert not torch.equal(fresh, owner)
    assert torch.equal(method.predict(x).clusters[:, 0], fresh[fine])

"""Debiased contrastive clustering: the losses behave as docs/methods/dcl.md says, and 2 gloo workers == 1."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from djc.config import from_dict
from djc.optim import apply_lr, make_optimizer
from djc.step import build_method, train_step, wrap_ddp
from tests.gloo import state_tensors
from djc.methods.agglomerate import PieceStats, merge_groups
from djc.methods.base import DataInfo, EpochContext
from djc.methods.dcl import Cardinality, cs_divergence, ddc_loss, debiased_contrastive_loss, gaussian_kernel
from tests.gloo import assert_two_workers_equal_one


def _pairs(b: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=1), F.normalize(torch.randn(b, d, generator=g), dim=1)


def _simclr_layout(z1: torch.Tensor, z2: torch.Tensor):
    """Anchors are both views; z_all = [z1; z2]; the positive of row i is row i +- B."""
    b = z1.shape[0]
    z = torch.cat([z1, z2])
    j = torch.arange(2 * b)
    return z, z, (j + b) % (2 * b), j


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR's NT-Xent, written independently: cross-entropy over the 2B - 1 others, target the other view."""
    z = torch.cat([z1, z2])
    sim = z @ z.T / t
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


@pytest.mark.parametrize("t", [0.5, 0.1])
def test_tau_plus_zero_is_nt_xent(t):
    z1, z2 = _pairs(12, 8, 0)
    out = debiased_contrastive_loss(*_simclr_layout(z1, z2), temperature=t, tau_plus=0.0)
    assert out.loss.item() == pytest.approx(nt_xent_reference(z1, z2, t).item(), rel=1e-5)
    assert out.clamped.item() == 0.0  # at tau+ = 0 every negative is >= e^{-1/t}: the floor never binds


def test_floor_holds_when_the_debiased_estimate_goes_below_it():
    # Positive identical to the anchor, every negative opposite: neg_sum = M e^{-1/t}, so with tau+ = 0.5 the
    # estimate (neg_sum - tau+ M e^{1/t}) / (1 - tau+) < 0 and Ng must be the floor M e^{-1/t}.
    t = 0.5
    e = torch.zeros(4)
    e[0] = 1.0
    anchors = e[None]  # (1, D)
    z_all = torch.stack([e, e, -e, -e, -e, -e])  # row 0 the anchor, row 1 its positive, M = 4 negatives
    out = debiased_contrastive_loss(anchors, z_all, torch.tensor([1]), torch.tensor([0]), t, 0.5)
    m = z_all.shape[0] - 2
    raw = (m * math.exp(-1 / t) - 0.5 * m * math.exp(1 / t)) / 0.5
    assert raw < m * math.exp(-1 / t)
    expect = -math.log(math.exp(1 / t) / (math.exp(1 / t) + m * math.exp(-1 / t)))
    assert out.loss.item() == pytest.approx(expect, rel=1e-5)
    assert out.clamped.item() == 1.0


def test_per_anchor_tau_plus_matches_the_scalar_row_by_row():
    z1, _ = _pairs(6, 8, 1)
    z2 = F.normalize(z1 + 0.2 * _pairs(6, 8, 5)[0], dim=1)  # positives closer than the negatives
    z, z_all, pos, self_ = _simclr_layout(z1, z2)
    taus = torch.linspace(0.0, 0.3, 12)
    per = debiased_contrastive_loss(z, z_all, pos, self_, 0.5, taus).loss
    rows = [debiased_contrastive_loss(z[i : i + 1], z_all, pos[i : i + 1], self_[i : i + 1], 0.5,
                                      float(taus[i])).loss for i in range(12)]
    assert per.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    # With positives more similar than the negatives, a larger tau+ removes more mass than it rescales away:
    # the estimated Ng, and with it the loss, goes down.
    lo = debiased_contrastive_loss(z, z_all, pos, self_, 0.5, 0.0).loss
    hi = debiased_contrastive_loss(z, z_all, pos, self_, 0.5, 0.2).loss
    assert hi < lo


def test_debiased_loss_decreases_under_gradient_steps():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(16, 8, generator=g)
    w = torch.nn.Linear(8, 8)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        x1 = base + 0.3 * torch.randn(16, 8, generator=g)
        x2 = base + 0.3 * torch.randn(16, 8, generator=g)
        z1, z2 = F.normalize(w(x1), dim=1), F.normalize(w(x2), dim=1)
        loss = debiased_contrastive_loss(*_simclr_layout(z1, z2), temperature=0.5, tau_plus=0.1).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1


def _block_kernel(labels: torch.Tensor) -> torch.Tensor:
    return (labels[:, None] == labels[None]).float()


def test_ddc_terms_at_their_extremes():
    k, per = 3, 4
    y = torch.arange(k).repeat_interleave(per)  # (12,)
    onehot = F.one_hot(y, k).float()
    g = _block_kernel(y)
    # Perfectly separated one-hot assignments under a block kernel: no cross-cluster kernel mass, d_cs = 0.
    assert cs_divergence(onehot, g).item() == pytest.approx(0.0, abs=1e-6)
    # Identical assignments for every sample: every column is the same vector, d_cs is maximal (= 1).
    same = torch.full((12, k), 1.0 / k)
    assert cs_divergence(same, g).item() == pytest.approx(1.0, abs=1e-6)
    soft = F.softmax(torch.randn(12, k, generator=torch.Generator().manual_seed(3)), dim=1)
    assert 0.0 < cs_divergence(soft, g).item() < 1.0
    # L2: orthogonal one-hot rows (B <= K) give 0; identical one-hot rows give the maximum 1.
    eye = torch.eye(4)
    assert ddc_loss(eye, torch.randn(4, 5), 0.15).l2.item() == pytest.approx(0.0, abs=1e-7)
    ones = F.one_hot(torch.zeros(4, dtype=torch.long), 4).float()
    assert ddc_loss(ones, torch.randn(4, 5), 0.15).l2.item() == pytest.approx(1.0, abs=1e-6)
    # L2 equals its definition 2 / (B (B - 1)) sum_{i<j} a_i^T a_j.
    iu = torch.triu_indices(12, 12, 1)
    expect = 2.0 / (12 * 11) * (soft @ soft.T)[iu[0], iu[1]].sum()
    assert ddc_loss(soft, torch.randn(12, 5), 0.15).l2.item() == pytest.approx(expect.item(), rel=1e-5)


def test_gaussian_kernel_bandwidth_follows_the_median():
    h = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    g = gaussian_kernel(h, 0.15)
    d2 = torch.cdist(h, h).square()
    sigma2 = 0.15 * d2.median()
    assert torch.allclose(g, torch.exp(-d2 / (2 * sigma2)), atol=1e-5)
    assert torch.allclose(gaussian_kernel(3.0 * h, 0.15), g, atol=1e-5)  # scale-free


def test_cardinality_shares_fall_back_then_follow_the_counts():
    card = Cardinality(3, 10)
    y = torch.tensor([0, 1, 2])
    assert card.tau_plus(y, 0.1, 0.5).tolist() == pytest.approx([0.1, 0.1, 0.1])  # nothing counted yet
    card.update(torch.arange(8), torch.tensor([0, 0, 0, 0, 0, 0, 1, 2]))
    assert card.hist.tolist() == [6, 1, 1]
    assert card.tau_plus(y, 0.1, 0.5).tolist() == pytest.approx([0.5, 1 / 8, 1 / 8])  # 6/8 clipped to 0.5
    card.update(torch.tensor([0, 1]), torch.tensor([2, 2]))  # relabelled instances move, not duplicate
    assert card.hist.tolist() == [4, 1, 3]


def test_dataset_share_divides_by_n_and_counted_by_the_instances_seen():
    """tau+_i = n_c / N (tau_plus_share=dataset, the spec's formula) or n_c / (instances counted so far)."""
    card = Cardinality(3, 20)  # N = 20, 8 of them counted
    card.update(torch.arange(8), torch.tensor([0, 0, 0, 0, 0, 1, 2, 2]))
    y = torch.tensor([0, 1, 2])
    assert card.tau_plus(y, 0.1, 0.9, "dataset").tolist() == pytest.approx([5 / 20, 1 / 20, 2 / 20])
    assert card.tau_plus(y, 0.1, 0.9, "counted").tolist() == pytest.approx([5 / 8, 1 / 8, 2 / 8])
    card.update(torch.arange(8, 20), torch.full((12,), 1))  # once all N are counted, the two agree
    assert card.tau_plus(y, 0.1, 0.9, "dataset").tolist() == card.tau_plus(y, 0.1, 0.9, "counted").tolist()


def _chuang_loss(out_1, out_2, temperature, tau_plus):
    """chingyaoc/DCL main.py train(): the debiased loss of one batch (both views as anchors)."""
    batch_size = out_1.shape[0]
    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    mask = torch.ones((batch_size, 2 * batch_size), dtype=bool)
    for i in range(batch_size):
        mask[i, i] = 0
        mask[i, i + batch_size] = 0
    mask = torch.cat((mask, mask), 0)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    n = batch_size * 2 - 2
    ng = (-tau_plus * n * pos + neg.sum(dim=-1)) / (1 - tau_plus)
    ng = torch.clamp(ng, min=n * np.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + ng))).mean()


@pytest.mark.parametrize("t,tau", [(0.5, 0.1), (0.2, 0.3), (0.5, 0.0)])
def test_debiased_loss_is_chuangs_release(t, tau):
    z1, z2 = _pairs(10, 6, 3)
    out = debiased_contrastive_loss(*_simclr_layout(z1, z2), temperature=t, tau_plus=tau)
    assert out.loss.item() == pytest.approx(_chuang_loss(z1, z2, t, tau).item(), rel=1e-5)


def _mvc_ddc(output, hidden, n_clusters, rel_sigma=0.15):
    """DanielTrosten/mvc (the DDC authors' group, PyTorch) src/lib/loss.py DDC1 + DDC2 + DDC3, kernel.py."""
    eps = 1e-9

    def sqdist(x, y):
        return (x**2).sum(1, keepdim=True) - 2 * x @ y.t() + (y**2).sum(1, keepdim=True).t()

    def d_cs(a, k):
        nom = a.t() @ k @ a
        dnom_squared = torch.diagonal(nom).unsqueeze(-1) @ torch.diagonal(nom).unsqueeze(0)
        nom = torch.where(nom < eps, nom.new_tensor(eps), nom)
        dnom_squared = torch.where(dnom_squared < eps**2, dnom_squared.new_tensor(eps**2), dnom_squared)
        return 2 / (n_clusters * (n_clusters - 1)) * torch.triu(nom / torch.sqrt(dnom_squared), diagonal=1).sum()

    dist = F.relu(sqdist(hidden, hidden))
    sigma2 = (rel_sigma * torch.median(dist)).detach()
    kern = torch.exp(-dist / (2 * torch.where(sigma2 < eps, sigma2.new_tensor(eps), sigma2)))
    n = output.size(0)
    l2 = 2 / (n * (n - 1)) * torch.triu(output @ output.t(), diagonal=1).sum()
    m = torch.exp(-sqdist(output, torch.eye(n_clusters, dtype=output.dtype)))
    return d_cs(output, kern), l2, d_cs(m, kern)


def test_ddc_loss_is_the_ddc_authors_implementation():
    g = torch.Generator().manual_seed(4)
    a = F.softmax(3 * torch.randn(20, 5, generator=g, dtype=torch.float64), dim=1)
    h = torch.randn(20, 7, generator=g, dtype=torch.float64)
    ours, ref = ddc_loss(a, h, 0.15), _mvc_ddc(a, h, 5)
    for name, x, y in zip(("l1", "l2", "l3"), ours, ref):
        assert x.item() == pytest.approx(y.item(), rel=1e-9), name


def test_separate_bn_views_are_chuangs_two_passes():
    cfg = _cfg(1, "cluster", bn_views="separate")
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4)).train()
    g = torch.Generator().manual_seed(2)
    x1, x2 = torch.randn(B, 1, 8, 8, generator=g), 2 * torch.randn(B, 1, 8, 8, generator=g) + 1
    captured = []
    handle = method.cluster_out.register_forward_hook(lambda m, i, o: captured.append(o))
    method(torch.arange(B), x1, x2)
    handle.remove()
    with torch.no_grad():  # the release: feature_1, out_1 = net(pos_1); feature_2, out_2 = net(pos_2)
        a1, a2 = method.cluster_out(method.cluster_hidden(method.encode(x1))), method.cluster_out(
            method.cluster_hidden(method.encode(x2)))
    assert torch.allclose(torch.cat(captured), torch.cat([a1, a2]), atol=1e-6)
    with torch.no_grad():
        joint = method.cluster_out(method.cluster_hidden(method.encode(torch.cat([x1, x2]))))
    assert not torch.allclose(joint, torch.cat([a1, a2]), atol=1e-3)


# ---------------------------------------------------------------------------------------------------------
# Equivalence: one step on 2 gloo workers with local batches b1, b2 == one step on 1 worker on concat(b1, b2).

N, B = 64, 16


def _cfg(world: int, mode: str, **dcl):
    return from_dict({
        "model": {"backbone": "smallconv", "width": 8, "proj_hidden": 32, "proj_dim": 16},
        "method": {"name": "dcl", "num_clusters": 4,
                   "dcl": {"tau_plus_mode": mode, "cluster_hidden": 12} | dcl},
        # SGD, not the release's Adam: Adam turns the ~1e-9 float noise in the gradient of a bias that a
        # BatchNorm cancels (proj.0.bias) into full lr-sized steps of random sign, on 1 and 2 workers alike.
        "optim": {"name": "sgd", "lr": 0.1},
        "data": {"batch_size": B}, "trainer": {"num_workers": world},
    })


def dcl_steps(rank: int, world: int, mode: str, release: bool = False, pieces: int = 1,
              nn: int = 0) -> dict[str, np.ndarray]:
    # release: per-view BN passes (Chuang et al.) and tau+ = n_c / N; pieces: the over-clustered head; nn: NNCLR's
    # neighbour positives from the first step (the bank fills as the steps go), the mean of nn neighbours
    extra = {"bn_views": "separate", "tau_plus_share": "dataset"} if release else {}
    if nn:
        extra |= {"nn_weight": 0.5, "nn_start_epoch": 0, "nn_k": nn}
    cfg = _cfg(world, mode, pieces=pieces, **extra)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    method.on_epoch_start(EpochContext(0, 1, 3, lambda fn: (torch.empty(0), torch.empty(0))))
    model = wrap_ddp(method) if world > 1 else method
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 1.0)
    # Seed 123 lands step 3 (global mode) on a non-smooth point of the network (ReLU / max-pool): a 1e-7 change
    # of the weights moves one conv's gradient by 10% even on one process, so no two summation orders can agree
    # there. Seed 7 is smooth at that scale.
    g = torch.Generator().manual_seed(7)
    lo, hi = rank * B // world, (rank + 1) * B // world
    for _ in range(3):  # steps 2 and 3 read the counts of the earlier steps (per-anchor tau+)
        index = torch.randperm(N, generator=g)[:B]
        x1, x2 = torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
        train_step(model, method, opt, index[lo:hi], x1[lo:hi], x2[lo:hi])
    return {k: v.numpy() for k, v in state_tensors(method).items()}


@pytest.mark.parametrize("mode,release,pieces,nn", [("cluster", False, 1, 0), ("global", False, 1, 0),
                                                    ("cluster", True, 1, 0), ("cluster", False, 3, 0),
                                                    ("global", False, 1, 1), ("global", False, 1, 5)])
def test_two_workers_equal_one_worker_on_the_concatenated_batch(mode, release, pieces, nn):
    # The bank's rows are the network's outputs after two updates, which carry the parameters' ~1e-6 summation-order
    # noise amplified through the layers (measured: one of 1,024 entries 1.3e-5 apart); a row in the wrong slot
    # would be O(1) apart
    single = assert_two_workers_equal_one(dcl_steps, mode, release, pieces, nn, **({"atol": 5e-5} if nn else {}))
    if nn:  # the bank holds the 3 steps' instances (B of 64 each), rows normalised, the rest unfilled
        filled = single["nn_filled"]
        assert 0 < filled.sum() <= 3 * B and np.allclose(np.linalg.norm(single["nn_bank"][filled], axis=1), 1, atol=1e-5)
        assert not single["nn_bank"][~filled].any()
    else:
        assert "nn_bank" not in single
    assert single["card.hist"].sum() == (single["card.memory"] >= 0).sum() > 0
    assert single["card.hist"].shape == (4 * pieces,)
    if pieces > 1:  # the pieces' statistics: one EMA of normalised global sums (shares sum to 1 - 0.9^3 after 3 steps)
        assert single["piece_stats.sums"][:, 0].sum() == pytest.approx(1 - 0.9 ** 3, rel=1e-5)
    else:
        assert "piece_stats.sums" not in single  # the paper's K-way head keeps no piece statistics


# ---------------------------------------------------------------------------------------------------------
# Over-cluster, then merge (method.dcl.pieces > 1).


def _blobs_on_the_sphere(sizes: list[int], d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.eye(d)[: len(sizes)]  # orthogonal class directions
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    return F.normalize(means[y] + 0.15 * torch.randn(len(y), d, generator=g), dim=1), y


def test_merging_pieces_recovers_long_tailed_blobs_and_ignores_empty_pieces():
    # Three blobs of 120, 30 and 8 points cut into 4 + 2 + 1 pieces (the big one in quarters), plus a piece that
    # holds no instance any more but whose EMA statistics linger away from every blob (its mean opposite to all
    # three): the merge must give back the three blobs.
    u, y = _blobs_on_the_sphere([120, 30, 8], 32, 0)
    side = (u[:, 0] > u[y == 0, 0].median()).long()
    piece = torch.where(y == 0, 2 * side + (u[:, 1] > 0).long(), torch.where(y == 1, 4 + side, 6))
    stats = PieceStats(8, 32, ema=0.0)
    stats.update_global(PieceStats.local_sums(u, piece, 8))
    away = -F.normalize(torch.eye(32)[:3].sum(0), dim=0)
    stats.sums[7] = torch.cat([stats.sums[6, :1], stats.sums[6, :1] * away, stats.sums[6, 33:]])
    alive = torch.arange(8) < 7
    groups = stats.groups(3, alive)
    assert groups[piece].tolist() == y.tolist()  # numbered by first piece: blob k is group k
    assert groups[7] == 0  # an empty piece names no group of its own
    # Had the lingering piece taken part, it would have kept a group to itself and two blobs would share one.
    assert merge_groups(stats.sums, 3)[piece].tolist() != y.tolist()


def test_pieces_head_predicts_merged_groups_and_keeps_the_piece():
    cfg = _cfg(1, "cluster", pieces=3)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    opt = make_optimizer(cfg, method)
    apply_lr(opt, 1.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        index = torch.randperm(N, generator=g)[:B]
        train_step(method, method, opt, index, torch.randn(B, 1, 8, 8, generator=g),
                   torch.randn(B, 1, 8, 8, generator=g))
    method.eval()
    p = method.predict(torch.randn(40, 1, 8, 8, generator=g))
    alive = method.card.hist > 0
    groups = method.piece_stats.groups(4, alive)
    assert p.clusters.shape == (40, 2) and alive[p.clusters[:, 1]].all()  # only pieces that hold instances
    assert torch.equal(p.clusters[:, 0], groups[p.clusters[:, 1]]) and p.clusters[:, 0].max() < 4
    assert method.health_counts().sum() == method.card.hist.sum() and method.health_counts().shape == (4,)


def test_pieces_times_clusters_must_fit_in_a_batch():
    with pytest.raises(ValueError, match="method.dcl.pieces=5"):
        from_dict({"method": {"name": "dcl", "num_clusters": 10, "dcl": {"pieces": 5}}, "data": {"batch_size": 32}})


# ---------------------------------------------------------------------------------------------------------
# The temperature schedule (method.dcl.temperature_schedule; StatDEC shares it).


def test_cosine_temperature_runs_from_high_to_low_and_back():
    c = _cfg(1, "global", temperature=1.0, temperature_schedule="cosine", temperature_min=0.1,
             temperature_half_period=4).method.dcl
    ts = [c.temperature_at(e) for e in range(9)]
    assert ts[0] == pytest.approx(1.0) and ts[4] == pytest.approx(0.1) and ts[8] == pytest.approx(1.0)
    assert ts[2] == pytest.approx(0.55) and all(a > b for a, b in zip(ts[:4], ts[1:5]))
    assert _cfg(1, "global", temperature=0.3).method.dcl.temperature_at(7) == 0.3  # constant: the one value
    with pytest.raises(ValueError, match="temperature_min=0.5 must be below temperature=0.2"):
        _cfg(1, "global", temperature=0.2, temperature_schedule="cosine", temperature_min=0.5)


def test_the_step_uses_the_epochs_temperature():
    # The loss of a step at epoch e equals the constant schedule's at t(e), and differs from it at t(0).
    g = torch.Generator().manual_seed(3)
    index, x1, x2 = torch.arange(B), torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)

    def loss(epoch: int, **dcl) -> float:
        torch.manual_seed(0)
        method = build_method(_cfg(1, "global", lam=0.0, **dcl), DataInfo(N, (8, 8, 1), 4)).train()
        method.on_epoch_start(EpochContext(epoch, 20, 4, lambda fn: (torch.empty(0), torch.empty(0))))
        return method(index, x1, x2).loss.item()

    cosine = {"temperature": 1.0, "temperature_schedule": "cosine", "temperature_min": 0.1, "temperature_half_period": 4}
    assert loss(2, **cosine) == pytest.approx(loss(0, temperature=0.55), rel=1e-6)
    assert loss(2, **cosine) != pytest.approx(loss(0, **cosine), rel=1e-3)


def test_neighbour_anchor_is_the_nearest_other_filled_instance():
    cfg = _cfg(1, "global", nn_weight=1.0, nn_start_epoch=0)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    d = method.nn_bank.shape[1]
    bank = F.normalize(torch.randn(N, d, generator=torch.Generator().manual_seed(5)), dim=1)
    method.nn_bank.copy_(bank)
    method.nn_filled[:] = True
    method.nn_filled[7] = False  # never written: never a neighbour
    q = torch.stack([bank[3], bank[7], 0.6 * bank[7] + 0.4 * bank[9]])
    q = F.normalize(q, dim=1)
    out = method._neighbors(q, torch.tensor([3, 20, 21]))
    sims = q @ bank.T
    sims[:, 7] = -2
    sims[0, 3] = sims[1, 20] = sims[2, 21] = -2  # each row's own instance is left out
    assert torch.equal(out, bank[sims.argmax(dim=1)])
    assert not torch.equal(out[0], bank[3])
    method.nn_filled[:] = False  # nothing filled yet: every anchor keeps itself
    assert torch.equal(method._neighbors(q, torch.tensor([3, 20, 21])), q)


def test_neighbour_anchor_with_nn_k_is_the_normalised_mean_of_the_k_nearest_others():
    cfg = _cfg(1, "global", nn_weight=1.0, nn_start_epoch=0, nn_k=3)
    method = build_method(cfg, DataInfo(N, (8, 8, 1), 4))
    d = method.nn_bank.shape[1]
    bank = F.normalize(torch.randn(N, d, generator=torch.Generator().manual_seed(5)), dim=1)
    method.nn_bank.copy_(bank)
    method.nn_filled[:] = True
    method.nn_filled[7] = False
    q = F.normalize(torch.stack([bank[3], 0.6 * bank[7] + 0.4 * bank[9]]), dim=1)
    out = method._neighbors(q, torch.tensor([3, 21]))
    sims = q @ bank.T
    sims[:, 7] = -2
    sims[0, 3] = sims[1, 21] = -2
    want = F.normalize(bank[sims.topk(3, dim=1).indices].sum(1), dim=1)
    assert torch.allclose(out, want, atol=1e-6) and torch.allclose(out.norm(dim=1), torch.ones(2))
    assert not torch.allclose(out, bank[sims.argmax(dim=1)])  # not the single nearest (nn_k = 1)
    method.nn_filled[:] = False
    method.nn_filled[[0, 1]] = True  # fewer filled rows than nn_k: the mean of those that exist
    out = method._neighbors(q, torch.tensor([3, 21]))
    assert torch.allclose(out, F.normalize(bank[0] + bank[1], dim=0).expand(2, -1), atol=1e-6)
    method.nn_filled[:] = False
    assert torch.equal(method._neighbors(q, torch.tensor([3, 21])), q)

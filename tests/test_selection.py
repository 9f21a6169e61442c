"""The model-selection criterion: its value, its cluster-health penalty, and its reduction over workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import calinski_harabasz_score

from djc.selection import variance_ratio
from tests.gloo import run_gloo


def _stats(z: np.ndarray, c: np.ndarray, K: int) -> torch.Tensor:
    s = torch.zeros(K, z.shape[1] + 2, dtype=torch.float64)
    zt, ct = torch.as_tensor(z, dtype=torch.float64), torch.as_tensor(c)
    s[:, 0].index_add_(0, ct, torch.ones(len(c), dtype=torch.float64))
    s[:, 1].index_add_(0, ct, zt.square().sum(1))
    s[:, 2:].index_add_(0, ct, zt)
    return s


def test_variance_ratio_is_calinski_harabasz_brought_to_0_1():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (4, 5))
    c = rng.integers(0, 4, 300)
    z = centers[c] + rng.normal(0, 1, (300, 5))
    r, ch, used = variance_ratio(_stats(z, c, 6))  # K = 6 asked, 4 used
    assert used == 4
    assert ch == pytest.approx(calinski_harabasz_score(z, c), rel=1e-9)
    assert 0.0 < r < 1.0 and ch == pytest.approx(r / (1 - r) * (300 - 4) / (4 - 1), rel=1e-9)
    # Random labels explain almost nothing of the same features.
    r_random, _, _ = variance_ratio(_stats(z, rng.integers(0, 4, 300), 6))
    assert r_random < 0.1 < r


def test_collapse_and_featureless_embeddings_score_zero():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 3))
    assert variance_ratio(_stats(z, np.zeros(50, np.int64), 5))[:2] == (0.0, 0.0)
    assert variance_ratio(_stats(np.ones((50, 3)), rng.integers(0, 5, 50), 5))[:2] == (0.0, 0.0)


def _tiny_method(data_url: str):
    from djc.config import from_dict
    from djc.data.shards import read_manifest
    from djc.data.augment import ViewPair
    from djc.step import build_method
    from djc.train import data_info

    cfg = from_dict({"data": {"train": data_url, "batch_size": 64}, "model": {"backbone": "mlp", "width": 16},
                     "method": {"secu": {"num_heads": 1}}})
    m = read_manifest(data_url)
    method = build_method(cfg, data_info(m)).eval()
    return method, ViewPair(cfg, m.mean, m.std, m.image_shape[0])


def selection_on_workers(rank: int, world: int, data_url: str) -> dict:
    from djc.selection import selection_metrics

    method, views = _tiny_method(data_url)
    return selection_metrics(method, data_url, views, torch.device("cpu"), 10)


def test_two_workers_get_the_one_worker_numbers(tmp_path):
    from djc.data.prepare import prepare

    prepare("digits", str(tmp_path / "ds"), split="test", progress=False)
    url = str(tmp_path / "ds")
    one = selection_on_workers(0, 1, url)
    two = run_gloo(selection_on_workers, 2, url)
    assert two[0] == two[1]  # every rank reports the same numbers
    assert set(one) >= {"select_score", "select_r", "select_ch", "select_acc", "select_balanced_acc"}
    for k, v in one.items():
        assert two[0][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    assert one["select_score"] == pytest.approx(one["select_stability_nmi"] * one["select_clusters_used"] / 10)


def test_silhouette_is_scikit_learns_under_cosine_distance():
    from sklearn.metrics import silhouette_score

    from djc.selection import silhouette

    rng = np.random.default_rng(3)
    centers = rng.normal(0, 2, (5, 8))
    c = rng.integers(0, 5, 400)
    c[:1] = 7  # a cluster of one sample scores 0, as in scikit-learn
    z = centers[c % 5] + rng.normal(0, 1, (400, 8))
    assert silhouette(torch.as_tensor(z), torch.as_tensor(c)) == pytest.approx(
        silhouette_score(z, c, metric="cosine"), abs=1e-9)
    assert silhouette(torch.as_tensor(z), torch.zeros(400, dtype=torch.long)) == 0.0  # one cluster


def test_a_collapsed_clustering_scores_zero_and_a_clean_one_near_one(tmp_path):
    """selection_metrics on a 'method' whose features are blobs and whose clusters are given: stability and
    agreement with k-means are 1 for the true blobs, 0 for one cluster."""
    from djc.data.writer import write_dataset
    from djc.methods.base import Prediction
    from djc.selection import CANDIDATES, SCORE, selection_metrics

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, 300)
    images = np.zeros((300, 4, 4, 1), np.uint8)
    images[:, 0, 0, 0] = labels * 60  # the class is in one pixel, which no augmentation here moves
    write_dataset(str(tmp_path / "ds"), list(images), labels, name="blobs", class_names=list("abcd"), provenance={})

    class Blobs:
        def __init__(self, collapse):
            self.collapse = collapse

        def predict(self, x):
            k = torch.round(x[:, 0, 0, 0] / 60).long()  # the pixel holds 60 x class
            z = torch.nn.functional.one_hot(k, 4).float() + 0.01 * torch.randn(len(k), 4)
            c = torch.zeros_like(k) if self.collapse else k
            return Prediction(c[:, None], torch.ones(len(k)), z)

    class Plain:  # views that leave the pixel alone: stability is then exact
        def eval(self, images):
            return images.float()

        def by_index(self, images, index, n):
            return self.eval(images)

    clean = selection_metrics(Blobs(False), str(tmp_path / "ds"), Plain(), torch.device("cpu"), 4)
    collapsed = selection_metrics(Blobs(True), str(tmp_path / "ds"), Plain(), torch.device("cpu"), 4)
    assert clean["select_balanced_acc"] == 1.0 and clean["select_stability_nmi"] == pytest.approx(1.0)
    assert clean["select_kmeans_nmi"] == pytest.approx(1.0) and clean["select_score"] > 0.95
    assert collapsed["select_score"] == 0.0 and collapsed["select_stability_nmi"] == 0.0
    assert clean["select_stability_jaccard"] == pytest.approx(1.0) and collapsed["select_stability_jaccard"] == 0.0
    assert clean["select_score"] == CANDIDATES[SCORE](clean)


def test_stability_jaccard_weighs_a_tail_cluster_as_much_as_a_head_one():
    from sklearn.metrics import normalized_mutual_info_score

    from djc.selection import stability_jaccard

    head, tail = np.zeros(900, int), np.ones(20, int)
    plain = np.r_[head, tail, np.full(80, 2)]
    lost_tail = plain.copy()
    lost_tail[900:920] = 0  # the augmented view puts the 20-sample tail cluster into the head
    assert stability_jaccard(plain, plain, 4) == pytest.approx(3 / 4)  # cluster 3 unused: it counts 0
    # Losing the tail costs the macro average a third of its value, the NMI much less (by mass, it is 2%)
    assert stability_jaccard(plain, lost_tail, 3) == pytest.approx((900 / 920 + 0 + 1) / 3)
    assert normalized_mutual_info_score(plain, lost_tail) > 0.8


def test_consensus_is_the_mean_nmi_with_the_other_runs():
    from sklearn.metrics import normalized_mutual_info_score as nmi

    from djc.selection import consensus

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 500)
    noisy = np.where(rng.random(500) < 0.3, rng.integers(0, 5, 500), truth)
    runs = [truth, truth.copy(), noisy, rng.integers(0, 5, 500)]
    c = consensus(runs)
    assert c[0] == pytest.approx((1.0 + nmi(truth, noisy) + nmi(truth, runs[3])) / 3)
    assert c[0] == c[1] > c[2] > c[3]  # agreeing with the ensemble ranks first, the random labelling last
    assert np.isnan(consensus([truth])[0])

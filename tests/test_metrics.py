import math

import numpy as np
import pytest
from sklearn.metrics import f1_score

from djc.metrics import (
    HEALTH_KEYS,
    LABEL_KEYS,
    cluster_acc,
    cluster_health,
    evaluate,
    format_table,
    frequency_groups,
    match_clusters,
)

# Contingency (cluster x class):   c0 c1 c2
#                        cluster 0:  0  2  1
#                        cluster 1:  2  0  0
#                        cluster 2:  0  0  1
# Hungarian: 1->0, 0->1, 2->2 -> 2 + 2 + 1 = 5 correct of 6.
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
Y_PRED = np.array([1, 1, 0, 0, 0, 2])


def test_hand_computed_case():
    assert match_clusters(Y_TRUE, Y_PRED) == {1: 0, 0: 1, 2: 2}
    assert cluster_acc(Y_TRUE, Y_PRED) == pytest.approx(5 / 6)
    m = evaluate(Y_TRUE, Y_PRED, num_clusters=3)
    assert set(m) == set(LABEL_KEYS) | set(HEALTH_KEYS)
    assert m["acc"] == pytest.approx(5 / 6)
    # recalls: c0 2/2, c1 2/2, c2 1/2 -> balanced (1 + 1 + 0.5) / 3 = 5/6
    assert m["balanced_acc"] == pytest.approx(5 / 6)
    # F1 = 2TP / (|pred c| + |true c|): c0 4/4 = 1, c1 4/5 = 0.8 (cluster 0 has 3 samples), c2 2/3
    assert m["macro_f1"] == pytest.approx((1 + 0.8 + 2 / 3) / 3)
    assert m["macro_f1"] == pytest.approx(f1_score(Y_TRUE, [0, 0, 1, 1, 1, 2], average="macro"))
    # health: sizes [3, 2, 1]
    assert (m["min_cluster_size"], m["max_cluster_size"], m["empty_clusters"]) == (1, 3, 0)
    q = np.array([3, 2, 1]) / 6
    assert m["size_entropy"] == pytest.approx(-(q * np.log(q)).sum() / np.log(3))


@pytest.mark.parametrize("seed", range(4))
def test_invariant_to_cluster_permutation(seed):
    rng = np.random.default_rng(seed)
    K, C = 7, 5
    y_true = rng.integers(0, C, 300)
    # mostly right, some noise, two extra clusters
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, K, 300))
    y_true[:20] = -1
    base = evaluate(y_true, y_pred, K)
    perm = rng.permutation(K)
    permuted = evaluate(y_true, perm[y_pred], K)
    assert permuted == pytest.approx(base)
    assert base["acc"] > 0.6


def test_more_clusters_than_classes():
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([0, 0, 2, 1, 1, 3])  # clusters 2 and 3 stay unmatched: their samples are errors
    assert match_clusters(y_true, y_pred) == {0: 0, 1: 1}
    m = evaluate(y_true, y_pred, num_clusters=5)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["balanced_acc"] == pytest.approx(2 / 3)
    # sizes [2, 2, 1, 1, 0]
    assert (m["min_cluster_size"], m["max_cluster_size"], m["empty_clusters"]) == (0, 2, 1)


def test_fewer_clusters_than_classes():
    y_true = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    mapping = match_clusters(y_true, y_pred)
    assert mapping[1] == 2 and mapping[0] in (0, 1) and len(mapping) == 2
    m = evaluate(y_true, y_pred, num_clusters=2)
    assert m["acc"] == pytest.approx(6 / 8)
    # one of classes 0 / 1 has no cluster: recalls (1, 0, 1) in some order
    assert m["balanced_acc"] == pytest.approx(2 / 3)


def test_unlabeled_ignored_in_label_metrics_but_counted_in_health():
    y_true = np.concatenate([Y_TRUE, [-1, -1, -1]])
    y_pred = np.concatenate([Y_PRED, [2, 2, 2]])  # would flip the match if they counted as class 2
    m, ref = evaluate(y_true, y_pred, 3), evaluate(Y_TRUE, Y_PRED, 3)
    for k in LABEL_KEYS:
        assert m[k] == pytest.approx(ref[k]), k
    assert m["max_cluster_size"] == 4  # cluster 2: 1 labelled + 3 unlabeled


def test_no_labels_gives_health_only():
    m = evaluate(np.full(5, -1), np.array([0, 1, 1, 2, 2]), 4)
    assert set(m) == set(HEALTH_KEYS)
    assert m["empty_clusters"] == 1
    assert math.isnan(cluster_acc(np.full(3, -1), np.zeros(3)))


def _ten_class_case():
    # 10 samples per class; class c has k[c] right (cluster c), the rest go to cluster c+1 (mod 10).
    # Every k > 5 so the identity match beats any other (the only non-zero off-diagonal is (c, c+1)).
    k = np.array([10, 9, 8, 8, 7, 7, 6, 6, 6, 6])
    y_true = np.repeat(np.arange(10), 10)
    y_pred = np.concatenate([np.r_[np.full(k[c], c), np.full(10 - k[c], (c + 1) % 10)] for c in range(10)])
    return y_true, y_pred


def test_head_medium_tail_by_training_frequency():
    y_true, y_pred = _ten_class_case()
    # class_counts descending with the label: head 0-2 (0.9), medium 3-6 (0.8+0.7+0.7+0.6)/4 = 0.7, tail 7-9
    m = evaluate(y_true, y_pred, 10, class_counts=np.arange(10, 0, -1) * 50)
    assert (m["head_acc"], m["medium_acc"], m["tail_acc"]) == pytest.approx((0.9, 0.7, 0.6))
    assert m["balanced_acc"] == pytest.approx(0.73)
    # reversed frequencies: head 9, 8, 7 (0.6), medium 6..3 (0.7), tail 2, 1, 0 (0.9)
    m = evaluate(y_true, y_pred, 10, class_counts=np.arange(1, 11) * 50)
    assert (m["head_acc"], m["medium_acc"], m["tail_acc"]) == pytest.approx((0.6, 0.7, 0.9))
    # no counts: y_true frequencies, all 10 -> ties by label -> same as the first case
    m = evaluate(y_true, y_pred, 10)
    assert (m["head_acc"], m["medium_acc"], m["tail_acc"]) == pytest.approx((0.9, 0.7, 0.6))


def test_frequency_group_sizes_and_ties():
    for C, sizes in [(10, (3, 4, 3)), (100, (30, 40, 30)), (20, (6, 8, 6)), (5, (2, 2, 1))]:
        groups = frequency_groups(np.ones(C), None)
        assert tuple(g.size for g in groups) == sizes
    head, medium, tail = frequency_groups(np.array([5, 9, 5, 1, 9, 0, 2, 2, 3, 7]), None)
    assert head.tolist() == [1, 4, 9] and medium.tolist() == [0, 2, 8, 6] and tail.tolist() == [7, 3, 5]


def test_health():
    assert cluster_health(np.repeat(np.arange(4), 25), 4)["size_entropy"] == pytest.approx(1.0)
    h = cluster_health(np.full(100, 2), 4)
    assert h == {"min_cluster_size": 0, "max_cluster_size": 100, "empty_clusters": 3, "size_entropy": 0.0}
    with pytest.raises(ValueError, match="cluster ids"):
        cluster_health(np.array([0, 4]), 4)


def test_format_table():
    rows = {"secu": evaluate(Y_TRUE, Y_PRED, 3), "kmeans-pixels": {"acc": 0.5}}
    text = format_table(rows, keys=("acc", "nmi", "min_cluster_size"))
    lines = text.splitlines()
    assert len(lines) == 4 and "acc" in lines[0] and lines[1].startswith("---")
    assert lines[2].split() == ["secu", "0.833", f"{rows['secu']['nmi']:.3f}", "1"]
    assert lines[3].split() == ["kmeans-pixels", "0.500", "-", "-"]

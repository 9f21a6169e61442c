"""Long-tailed profiles: the published CIFAR-LT totals, the digits profile, and the fixed-seed subsets."""

from __future__ import annotations

import numpy as np
import pytest

from djc.data.longtail import class_counts, longtail_indices
from djc.data.sources import digits


@pytest.mark.parametrize("n_max, C, ratio, total, last", [
    (5000, 10, 100, 12406, 50),  # CIFAR-10-LT, ratio 100 (Cao et al. 2019)
    (5000, 10, 10, 20431, 500),  # CIFAR-10-LT, ratio 10
    (500, 100, 100, 10847, 5),  # CIFAR-100-LT, ratio 100
])
def test_cifar_lt_totals(n_max, C, ratio, total, last):
    counts = class_counts(n_max, C, ratio)
    assert sum(counts) == total
    assert counts[0] == n_max and counts[-1] == last


def test_digits_exp_profile_is_monotone_down_to_max_over_ratio():
    labels = digits("train").labels
    n_max = int(np.bincount(labels).max())
    counts = class_counts(n_max, 10, 10.0)
    assert counts[0] == n_max
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert counts[-1] == n_max // 10


def test_step_profile_and_ratio_one():
    assert class_counts(100, 10, 10, "step") == [100] * 5 + [10] * 5
    assert class_counts(100, 5, 4, "step") == [100, 100, 25, 25, 25]  # head = C // 2 classes
    assert class_counts(7, 1, 5, "step") == [7]
    assert class_counts(100, 4, 1.0) == [100] * 4 == class_counts(100, 4, 1.0, "step")


@pytest.mark.parametrize("args, match", [
    ((100, 10, 0.5), "imbalance_ratio must be >= 1"),
    ((100, 0, 10), "num_classes"),
    ((100, 10, 10, "linear"), "allowed profiles: exp, step"),
    ((5, 10, 10), "smallest class would be empty"),
])
def test_class_counts_errors(args, match):
    with pytest.raises(ValueError, match=match):
        class_counts(*args)


def test_longtail_indices_deterministic_per_class_counts():
    rng = np.random.default_rng(0)
    labels = np.concatenate([rng.permutation(np.repeat(np.arange(5), 40)), [-1] * 7])
    counts = class_counts(40, 5, 8)
    a = longtail_indices(labels, counts, seed=3)
    assert np.array_equal(a, longtail_indices(labels, counts, seed=3))
    assert np.all(np.diff(a) > 0)  # sorted, no duplicates
    assert np.bincount(labels[a], minlength=5).tolist() == counts
    assert not np.array_equal(a, longtail_indices(labels, counts, seed=4))
    # Class 0's draw does not depend on the other classes' sizes.
    b = longtail_indices(labels, [counts[0], 40, 40, 40, 40], seed=3)
    assert np.array_equal(a[labels[a] == 0], b[labels[b] == 0])


def test_longtail_indices_refuses_too_few():
    with pytest.raises(ValueError, match="class 1 has 2 samples, fewer than the 3"):
        longtail_indices(np.array([0, 0, 0, 1, 1]), [3, 3], seed=0)

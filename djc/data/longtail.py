"""Long-tailed class profiles (docs/data.md) and the fixed-seed per-class subsets that realise them.

Class c = 0 is the largest and sizes fall with the label, as in Cao et al.'s (LDAM) CIFAR-LT, so the published
totals are reproduced exactly: CIFAR-10-LT ratio 100 = 12,406 images (5000 -> 50), ratio 10 = 20,431,
CIFAR-100-LT ratio 100 = 10,847 (500 -> 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PROFILES = ("exp", "step")


def _floor(x: float) -> int:
    """floor(x), except that a value within float noise below an integer counts as that integer.

    LDAM's `int(n_max * r ** (c / (C - 1)))` is the reference; snapping only differs from it when the exact
    value is an integer that float rounding put an ulp below (e.g. n_max * (1/ratio) ** 1.0 for n_max / ratio
    whole), where a bare int() would silently drop one image from the class.
    """
    nearest = round(x)
    return int(nearest) if abs(x - nearest) <= 1e-9 * max(1.0, abs(x)) else math.floor(x)


def class_counts(n_max: int, num_classes: int, imbalance_ratio: float, profile: str = "exp") -> list[int]:
    """Images per class, in label order, class 0 the largest (n_max).

    exp:  n_c = floor(n_max * r^(c / (C - 1))), r = 1 / imbalance_ratio; the last class gets floor(n_max / ratio).
    step: the first max(1, C // 2) classes keep n_max, the rest get floor(n_max / ratio) (for odd C the tail is
          the larger half: C = 5 -> 2 head, 3 tail; C = 1 is a single head class).
    A ratio of 1 gives every class n_max in both profiles.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown imbalance profile {profile!r}; allowed profiles: {', '.join(PROFILES)}")
    if not imbalance_ratio >= 1.0:  # also refuses NaN
        raise ValueError(f"imbalance_ratio must be >= 1 (largest / smallest class), got {imbalance_ratio}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    if imbalance_ratio > n_max:
        # floor(n_max / ratio) would be 0: an empty class is not a tail class, it is a missing one.
        raise ValueError(f"imbalance_ratio {imbalance_ratio} exceeds n_max {n_max}: the smallest class would be empty")
    C, r = num_classes, 1.0 / imbalance_ratio
    if C == 1:
        return [n_max]
    if profile == "step":
        head = max(1, C // 2)
        return [n_max if c < head else _floor(n_max * r) for c in range(C)]
    return [_floor(n_max * r ** (c / (C - 1))) for c in range(C)]


def longtail_indices(labels: np.ndarray, counts: Sequence[int], seed: int) -> np.ndarray:
    """Sorted indices (int64) keeping counts[c] samples of each class c.

    Class c's subset comes from its own rng seeded from (seed, c), so it depends only on (seed, c, counts[c])
    and the class's own members, never on the other classes' sizes. Each class keeps a prefix of one fixed
    per-class order, so a larger ratio keeps a subset of a smaller ratio's images. Samples labelled -1
    (unknown) are never kept.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False).ravel()
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if labels.size and labels.max() >= len(counts):
        raise ValueError(f"labels go up to {int(labels.max())} but counts has only {len(counts)} classes")
    keep = []
    for c, n in enumerate(counts):
        if n < 0:
            raise ValueError(f"counts[{c}] = {n} is negative")
        idx = np.flatnonzero(labels == c)
        if len(idx) < n:
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than the {n} the profile asks for")
        keep.append(np.random.default_rng([seed, c]).permutation(idx)[:n])
    return np.sort(np.concatenate(keep)).astype(np.int64) if keep else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------
# ImageNet-LT's shape, generated (djc prepare imagenet-lt-synthetic; docs/data.md)

IMAGENET_LT_SAMPLES, IMAGENET_LT_CLASSES = 115_846, 1000  # Liu et al. 2019's train list
IMAGENET_LT_LARGEST, IMAGENET_LT_SMALLEST = 1280, 5
# Classes with more than 100 images ("many-shot") and with fewer than 20 ("few-shot") in the train list, as
# every ImageNet-LT paper splits its results; the 479 in between are "medium-shot".
IMAGENET_LT_MANY, IMAGENET_LT_FEW = 385, 136
PROFILE_SEED = 1000  # fixed: which label gets which size is part of the profile, not of a prepare's seed


def _imagenet_lt_sorted(v50: float) -> np.ndarray:
    """(1000,) float sizes, largest first: a monotone cubic (PCHIP) in log size through 1280 at rank 0, the
    many / medium and medium / few boundaries (100.5 between ranks 384 and 385, 19.5 between 863 and 864) and
    5 at rank 999, plus `v50` at rank 50, which sets how fast the head falls (and so the total)."""
    from scipy.interpolate import PchipInterpolator

    many, few = IMAGENET_LT_MANY, IMAGENET_LT_FEW
    last = IMAGENET_LT_CLASSES - 1
    knots = [(0, IMAGENET_LT_LARGEST), (50, v50), (many - 0.5, 100.5), (last - few + 0.5, 19.5),
             (last, IMAGENET_LT_SMALLEST)]
    r, v = zip(*knots)
    return np.exp(PchipInterpolator(r, np.log(v))(np.arange(IMAGENET_LT_CLASSES)))


def imagenet_lt_counts() -> list[int]:
    """ImageNet-LT's train profile, GENERATED (the list itself is not bundled): 1000 classes, 115,846 images,
    1280 -> 5, 385 classes above 100 images and 136 below 20, as the list has. Sizes fall smoothly through
    those boundaries (_imagenet_lt_sorted), the head's fall set by a bisection so that the total is exact,
    rounding repaired by one image on as many head classes; then assigned to labels by a fixed permutation
    (the list's labels follow WordNet ids, not sizes). The per-class values are this rule's, not the list's."""
    lo, hi = 101.0, float(IMAGENET_LT_LARGEST)
    for _ in range(60):  # the total grows with the size at rank 50
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if _imagenet_lt_sorted(mid).sum() > IMAGENET_LT_SAMPLES else (mid, hi)
    sizes = np.round(_imagenet_lt_sorted(0.5 * (lo + hi))).astype(np.int64)
    diff = IMAGENET_LT_SAMPLES - int(sizes.sum())  # a few images of rounding
    sizes[1 : 1 + abs(diff)] += np.sign(diff)  # head classes (never the 1280 or a boundary class)
    order = np.random.default_rng(PROFILE_SEED).permutation(IMAGENET_LT_CLASSES)
    counts = np.empty_like(sizes)
    counts[order] = sizes
    return counts.tolist()


def longtail_subset(labels: np.ndarray, num_classes: int, imbalance_ratio: float, seed: int,
                    profile: str = "exp") -> np.ndarray:
    """Sorted indices of the long-tailed subset that `djc prepare --imbalance-ratio` keeps: class_counts(n_max,
    C, ratio, profile) per class, where n_max is the SMALLEST class count, the largest size every class can
    supply, so the profile is realised exactly."""
    n_max = int(np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).min())
    return longtail_indices(labels, class_counts(n_max, num_classes, imbalance_ratio, profile), seed)

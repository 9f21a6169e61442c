"""`djc prepare imagenet-lt-synthetic`: ImageNet-LT's shape without ImageNet, for rehearsing a run at scale on
any machine (docs/data.md).

train: 115,846 images over 1000 classes with ImageNet-LT's generated profile (djc.data.longtail.
imagenet_lt_counts: 1280 -> 5, its many / medium / few split); test: 50 per class (50,000), as ImageNet-LT's
test list. Images are small RGB squares (16 x 16 by default) that carry their class:

  prototype_c   a 4 x 4 RGB grid, each cell ~ U(-1, 1) from rng(seed, c), bilinearly upsampled to size x size
  image         128 + AMPLITUDE prototype_c, rolled by (dy, dx) ~ U{-2..2}^2 (cyclic), plus a brightness offset
                ~ N(0, BRIGHTNESS) and pixel noise ~ N(0, NOISE), clipped to 0..255

Two prototypes differ by ~AMPLITUDE x 0.8 per pixel (RMS), far above the noise, so the classes are there to be
found; the shifts, brightness and noise keep a class from being one point, so neither k-means on pixels nor a
network finds them for free. Everything is drawn from (seed, split) in vectorised blocks: no per-image Python
work besides the PNG encoding of the writer.
"""

from __future__ import annotations

import numpy as np

from djc.data.longtail import IMAGENET_LT_CLASSES, imagenet_lt_counts

AMPLITUDE = 60.0  # grey levels of a prototype's cell at +-1
BRIGHTNESS = 12.0  # std of the per-image brightness offset
NOISE = 24.0  # std of the per-pixel noise
MAX_SHIFT = 2  # pixels a prototype is rolled by, each way
GRID = 4  # cells per side of a prototype
TEST_PER_CLASS = 50  # ImageNet-LT's balanced test list
BLOCK = 8192  # images drawn at once: 8192 x 16 x 16 x 3 float32 = 25 MB


def prototypes(num_classes: int, size: int, seed: int) -> np.ndarray:
    """(C, size, size, 3) float32 class patterns in [-1, 1]: 4 x 4 RGB grids upsampled bilinearly."""
    grid = np.random.default_rng([seed, 0]).uniform(-1.0, 1.0, (num_classes, GRID, GRID, 3)).astype(np.float32)
    # Bilinear weights from the size x size pixel centres to the grid cells (edges clamped): (size, GRID).
    pos = np.clip((np.arange(size) + 0.5) * GRID / size - 0.5, 0.0, GRID - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, GRID - 1)
    w = np.zeros((size, GRID), np.float32)
    np.add.at(w, (np.arange(size), lo), 1.0 - (pos - lo))
    np.add.at(w, (np.arange(size), hi), pos - lo)
    return np.einsum("yi,xj,cijk->cyxk", w, w, grid)


def split_labels(split: str, seed: int) -> np.ndarray:
    """(n,) int64 labels of a split, in a seeded order: train follows the ImageNet-LT profile, test is balanced."""
    counts = imagenet_lt_counts() if split == "train" else [TEST_PER_CLASS] * IMAGENET_LT_CLASSES
    labels = np.repeat(np.arange(IMAGENET_LT_CLASSES, dtype=np.int64), counts)
    return labels[np.random.default_rng([seed, 1, split == "test"]).permutation(len(labels))]


def images(labels: np.ndarray, size: int, seed: int, split: str) -> np.ndarray:
    """(n, size, size, 3) uint8 images of the given labels (module docstring), drawn in blocks of BLOCK."""
    protos = prototypes(IMAGENET_LT_CLASSES, size, seed)
    out = np.empty((len(labels), size, size, 3), np.uint8)
    rng = np.random.default_rng([seed, 2, split == "test"])
    grid = np.arange(size)
    for lo in range(0, len(labels), BLOCK):
        y = labels[lo : lo + BLOCK]
        n = len(y)
        dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, (2, n, 1))
        rows, cols = (grid[None] + dy) % size, (grid[None] + dx) % size  # (n, size) each
        x = protos[y[:, None, None], rows[:, :, None], cols[:, None, :]]  # (n, size, size, 3) rolled
        x = 128.0 + AMPLITUDE * x + rng.normal(0.0, BRIGHTNESS, (n, 1, 1, 1)).astype(np.float32)
        x += rng.normal(0.0, NOISE, x.shape).astype(np.float32)
        out[lo : lo + n] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out


def imagenet_lt_synthetic(split: str, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images (n, size, size, 3) uint8, labels (n,), class names) of the train or test split."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: imagenet-lt-synthetic has 'train' and 'test'")
    if size < 8:
        raise ValueError(f"--size {size} is too small: the 4 x 4 class patterns need at least 8 pixels a side")
    labels = split_labels(split, seed)
    return images(labels, size, seed, split), labels, [f"class{c:04d}" for c in range(IMAGENET_LT_CLASSES)]

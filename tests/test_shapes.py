"""The shapes benchmark: deterministic rendering, class counts through `djc prepare`, and pixels that do not
reveal the classes (while the same shapes without their nuisances do)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from djc import metrics
from djc.data import shapes
from djc.data.images import read_images
from djc.data.longtail import class_counts
from djc.data.prepare import prepare
from djc.data.shards import read_manifest
from djc.methods.kmeans import assign, kmeans


def _kmeans_pixels_balanced_acc(images: np.ndarray, labels: np.ndarray) -> float:
    """k-means on pixels as the run's baseline does it: per-channel standardised, K = classes, 3 restarts."""
    x = torch.from_numpy(images).float().div(255)  # (n, H, W, 3)
    x = ((x - x.mean(dim=(0, 1, 2))) / x.std(dim=(0, 1, 2))).flatten(1)
    k = len(shapes.CLASSES)
    pred = assign(x, kmeans(x, k, iters=50, restarts=3, seed=0).centers)[0].numpy()
    return metrics.evaluate(labels, pred, k)["balanced_acc"]


def test_rendering_is_deterministic_in_seed_and_split():
    a, ya = shapes.generate("test", seed=0, per_class=30)
    b, yb = shapes.generate("test", seed=0, per_class=30)
    assert a.shape == (300, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert np.array_equal(ya, np.repeat(np.arange(10), 30))
    c, _ = shapes.generate("test", seed=1, per_class=30)
    d, _ = shapes.generate("train", seed=0, per_class=30)
    for other in (c, d):  # another seed or split: other images, not one of them repeated
        assert not (a[:, None] == other[None]).all(axis=(2, 3, 4)).any()
    # Every image is a picture, not a flat field: the object and the background differ.
    assert (a.reshape(300, -1).std(axis=1) > 10).all()


def test_every_class_renders_its_shape_where_it_says():
    """Without nuisances (grey object, black background, centred, upright, no clutter or noise), each class's
    mask is its shape: a few pixels that only that shape covers or leaves empty."""
    p = shapes._draw_params(np.random.default_rng(0), 10)
    p.update(radius=np.full(10, 12, np.float32), log_aspect=np.zeros(10, np.float32),
             angle=np.zeros(10, np.float32), cx=np.full(10, 16, np.float32), cy=np.full(10, 16, np.float32),
             bg_a=np.zeros((10, 3), np.float32), bg_b=np.zeros((10, 3), np.float32),
             bg_texture=np.zeros(10, np.float32), obj_shade=np.zeros(10, np.float32),
             obj_rgb=np.ones((10, 3), np.float32), clutter=np.zeros(10, np.int64), noise=np.zeros(10, np.float32))
    img = shapes.render(np.arange(10), p, np.random.default_rng(0))[..., 0]  # (10, 32, 32), objects white
    on = {name: img[k] > 127 for k, name in enumerate(shapes.CLASSES)}
    assert on["disc"][16, 16] and not on["ring"][16, 16] and not on["crescent"][16, 16]
    assert on["ring"][16, 16 + 8] and on["disc"][16, 16 + 8]
    assert on["plus"][16, 16 + 10] and not on["plus"][16 + 8, 16 + 8] and on["square"][16 + 7, 16 + 7]
    assert on["triangle"][16 - 10, 16] and not on["triangle"][16 + 8, 16 + 8]  # apex up, base at y = 22
    assert on["star"][16 + 9, 16] and not on["star"][16 - 7, 16]  # a point down, a notch up
    assert on["dots"][16 + 7, 16] and not on["dots"][16, 16]  # a dot at the bottom corner, none in the middle
    # The textures fill a disc's silhouette with half of its area.
    for name in ("stripes", "checker"):
        inside = np.hypot(*np.mgrid[:32, :32] + 0.5 - 16) < 9
        assert 0.35 < on[name][inside].mean() < 0.65, name
    assert 0.9 < on["disc"][inside].mean()


@pytest.mark.slow
def test_prepare_realises_the_long_tail_and_a_balanced_test_split(tmp_path):
    train = prepare("shapes", str(tmp_path / "train"), imbalance_ratio=10, progress=False)
    assert list(train.class_counts) == class_counts(2000, 10, 10) and train.num_samples == 8169
    assert list(train.class_names) == list(shapes.CLASSES) and tuple(train.image_shape) == (32, 32, 3)
    # The in-memory split the probes and tests use holds the same images as the prepared one (in another order).
    written = read_images(train, np.arange(train.num_samples))
    images, labels = shapes.longtail(10)
    assert np.bincount(labels).tolist() == list(train.class_counts)
    assert sorted(im.tobytes() for im in written.values()) == sorted(im.tobytes() for im in images)
    test = prepare("shapes", str(tmp_path / "test"), split="test", progress=False)
    assert list(test.class_counts) == [200] * 10
    assert read_manifest(str(tmp_path / "test")).provenance["render_seed"] == 0


@pytest.mark.slow
def test_kmeans_on_pixels_stays_near_chance_but_finds_the_shapes_without_nuisances():
    images, labels = shapes.generate("test")  # the balanced test split, 2,000 images
    assert _kmeans_pixels_balanced_acc(images, labels) < 0.25
    # The same shapes with colour, position, size, rotation, clutter and noise fixed: pixels separate them,
    # so the low number above measures the nuisances, not a broken pipeline.
    n = len(labels)
    p = shapes._draw_params(np.random.default_rng(0), n)
    p.update(radius=np.full(n, 10, np.float32), angle=np.zeros(n, np.float32), cx=np.full(n, 16, np.float32),
             cy=np.full(n, 16, np.float32), bg_a=np.zeros((n, 3), np.float32), bg_b=np.zeros((n, 3), np.float32),
             obj_rgb=np.ones((n, 3), np.float32), clutter=np.zeros(n, np.int64), noise=np.zeros(n, np.float32))
    plain = shapes.render(labels, p, np.random.default_rng(0))
    assert _kmeans_pixels_balanced_acc(plain, labels) > 0.6

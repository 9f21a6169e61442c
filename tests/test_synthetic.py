"""`djc prepare imagenet-lt-synthetic`: ImageNet-LT's generated class profile and images that carry their class."""

from __future__ import annotations

import time

import numpy as np
import pytest

from djc import cli
from djc.data import longtail, synthetic
from djc.data.shards import read_manifest


def test_the_profile_has_imagenet_lts_published_shape():
    c = np.array(longtail.imagenet_lt_counts())
    assert c.size == 1000 and c.sum() == 115_846 and c.max() == 1280 and c.min() == 5
    # many (> 100), medium (20..100) and few (< 20) shots, as the ImageNet-LT papers count them
    assert ((c > 100).sum(), ((c >= 20) & (c <= 100)).sum(), (c < 20).sum()) == (385, 479, 136)
    assert not np.all(np.diff(c) <= 0)  # labels are not sorted by size
    assert longtail.imagenet_lt_counts() == c.tolist()  # a fixed profile


def test_images_carry_their_class_and_are_reproducible():
    labels = synthetic.split_labels("test", seed=0)
    assert np.bincount(labels).tolist() == [50] * 1000
    y = labels[:3000]
    x = synthetic.images(y, 16, seed=0, split="test")
    assert x.shape == (3000, 16, 16, 3) and x.dtype == np.uint8
    assert np.array_equal(x, synthetic.images(y, 16, seed=0, split="test"))
    # The nearest class pattern names the class for most images, though shifts, brightness and noise keep
    # the images of one class apart: signal, not a lookup table, and not noise.
    protos = (128 + synthetic.AMPLITUDE * synthetic.prototypes(1000, 16, 0)).reshape(1000, -1)
    flat = x.reshape(len(y), -1).astype(np.float32)
    d = (flat**2).sum(1)[:, None] - 2 * flat @ protos.T + (protos**2).sum(1)[None]
    hit = (d.argmin(1) == y).mean()
    assert 0.5 < hit < 0.99, hit
    same = y[:, None] == y[None, :100]
    spread = np.abs(flat[:, None] - flat[None, :100]).mean(-1)  # (3000, 100) mean pixel distance
    assert spread[same & (spread > 0)].mean() < 0.9 * spread[~same].mean()  # measured 0.86


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert cli.main(["prepare", "imagenet-lt-synthetic", "--out", out, "--imbalance-ratio", "10"]) == 2
    assert "profile already" in capsys.readouterr().err
    assert cli.main(["prepare", "imagenet-lt-synthetic", "--out", out, "--size", "4"]) == 2
    assert "--size 4 is too small" in capsys.readouterr().err


@pytest.mark.slow
def test_prepare_writes_the_train_split(tmp_path, capsys):
    t0 = time.time()
    out = tmp_path / "train"
    assert cli.main(["prepare", "imagenet-lt-synthetic", "--out", str(out)]) == 0
    seconds = time.time() - t0
    assert "1000 classes, 1280 -> 5 images" in capsys.readouterr().out
    m = read_manifest(str(out))
    assert list(m.class_counts) == longtail.imagenet_lt_counts() and m.num_samples == 115_846
    assert m.image_shape == (16, 16, 3) and m.provenance["profile"] == "imagenet-lt (generated)"
    assert m.provenance["imbalance_ratio"] == 256.0
    print(f"[test] djc prepare imagenet-lt-synthetic: {seconds:.0f} s")

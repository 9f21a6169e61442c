"""Cluster galleries and maps without training: the page plan at K = 1000, the rows' members, images read by
index, and pages that stay small whatever K is."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from djc import embedmap, gallery
from djc.data.images import read_images
from djc.data.shards import read_manifest
from djc.data.writer import write_dataset


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """2,500 16x16 RGB images whose colour encodes their row, in shards of 1,000 and row groups of 100."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2500, 16, 16, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(2500) % 256  # a fingerprint per image
    url = str(tmp_path_factory.mktemp("rgb") / "ds")
    write_dataset(url, list(images), rng.integers(0, 5, 2500), name="rgb", class_names=list("abcde"),
                  provenance={}, rows_per_shard=1000, rows_per_group=100)
    return url


def test_images_are_read_by_index_from_the_row_groups_that_hold_them(rgb):
    from djc.data.stream import ShardStream

    m = read_manifest(rgb)
    stream = ShardStream(m, batch_size=2500, shuffle=False)
    stream.set_epoch(0)
    batch = next(iter(stream))
    want = np.array([0, 99, 100, 999, 1000, 2499, 1234])
    got = read_images(m, want)
    for i in want.tolist():
        row = int(np.flatnonzero(batch["index"].numpy() == i)[0])
        np.testing.assert_array_equal(got[i], batch["image"][row].permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="outside the dataset"):
        read_images(m, np.array([2500]))


def test_the_page_plan_at_k_1000_is_four_pages_of_the_largest_and_a_sample_down_to_the_smallest():
    sizes = np.random.default_rng(0).zipf(1.5, 1000).clip(1, 500)
    sizes[7] = 0  # an empty cluster is never shown
    plan = gallery.plan_pages(sizes, pages=4, per_page=50)
    assert [name for name, _ in plan] == ["p1", "p2", "p3", "p4", "sample"]
    shown = np.concatenate([ks for _, ks in plan])
    assert len(shown) == 250 and len(set(shown.tolist())) == 250 and 7 not in shown
    largest = np.concatenate([ks for name, ks in plan if name != "sample"])
    assert (np.diff(sizes[largest]) <= 0).all()  # largest first
    order = np.argsort(-sizes, kind="stable")
    assert plan[-1][1][-1] == order[sizes[order] > 0][-1]  # the sample reaches the smallest used cluster
    assert [n for n, _ in gallery.plan_pages(np.array([5, 3, 0, 9]), 4, 50)] == ["p1"]


def test_a_row_shows_its_most_and_least_confident_members_once_each():
    cluster = np.array([0] * 20 + [1] * 3)
    confidence = np.linspace(0, 1, 23)
    top, bottom = gallery.members(cluster, confidence, 0, images=8)
    assert (np.diff(confidence[top]) < 0).all() and (np.diff(confidence[bottom]) < 0).all()
    assert top.tolist() == list(range(19, 11, -1)) and bottom.tolist() == list(range(7, -1, -1))
    top, bottom = gallery.members(cluster, confidence, 1, images=8)  # a small cluster: all of it, no repeats
    assert top.tolist() == [22, 21] and bottom.tolist() == [20]


def test_galleries_at_k_1000_are_pages_that_open_fast(rgb, tmp_path):
    rng = np.random.default_rng(1)
    cluster = rng.zipf(1.3, 2500) % 1000  # long-tailed sizes over 1,000 clusters
    t0 = time.perf_counter()
    urls = gallery.write_gallery(str(tmp_path), "train", read_manifest(rgb), np.arange(2500), cluster,
                                 rng.random(2500), rng.integers(0, 5, 2500))
    seconds = time.perf_counter() - t0
    assert [u.rsplit("_", 1)[1] for u in urls] == ["p1.png", "p2.png", "p3.png", "p4.png", "sample.png"]
    for u in urls:
        w, h = Image.open(u).size
        assert h <= gallery.HEADER + 50 * (32 + 2 * gallery.PAD) and w < 1000  # 16 px images shown at 32
    print(f"5 gallery pages of K=1000 in {seconds:.1f} s; largest page {max(map(_kb, urls)):.0f} KB")


def _kb(url: str) -> float:
    import os

    return os.path.getsize(url) / 1024


def test_a_map_of_many_clusters_is_drawn_with_and_without_labels(tmp_path):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(600, 16))
    xy = embedmap.project(z, "pca", 0)
    assert xy.shape == (600, 2)
    idx = np.arange(600)
    embedmap.plot_map(str(tmp_path / "a.png"), xy[:, 0], xy[:, 1], idx, idx, rng.integers(0, 300, 600),
                      rng.integers(0, 10, 600), title="t")
    embedmap.plot_map(str(tmp_path / "b.png"), xy[:, 0], xy[:, 1], idx, idx, rng.integers(0, 300, 600),
                      np.full(600, -1), title="t")
    assert Image.open(tmp_path / "a.png").size == (1300, 600) and Image.open(tmp_path / "b.png").size == (650, 600)

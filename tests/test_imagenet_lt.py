"""`djc prepare imagenet-lt` on a generated miniature ImageNet tree and split lists in the published format."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from djc import cli
from djc.data.imagenet_lt import read_split_list, square_jpeg
from djc.data.prepare import dataset_exists
from djc.data.shards import decode_array, read_manifest
from djc.data.stream import ShardStream

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]
COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 40)]  # one per class: labels follow pixels
TRAIN_COUNTS = [12, 7, 4, 2]  # a long tail, 6:1


def _image(path: Path, colour, size, rng, mode: str = "RGB", fmt: str = "JPEG") -> None:
    w, h = size
    a = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(a)
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/train/<wnid>/<wnid>_<i>.JPEG (one more per class than the list takes, as ImageNet-LT samples a
    subset), root/val/<wnid>/ILSVRC2012_val_<i>.JPEG, and ImageNet_LT_{train,test}.txt."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    train, test = [], []
    for c, (wnid, colour) in enumerate(zip(WNIDS, COLOURS)):
        for i in range(TRAIN_COUNTS[c] + 1):
            rel = f"train/{wnid}/{wnid}_{i}.JPEG"
            size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))  # every aspect, some below 24 px
            # ImageNet's oddities: a grayscale JPEG, a CMYK JPEG, a PNG named .JPEG
            kind = {(0, 0): ("L", "JPEG"), (0, 1): ("CMYK", "JPEG"), (1, 0): ("RGB", "PNG")}.get((c, i), ("RGB", "JPEG"))
            _image(root / rel, colour, size, rng, *kind)
            if i < TRAIN_COUNTS[c]:
                train.append(f"{rel} {c}")
        for i in range(3):
            rel = f"val/{wnid}/ILSVRC2012_val_{c * 3 + i:08d}.JPEG"
            _image(root / rel, colour, (40, 30), rng)
            test.append(f"{rel} {c}")
    (root / "ImageNet_LT_train.txt").write_text("\n".join(train[::-1]) + "\n")  # list order is not class order
    (root / "ImageNet_LT_test.txt").write_text("\n".join(test) + "\n")
    return root


def _prepare(root: Path, out: Path | str, *extra: str, split: str = "train") -> int:
    return cli.main(["prepare", "imagenet-lt", "--root", str(root), "--split-file",
                     str(root / f"ImageNet_LT_{split}.txt"), "--out", str(out), "--size", "24",
                     "--rows-per-shard", "4", *extra])


def _stamps(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*.parquet"))}


def test_split_list_classes_and_square_resize(tree):
    lst = read_split_list(str(tree / "ImageNet_LT_train.txt"))
    assert lst.class_names == WNIDS and np.bincount(lst.labels).tolist() == TRAIN_COUNTS
    wide = Image.new("RGB", (90, 30), (10, 10, 10))
    wide.paste((200, 0, 0), (30, 0, 60, 30))  # the centre third is red: the centre crop keeps exactly it
    buf = __import__("io").BytesIO()
    wide.save(buf, format="PNG")
    a = decode_array(square_jpeg(buf.getvalue(), 16, 95))
    assert a.shape == (16, 16, 3) and abs(int(a[..., 0].mean()) - 200) < 12 and a[..., 1].mean() < 12


def test_prepare_reproduces_the_list_and_resumes_without_rewriting_shards(tree, tmp_path, capsys):
    out = tmp_path / "lt"
    # An interruption after 3 of the 7 shards (25 images, 4 per shard): shards and receipts, no manifest.
    assert _prepare(tree, out, "--workers", "2", "--max-shards", "3") == 0
    assert "run the same command again" in capsys.readouterr().out
    assert not dataset_exists(str(out)) and len(list((out / "_prepare").glob("shard-*.json"))) == 3
    first = _stamps(out)
    assert len(first) == 3
    # Another plan at the same URL is refused before anything is written.
    assert _prepare(tree, out, "--workers", "2", "--size", "32") == 2
    assert "different plan" in capsys.readouterr().err and _stamps(out) == first

    (out / "shard-00005.parquet.tmp-0dead0").write_bytes(b"half a shard")  # a write cut by a kill
    assert _prepare(tree, out, "--workers", "2") == 0
    after = _stamps(out)
    assert not list(out.glob("*.tmp-*"))
    assert len(after) == 7 and {k: after[k] for k in first} == first  # same inode and mtime: never rewritten
    assert not (out / "_prepare").exists()

    m = read_manifest(str(out))
    assert list(m.class_counts) == TRAIN_COUNTS and m.num_samples == sum(TRAIN_COUNTS)
    assert list(m.class_names) == WNIDS and m.image_shape == (24, 24, 3) and m.image.encoding == "jpeg"
    assert m.provenance["split"] == "train" and m.provenance["imbalance_ratio"] == 6.0
    stream = ShardStream(m, batch_size=8, shuffle=False)
    stream.set_epoch(0)
    index, labels, colour_ok = [], [], []
    for batch in stream:
        index += batch["index"].tolist()
        labels += batch["label"].tolist()
        rgb = batch["image"].float().mean(dim=(2, 3))  # (B, 3)
        for y, c in zip(batch["label"].tolist(), rgb):
            expect = np.array(COLOURS[y], dtype=float)
            if WNIDS[y] == WNIDS[0]:  # class 0 holds the grayscale image
                expect = np.full(3, expect @ [0.299, 0.587, 0.114]) if abs(c[0] - c[1]) < 5 else expect
            colour_ok.append(np.abs(c.numpy() - expect).max() < 25)
    assert sorted(index) == list(range(m.num_samples))
    assert collections.Counter(labels) == dict(enumerate(TRAIN_COUNTS)) and all(colour_ok)

    # The balanced test list (val/ folder), in one process, to another file system.
    assert _prepare(tree, "memory://djc-test/imagenet-lt-test", "--workers", "1", split="test") == 0
    t = read_manifest("memory://djc-test/imagenet-lt-test")
    assert list(t.class_counts) == [3, 3, 3, 3] and t.provenance["split"] == "test"
    fs = fsspec.filesystem("memory")
    assert fs.exists("/djc-test/imagenet-lt-test/manifest.json") and not fs.exists("/djc-test/imagenet-lt-test/_prepare")


def test_bad_lists_fail_naming_the_file(tree, tmp_path, capsys):
    bad = tmp_path / "ImageNet_LT_train.txt"
    lines = (tree / "ImageNet_LT_train.txt").read_text().splitlines()
    bad.write_text("\n".join([lines[0], "train/n01440764/no_label.JPEG"]) + "\n")
    args = ["prepare", "imagenet-lt", "--root", str(tree), "--out", str(tmp_path / "o"), "--split-file", str(bad)]
    assert cli.main(args) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    bad.write_text(lines[0] + "\ntrain/n01440764/missing.JPEG 0\n")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "missing.JPEG" in err and "not found" in err and not os.path.exists(tmp_path / "o")

"""The dataset format (docs/data.md): round trips, manifest fields, clear errors, and the sources behind it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import uuid

import fsspec
import numpy as np
import pytest
from PIL import Image

from djc.data.longtail import class_counts
from djc.data.prepare import dataset_exists, prepare
from djc.data.shards import CorruptDataError, DatasetError, decode_image, read_manifest, verify_checksums
from djc.data.sources import cifar, digits, folder
from djc.data.stream import ShardStream
from djc.data.writer import write_dataset
from tests.damage import with_bad_image

N, C = 300, 4


def make_images(n: int = N, shape: tuple[int, int, int] = (5, 6, 3), seed: int = 0) -> np.ndarray:
    """Random uint8 images whose first two pixel values spell their own id, so a read-back image names itself."""
    x = np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)
    x.reshape(n, -1)[:, 0], x.reshape(n, -1)[:, 1] = np.arange(n) // 256, np.arange(n) % 256
    return x


def image_id(img) -> int:  # img: (C, H, W) tensor
    flat = img.permute(1, 2, 0).reshape(-1)
    return int(flat[0]) * 256 + int(flat[1])


@pytest.fixture
def data():
    x = make_images()
    y = np.random.default_rng(1).integers(0, C, size=N)
    y[:5] = -1  # a few unlabeled samples
    return x, y


def write(url, x, y, **kw):
    kw = {"rows_per_shard": 128, "rows_per_group": 32, **kw}
    return write_dataset(url, list(x), y, name="toy", class_names=[f"c{i}" for i in range(C)],
                         provenance={"source": "test", "seed": 0}, **kw)


def read_all(url_or_manifest, **kw) -> list[dict]:
    return list(ShardStream(url_or_manifest, batch_size=64, shuffle=False, **kw))


def test_round_trip_every_row(tmp_path, data):
    x, y = data
    write(str(tmp_path / "ds"), x, y)
    batches = read_all(str(tmp_path / "ds"))
    index = np.concatenate([b["index"].numpy() for b in batches])
    assert sorted(index.tolist()) == list(range(N))
    ids = []
    for b in batches:
        for i, lab, img in zip(b["index"], b["label"], b["image"]):
            k = image_id(img)
            assert np.array_equal(img.permute(1, 2, 0).numpy(), x[k])  # byte-identical pixels
            assert lab == y[k]
            ids.append(k)
    assert sorted(ids) == list(range(N))
    assert ids != list(range(N))  # the writer shuffled once: shards are not in source (class) order
    # The label of an index is stable: a second read agrees.
    again = {int(i): int(lab) for b in read_all(str(tmp_path / "ds")) for i, lab in zip(b["index"], b["label"])}
    assert again == {int(i): int(lab) for b in batches for i, lab in zip(b["index"], b["label"])}


def test_manifest_fields(tmp_path, data):
    x, y = data
    url = str(tmp_path / "ds")
    m = write(url, x, y)
    r = read_manifest(url)
    assert r == m
    assert r.format == "djc-dataset/1" and r.num_samples == N and r.num_classes == C
    assert list(r.class_counts) == np.bincount(y[y >= 0], minlength=C).tolist()
    assert r.image.shape == (5, 6, 3) and r.image_shape == (5, 6, 3) and r.image.encoding == "png"
    px = x.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(r.mean, px.mean(0), atol=1e-6)
    np.testing.assert_allclose(r.std, px.std(0), atol=1e-6)
    assert [s.num_samples for s in r.shards] == [128, 128, 44]
    assert r.shards[0].row_groups == (32, 32, 32, 32) and r.shards[2].row_groups == (32, 12)
    for s in r.shards:
        raw = (tmp_path / "ds" / s.path).read_bytes()
        assert s.sha256 == hashlib.sha256(raw).hexdigest() and s.bytes == len(raw)
    verify_checksums(r)
    assert r.provenance == {"source": "test", "seed": 0} and r.created_by.startswith("djc ")
    assert sorted(os.listdir(tmp_path / "ds")) == ["manifest.json"] + [s.path for s in r.shards]  # no temp left


def test_shards_without_manifest_are_not_a_dataset(tmp_path, data):
    url = str(tmp_path / "ds")
    write(url, *data)
    os.remove(tmp_path / "ds" / "manifest.json")  # what a writer that died before its last step leaves
    with pytest.raises(DatasetError, match=f"no dataset at {url}: manifest.json not found"):
        read_manifest(url)
    assert not dataset_exists(url)


def test_overwrite_is_refused_unless_asked(tmp_path, data):
    url = str(tmp_path / "ds")
    write(url, *data)
    with pytest.raises(DatasetError, match="already exists.*overwrite=True"):
        write(url, *data)
    m = write(url, data[0][:40], data[1][:40], overwrite=True)
    assert read_manifest(url).num_samples == 40 and len(m.shards) == 1
    assert sorted(os.listdir(tmp_path / "ds")) == ["manifest.json", "shard-00000.parquet"]  # old shards gone


def test_malformed_manifest(tmp_path, data):
    url = str(tmp_path / "ds")
    write(url, *data)
    path = tmp_path / "ds" / "manifest.json"
    d = json.loads(path.read_text())
    path.write_text(json.dumps({**d, "format": "djc-dataset/9"}))
    with pytest.raises(DatasetError, match=r"manifest.json has format 'djc-dataset/9'"):
        read_manifest(url)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=r"ds/manifest.json is not valid JSON"):
        read_manifest(url)


def test_missing_shard_fails_at_startup_naming_it(tmp_path, data):
    url = str(tmp_path / "ds")
    write(url, *data)
    os.remove(tmp_path / "ds" / "shard-00001.parquet")
    with pytest.raises(DatasetError, match=f"shard {url}/shard-00001.parquet .* is missing"):
        read_manifest(url)
    with pytest.raises(DatasetError, match="shard-00001.parquet"):
        ShardStream(url, batch_size=8)


def test_truncated_shard_is_corrupt_data_naming_it(tmp_path, data):
    url = str(tmp_path / "ds")
    write(url, *data)
    p = tmp_path / "ds" / "shard-00002.parquet"
    whole = p.read_bytes()
    p.write_bytes(whole[: len(whole) // 2])
    # The manifest's listing already shows the size, before any worker starts.
    with pytest.raises(CorruptDataError, match=f"shard {url}/shard-00002.parquet is {len(whole) // 2} bytes, but "
                                               f"manifest.json says {len(whole)}: it was truncated"):
        read_manifest(url)
    # Garbage of the right size passes the listing: reading names the shard, and the cache checks the sha256.
    p.write_bytes(whole[: len(whole) // 2] + bytes(len(whole) - len(whole) // 2))
    with pytest.raises(CorruptDataError, match=f"shard {url}/shard-00002.parquet"):
        read_all(url)
    with pytest.raises(CorruptDataError, match="shard-00002.parquet does not match its sha256"):
        read_all(url, cache_dir=str(tmp_path / "cache"))  # the cached copy is checked before use
    with pytest.raises(CorruptDataError, match="shard-00002.parquet"):
        verify_checksums(read_manifest(url))


def test_undecodable_image_names_shard_and_row_or_is_skipped(tmp_path, data):
    url = str(tmp_path / "ds")
    write(url, *data)
    bad_index = with_bad_image(url, 1, 37)
    with pytest.raises(CorruptDataError, match=f"shard {url}/shard-00001.parquet row 37 \\(index {bad_index}\\)"):
        read_all(url)
    batches = read_all(url, on_corrupt="skip")
    got = [int(i) for b in batches for i in b["index"]]
    assert sorted(got) == [i for i in range(N) if i != bad_index]
    assert sum(b["skipped"] for b in batches) == 1


def test_memory_url(data):
    url = f"memory://djc-test-{uuid.uuid4().hex[:8]}/ds"
    try:
        write(url, *data, rows_per_shard=100)
        assert dataset_exists(url) and read_manifest(url).num_samples == N
        got = sorted(int(i) for b in read_all(url) for i in b["index"])
        assert got == list(range(N))
    finally:
        fs, root = fsspec.core.url_to_fs(url)
        fs.rm(root.rsplit("/", 1)[0], recursive=True)


def test_decode_image_modes():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (1, 3, 4)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((3, 4, 4), np.uint8), "RGBA").save(buf, format="PNG")
    assert decode_image(buf.getvalue()).shape == (3, 3, 4)
    with pytest.raises(CorruptDataError):
        decode_image(b"not an image")


# --- sources ----------------------------------------------------------------------------------------------


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def test_cifar_reader_on_a_miniature_release(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3).tolist()
        # The release's layout: (n, 3072) rows of the R, G, B planes, keys as bytes (pickled by Python 2).
        _pickle(base / name, {b"data": imgs.transpose(0, 3, 1, 2).reshape(3, -1), b"labels": labels})
        batches.append((imgs, labels))
    _pickle(base / "batches.meta", {b"label_names": [f"n{i}".encode() for i in range(10)]})
    for root in (tmp_path, base):  # the extracted folder or its parent
        src = cifar(str(root), 10, "train")
        assert np.array_equal(src.images, np.concatenate([b[0] for b in batches[:5]]))
        assert src.labels.tolist() == sum((b[1] for b in batches[:5]), [])
        assert src.class_names == [f"n{i}" for i in range(10)]
    assert np.array_equal(cifar(str(tmp_path), 10, "test").images, batches[5][0])

    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    imgs = rng.integers(0, 256, size=(2, 32, 32, 3), dtype=np.uint8)
    _pickle(c100 / "train", {b"data": imgs.transpose(0, 3, 1, 2).reshape(2, -1), b"fine_labels": [7, 99],
                             b"coarse_labels": [1, 2]})
    _pickle(c100 / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    src = cifar(str(tmp_path / "c100"), 100, "train")
    assert np.array_equal(src.images, imgs) and src.labels.tolist() == [7, 99] and src.class_names[99] == "f99"
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/\{test, meta\}"):
        cifar(str(tmp_path / "c100"), 100, "test")


def _save(path, arr, fmt):
    Image.fromarray(arr).save(path, format=fmt)
    return path.read_bytes()


def test_folder_source_with_classes_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    a = [rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8) for _ in range(4)]
    (tmp_path / "cls" / "zebra").mkdir(parents=True)
    (tmp_path / "cls" / "ant" / "sub").mkdir(parents=True)
    png = _save(tmp_path / "cls" / "ant" / "b.png", a[0], "PNG")
    jpg = _save(tmp_path / "cls" / "ant" / "sub" / "c.JPG", a[1], "JPEG")
    _save(tmp_path / "cls" / "zebra" / "a.bmp", a[2], "BMP")
    (tmp_path / "cls" / "zebra" / "notes.txt").write_text("not an image")
    src = folder(str(tmp_path / "cls"))
    assert src.class_names == ["ant", "zebra"] and src.labels.tolist() == [0, 0, 1]
    assert src.images[0] == png and src.images[1] == jpg  # original bytes kept
    assert src.images[2].startswith(b"\x89PNG")  # BMP re-encoded, losslessly
    assert np.array_equal(decode_image(src.images[2]).permute(1, 2, 0).numpy(), a[2])

    (tmp_path / "flat").mkdir()
    _save(tmp_path / "flat" / "x.png", a[3], "PNG")
    _save(tmp_path / "flat" / "y.webp", a[0], "WEBP")
    flat = folder(str(tmp_path / "flat"))
    assert flat.labels.tolist() == [-1, -1] and flat.class_names == [] and len(flat.images) == 2

    m = prepare("folder", str(tmp_path / "ds"), root=str(tmp_path / "cls"), progress=False)
    assert m.class_counts == (2, 1) and m.image.encoding == "mixed" and m.image_shape == (4, 5, 3)
    m = prepare("folder", str(tmp_path / "flat_ds"), root=str(tmp_path / "flat"), progress=False)
    assert m.num_classes == 0 and m.class_counts == () and m.num_samples == 2


def test_prepare_digits_long_tailed(tmp_path):
    url = str(tmp_path / "digits_lt10")
    m = prepare("digits", url, imbalance_ratio=10, seed=0, progress=False)
    n_min = int(np.bincount(digits("train").labels).min())  # the largest size every class can supply
    assert list(m.class_counts) == class_counts(n_min, 10, 10) and m.class_counts[-1] == n_min // 10
    assert m.num_samples == sum(m.class_counts) and m.image_shape == (8, 8, 1)
    assert m.provenance["imbalance_ratio"] == 10 and m.provenance["profile"] == "exp"
    assert m.provenance["split"] == "train" and m.provenance["test_fraction"] == 0.2
    assert dataset_exists(url) and read_manifest(url) == m
    test = prepare("digits", str(tmp_path / "test"), split="test", progress=False)
    assert min(test.class_counts) >= 35 and sum(test.class_counts) == len(digits("test").labels)

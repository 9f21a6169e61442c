"""`djc prepare imagenet-lt`: an ImageNet folder and a split list -> a dataset of fixed-size JPEGs, written in
parallel and resumable.

Split lists (Liu et al. 2019, ImageNet_LT_{train,val,test}.txt) hold one `relative/path.JPEG label` per line,
paths relative to the ImageNet root (`train/n01440764/n01440764_10026.JPEG 0`): train 115,846 images over 1000
classes (1280 -> 5), val 20,000 (20 per class), test 50,000 (50 per class). A class is named after the folder
its images sit in (the WordNet id) when all of them agree, else after its label.

Size: each image is resized so its short side is `size` (antialiased) and centre-cropped to size x size, then
re-encoded as JPEG once. Square, because training decodes a batch into one (B, C, H, W) tensor and augments it
on the GPU, so a dataset has one image shape (the manifest's `image.shape`, which `djc train` requires); the
square of the short side keeps all of it and 3/4 of the long side of ImageNet's usual 4:3 images, and
RandomResizedCrop draws its crops inside it. 256 (the default) is the customary resize before 224 crops
(augment.out_size=224, augment.crop_scale_min=0.08).

Resume: samples go to shards by a seeded permutation, as in every djc dataset, so shard s always holds the
same rows. A shard is written under a temporary name and renamed, and only then is its receipt
`_prepare/shard-NNNNN.json` (checksum, row groups, pixel sums) written. A rerun with the same plan skips every
shard with a receipt and rewrites none of them; the manifest, assembled from the receipts, comes last, after
which `_prepare/` is removed. The plan (split list checksum, size, quality, seed, rows per shard) is stored in
`_prepare/plan.json`; another plan at the same URL is refused until --overwrite.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from djc.data.shards import MANIFEST, DatasetError, Manifest, ShardInfo, decode_array, fs_path, square
from djc.data.writer import PixelStats, shard_bytes, write_manifest
from djc.runfiles import write_bytes

PLAN_FORMAT = "djc-imagenet-lt-plan/1"
WORK_DIR = "_prepare"


class SplitList(NamedTuple):
    paths: list[str]  # relative to the ImageNet root
    labels: np.ndarray  # (n,) int64
    class_names: list[str]  # label order
    sha256: str  # of the list file: part of the plan


def read_split_list(split_file: str) -> SplitList:
    """Parse `relative/path label` lines (blank lines ignored); a malformed line fails naming file and line."""
    with open(split_file, "rb") as f:
        raw = f.read()
    paths, labels = [], []
    for no, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]):
            raise DatasetError(f"{split_file}:{no}: expected 'relative/path.JPEG label', got {line.strip()!r}")
        paths.append(parts[0])
        labels.append(int(parts[1]))
    if not paths:
        raise DatasetError(f"{split_file} lists no images")
    y = np.asarray(labels, dtype=np.int64)
    folders: dict[int, set[str]] = {}
    for p, c in zip(paths, labels):
        folders.setdefault(c, set()).add(os.path.basename(os.path.dirname(p)))
    names = [next(iter(folders[c])) if len(folders.get(c, ())) == 1 else str(c) for c in range(int(y.max()) + 1)]
    return SplitList(paths, y, names, hashlib.sha256(raw).hexdigest())


def square_jpeg(data: bytes, size: int, quality: int) -> bytes:
    """Short side -> `size` (antialiased), centre crop size x size, RGB JPEG at `quality`."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale when still >= size (4x faster)
        im = square(im.convert("RGB"), size)  # grayscale, CMYK and palette images of ImageNet become RGB
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class _Task(NamedTuple):
    shard: int
    files: list[str]  # absolute paths, in row order
    labels: list[int]
    first_index: int
    size: int
    quality: int
    rows_per_group: int


def _encode_shard(t: _Task) -> tuple[int, bytes, ShardInfo, dict[str, Any]]:
    """In a worker process: read, resize and encode one shard's images; its Parquet bytes and pixel sums."""
    stats, blobs = PixelStats(), []
    for path in t.files:
        try:
            with open(path, "rb") as f:
                blob = square_jpeg(f.read(), t.size, t.quality)
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError too
            raise DatasetError(f"{path}: cannot be read as an image: {type(e).__name__}: {e}") from None
        stats.add(decode_array(blob, path))  # the stored pixels, and proof that they decode
        blobs.append(blob)
    buf, info = shard_bytes(f"shard-{t.shard:05d}.parquet", t.first_index, np.asarray(t.labels), blobs,
                            t.rows_per_group)
    return t.shard, buf, info, stats.state()


def _progress(name: str, total: int, shards: int) -> Callable[[int, int], None]:
    t0 = time.time()

    def show(done: int, shards_done: int) -> None:
        rate = done / max(1e-9, time.time() - t0)
        eta = (total - done) / rate if rate > 0 else 0.0
        bar = "#" * round(30 * shards_done / shards)
        print(f"\r[djc prepare] {name} [{bar:<30}] {shards_done}/{shards} shards, {rate:,.0f} img/s, "
              f"ETA {eta / 60:.0f} min ", end="\n" if shards_done == shards else "", file=sys.stderr, flush=True)

    return show


def _run(tasks: list[_Task], workers: int) -> Iterator[tuple[int, bytes, ShardInfo, dict[str, Any]]]:
    """Encoded shards as they finish; at most 2 per worker in flight, so memory stays ~2 x workers x shard."""
    if workers <= 1:
        yield from map(_encode_shard, tasks)
        return
    # spawn, not fork: the parent may hold s3fs's event-loop thread, which a forked child would inherit locked
    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        todo, running = iter(tasks), set()
        for t in todo:
            running.add(pool.submit(_encode_shard, t))
            if len(running) >= 2 * workers:
                break
        while running:
            finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                yield fut.result()
                nxt = next(todo, None)
                if nxt is not None:
                    running.add(pool.submit(_encode_shard, nxt))


def prepare_imagenet_lt(root: str, split_file: str, out_url: str, *, size: int = 256, quality: int = 90,
                        rows_per_shard: int = 1024, rows_per_group: int = 256, seed: int = 0,
                        workers: int | None = None, max_shards: int | None = None, overwrite: bool = False,
                        progress: bool = True) -> Manifest | None:
    """Write the images `split_file` lists under `root` as a dataset at `out_url` (see the module docstring).

    Returns the manifest, or None when `max_shards` stopped the run early (run it again to continue).
    """
    if size < 8 or not 1 <= quality <= 95 or rows_per_shard < 1 or rows_per_group < 1:
        raise DatasetError(f"need size >= 8, quality in [1, 95], rows >= 1; got size={size}, quality={quality}, "
                           f"rows_per_shard={rows_per_shard}, rows_per_group={rows_per_group}")
    lst = read_split_list(split_file)
    base = os.path.abspath(os.path.expanduser(root))
    files = [os.path.join(base, p) for p in lst.paths]
    missing = next((f for f in files if not os.path.isfile(f)), None)
    if missing is not None:
        raise FileNotFoundError(f"{missing} (listed in {split_file}) not found under --root {root}")

    url = out_url.rstrip("/")
    fs, path = fs_path(url)
    work = f"{path}/{WORK_DIR}"
    if overwrite:
        for stale in [f"{path}/{MANIFEST}", *fs.glob(f"{path}/shard-*"), work]:
            if fs.exists(stale):
                fs.rm(stale, recursive=True)
    if fs.exists(f"{path}/{MANIFEST}"):
        raise DatasetError(f"a dataset already exists at {url} ({MANIFEST}); pass --overwrite to replace it")
    n = len(files)
    plan = {"format": PLAN_FORMAT, "split_file_sha256": lst.sha256, "num_samples": n, "size": size,
            "quality": quality, "seed": seed, "rows_per_shard": rows_per_shard, "rows_per_group": rows_per_group}
    if fs.exists(f"{work}/plan.json"):
        old = json.loads(fs.cat_file(f"{work}/plan.json"))
        if old != plan:
            diff = {k: (old.get(k), v) for k, v in plan.items() if old.get(k) != v}
            raise DatasetError(f"an interrupted preparation with a different plan is at {url} ({diff}: was, now); "
                               f"run it with the same arguments, or pass --overwrite to start over")
    else:
        fs.makedirs(work, exist_ok=True)
        write_bytes(f"{url}/{WORK_DIR}/plan.json", json.dumps(plan).encode())

    order = np.random.default_rng(seed).permutation(n)
    num_shards = -(-n // rows_per_shard)
    fs.invalidate_cache()  # s3fs caches listings: see what an interrupted run left
    present = {p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    receipts = {p.rsplit("/", 1)[-1] for p in fs.ls(work, detail=False)}
    done = {s for s in range(num_shards)
            if f"shard-{s:05d}.json" in receipts and f"shard-{s:05d}.parquet" in present}
    for p in present:  # temporary names left by an interrupted write
        if ".tmp-" in p:
            fs.rm(f"{path}/{p}")
    pending = [s for s in range(num_shards) if s not in done][:max_shards]
    tasks = []
    for s in pending:
        rows = order[s * rows_per_shard:(s + 1) * rows_per_shard]
        tasks.append(_Task(s, [files[i] for i in rows], lst.labels[rows].tolist(), s * rows_per_shard, size, quality,
                           rows_per_group))
    stem = os.path.splitext(os.path.basename(split_file))[0]  # ImageNet_LT_train -> train
    split = m.group(1) if (m := re.search(r"_(train|val|test)$", stem)) else stem
    name = f"imagenet-lt-{split}"
    show = _progress(name, n, num_shards) if progress else None
    finished = len(done)
    for s, buf, info, stats in _run(tasks, workers or os.cpu_count() or 1):
        write_bytes(f"{url}/{info.path}", buf)
        receipt = {"shard": dataclasses.asdict(info), "stats": stats}
        write_bytes(f"{url}/{WORK_DIR}/shard-{s:05d}.json", json.dumps(receipt).encode())
        finished += 1
        if show is not None:
            show(min(n, finished * rows_per_shard), finished)
    if finished < num_shards:
        return None

    stats, shards = PixelStats(), []
    for s in range(num_shards):
        r = json.loads(fs.cat_file(f"{work}/shard-{s:05d}.json"))
        shards.append(ShardInfo(**{**r["shard"], "row_groups": tuple(r["shard"]["row_groups"])}))
        stats.merge(r["stats"])
    counts = np.bincount(lst.labels, minlength=len(lst.class_names))
    provenance = {"source": "imagenet-lt", "split": split, "split_file": os.path.basename(split_file),
                  "split_file_sha256": lst.sha256, "root": base, "size": size, "quality": quality, "seed": seed,
                  "profile": "list", "imbalance_ratio": float(counts.max() / max(1, counts[counts > 0].min()))}
    manifest = write_manifest(url, name=name, class_names=lst.class_names, labels=lst.labels, stats=stats,
                              encodings={"jpeg"}, shards=shards, provenance=provenance)
    fs.rm(work, recursive=True)
    return manifest

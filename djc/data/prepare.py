"""`djc prepare`: a source collection -> a dataset (optionally long-tailed) at any fsspec URL."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from djc.data import sources
from djc.data.longtail import class_counts, longtail_subset
from djc.data.shards import MANIFEST, Manifest, fs_path
from djc.data.writer import write_dataset

SOURCES = ("digits", "shapes", "cifar10", "cifar100", "folder", "imagenet-lt-synthetic")
SIZED = ("folder", "imagenet-lt-synthetic")  # the sources that take a size
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0  # fixed, not `seed`: train and test prepared with different seeds must never overlap
SYNTHETIC_SEED = 0  # fixed, not `seed`: the train and test splits must share their class patterns


def dataset_exists(url: str) -> bool:
    """Whether a whole dataset (its manifest, written last) is at `url`."""
    fs, root = fs_path(url.rstrip("/"))
    return bool(fs.exists(f"{root}/{MANIFEST}"))


def load_source(source: str, root: str | None = None, split: str = "train", size: int | None = None,
                mode: str = "auto", seed: int = 0) -> sources.Source:
    if source == "digits":
        return sources.digits(split, seed=DIGITS_SPLIT_SEED, test_fraction=DIGITS_TEST_FRACTION)
    if source == "shapes":
        return sources.shapes(split, seed=seed)
    if source == "imagenet-lt-synthetic":  # generated: its images depend on (seed, split) only
        from djc.data.synthetic import imagenet_lt_synthetic

        return sources.Source(*imagenet_lt_synthetic(split, size or 16, SYNTHETIC_SEED))
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    if not root:
        raise ValueError(f"source {source!r} needs root= (the folder holding it); djc never downloads")
    if source == "folder":
        return sources.folder(root, size=size, mode=mode)
    return sources.cifar(root, 10 if source == "cifar10" else 100, split)


class _Take(Sequence[Any]):
    """images[idx] for a sequence that is not an array (file bytes read lazily stay lazy)."""

    def __init__(self, images: Sequence[Any], idx: np.ndarray):
        self.images, self.idx = images, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.images[int(self.idx[i])]

    def where(self, i: int) -> str:
        where = getattr(self.images, "where", None)
        return where(int(self.idx[i])) if where else f"source sample {int(self.idx[i])}"


def _progress(name: str) -> Any:
    t0 = time.time()

    def show(done: int, total: int) -> None:
        print(f"\r[djc prepare] {name}: {done:,}/{total:,} samples ({time.time() - t0:.0f}s)",
              end="\n" if done == total else "", file=sys.stderr, flush=True)

    return show


def prepare(source: str, out_url: str, *, root: str | None = None, split: str = "train",
            imbalance_ratio: float = 1.0, profile: str = "exp", seed: int = 0, overwrite: bool = False,
            progress: bool = True, size: int | None = None, mode: str = "auto") -> Manifest:
    """Write `source`'s `split` as a dataset at `out_url`, long-tailed when imbalance_ratio > 1.

    The long-tailed subset takes class_counts(n_max, C, ratio, profile) images per class, where n_max is the
    SMALLEST class count of the split: the largest size every class can supply, so the profile is realised
    exactly (CIFAR's classes are equal, 5000 / 500 each; digits' train classes hold 139-146, n_max = 139).
    `seed` draws the subset and the shard order. A test split is normally prepared with ratio 1. `size` and
    `mode` make one image shape out of a folder of photos (sources.folder); `size` is also the side of
    imagenet-lt-synthetic's generated images (16 by default); other sources have one shape already.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    class_counts(1 << 30, 2, imbalance_ratio, profile)  # validate ratio and profile before reading anything
    if (size is not None and source not in SIZED) or (mode != "auto" and source != "folder"):
        raise ValueError(f"--size applies to folder and imagenet-lt-synthetic sources and --mode to folder "
                         f"sources; {source} images have one shape already")
    if source == "imagenet-lt-synthetic" and imbalance_ratio > 1:
        raise ValueError(f"--imbalance-ratio {imbalance_ratio:g}: imagenet-lt-synthetic's train split has "
                         f"ImageNet-LT's profile already (1280 -> 5) and its test split is balanced, as ImageNet-LT's")
    src = load_source(source, root, split, size=size, mode=mode, seed=seed)
    images, labels, C = src.images, np.asarray(src.labels, dtype=np.int64), len(src.class_names)
    n_source = len(labels)
    if imbalance_ratio > 1:
        if C == 0 or (labels < 0).any():
            raise ValueError(f"imbalance_ratio={imbalance_ratio} needs labelled data; {source} at {root} is unlabelled")
        keep = longtail_subset(labels, C, imbalance_ratio, seed, profile)
        images = images[keep] if isinstance(images, np.ndarray) else _Take(images, keep)
        labels = labels[keep]
    provenance: dict[str, Any] = {"source": source, "split": split, "profile": profile,
                                  "imbalance_ratio": float(imbalance_ratio), "seed": seed,
                                  "source_samples": n_source}
    if source == "digits":
        provenance.update(test_fraction=DIGITS_TEST_FRACTION, split_seed=DIGITS_SPLIT_SEED)
    elif source == "shapes":
        provenance["render_seed"] = seed
    elif source == "imagenet-lt-synthetic":
        counts = np.bincount(labels)
        provenance.update(profile="imagenet-lt (generated)" if split == "train" else "balanced", size=size or 16,
                          image_seed=SYNTHETIC_SEED, imbalance_ratio=float(counts.max() / counts.min()))
    else:
        provenance["root"] = os.path.abspath(os.path.expanduser(root or ""))
    base = os.path.basename(os.path.normpath(root or "")) if source == "folder" else source
    name = f"{base}-{split}" + (f"-{profile}{imbalance_ratio:g}" if imbalance_ratio > 1 else "")
    return write_dataset(out_url, images, labels, name=name, class_names=src.class_names, provenance=provenance,
                         seed=seed, overwrite=overwrite, progress=_progress(name) if progress else None)

"""Source collections a dataset is prepared from. Nothing here downloads: the data is bundled or the user's.

Every source returns a `Source`: the images (uint8 (H, W, C) arrays, or encoded bytes for files), int64 labels
(-1 when unknown) and the class names in label order. `djc.data.prepare` turns one into a sharded dataset.
"""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from djc.data.shards import as_png_or_jpeg, square

IMAGE_EXTS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")


class Source(NamedTuple):
    images: Sequence[Any]  # (n, H, W, C) uint8 array, or a sequence of encoded image bytes
    labels: np.ndarray  # (n,) int64, -1 when unknown
    class_names: list[str]  # label order; [] when unlabeled


# --------------------------------------------------------------------------------------------------------
# sklearn digits


def digits(split: str, seed: int = 0, test_fraction: float = 0.2) -> Source:
    """scikit-learn's digits: 1,797 real 8x8 scans, 10 classes; values 0..16 -> uint8 round(v * 255 / 16).

    The train/test split is drawn per class from (seed, c), so the test split is balanced (about 36 per class at
    0.2) and the same whatever long-tail profile is later applied to the train split. Images keep their original
    order within a split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: digits has 'train' and 'test'")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    d = load_digits()
    x = np.round(d.images * 255.0 / 16.0).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    y = d.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[np.random.default_rng([seed, c]).permutation(idx)[: round(len(idx) * test_fraction)]] = True
    keep = test if split == "test" else ~test
    return Source(x[keep], y[keep], [str(c) for c in range(10)])


# --------------------------------------------------------------------------------------------------------
# CIFAR python-pickle release (https://www.cs.toronto.edu/~kriz/cifar.html, "python version")

_CIFAR = {
    # num_classes -> (folder, train files, test files, meta file, label key, names key)
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
         "labels", "label_names"),
    100: ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def _key(d: dict, key: str) -> Any:
    # The release was pickled by Python 2: loaded with encoding="bytes" its keys are bytes; re-pickled copies
    # made by Python 3 tools have str keys. Accept both.
    if key.encode() in d:
        return d[key.encode()]
    return d[key]


class _ArraysOnly(pickle.Unpickler):
    """A pickle reader that rebuilds numpy arrays and plain data and nothing else.

    A pickle names the callables that rebuild its objects, so a plain pickle.load of a crafted "CIFAR batch" runs
    any code it likes. The release needs only numpy's array reconstruction (numpy 1 names it numpy.core, numpy 2
    numpy._core); every other global is refused with its name."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR batch never does")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        try:
            d = _ArraysOnly(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a CIFAR python-pickle batch that loads without running code: {e}"
                             ) from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR python-pickle batch (a {type(d).__name__}, not a dict)")
    return d


def cifar(root: str, num_classes: int, split: str) -> Source:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python-pickle release already on disk.

    `root` is the extracted folder (cifar-10-batches-py / cifar-100-python) or its parent.
    """
    if num_classes not in _CIFAR:
        raise ValueError(f"CIFAR has 10 or 100 classes, got {num_classes}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: CIFAR has 'train' and 'test'")
    folder, train, test, meta, label_key, names_key = _CIFAR[num_classes]
    files = [*(train if split == "train" else test), meta]
    base = Path(root).expanduser()
    for cand in (base, base / folder):
        if all((cand / f).is_file() for f in files):
            base = cand
            break
    else:
        raise FileNotFoundError(
            f"CIFAR-{num_classes} ({split}) not found under {root}: expected {folder}/{{{', '.join(files)}}} "
            f"from the python-pickle release, either in {root} or in {root}/{folder}; djc never downloads")
    xs, ys = [], []
    for f in files[:-1]:
        d = _unpickle(base / f)
        # (n, 3072) rows are the R, G, B planes of a 32x32 image, row-major: (n, 3, 32, 32) -> (n, 32, 32, 3)
        xs.append(np.asarray(_key(d, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(_key(d, label_key), dtype=np.int64))
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _key(_unpickle(base / meta), names_key)]
    return Source(np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys), names)


# --------------------------------------------------------------------------------------------------------
# Image folders


class FileImages(Sequence[bytes]):
    """The encoded bytes of image files, read when indexed: an ImageNet-LT-sized folder never sits in memory
    at once. PNG and JPEG files are kept byte for byte; other formats (BMP, WebP) are re-encoded as PNG.

    `size` (short side resized to it, antialiased, then centre-cropped square, as ImageNet-LT's prepare does)
    and `channels` (1 = grayscale, 3 = RGB) make one image shape out of a folder of photos: a dataset has one
    shape, because batches are stacked and augmented on the device. A converted image is re-encoded (JPEG
    sources as JPEG at quality 95, the others as lossless PNG)."""

    def __init__(self, paths: Sequence[str], size: int | None = None, channels: int | None = None):
        self.paths, self.size, self.channels = list(paths), size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        """How an error names image i: its file."""
        return self.paths[i]

    def __getitem__(self, i: int) -> bytes:  # type: ignore[override]  # ints only: nothing here slices
        with open(self.paths[i], "rb") as f:
            data = f.read()
        try:
            if self.size is None and self.channels is None:
                return as_png_or_jpeg(data)
            return _convert(data, self.size, self.channels)
        except (ValueError, OSError) as e:  # CorruptDataError included: name the file, not just its size
            raise ValueError(f"{self.paths[i]}: {e}") from None


def _convert(data: bytes, size: int | None, channels: int | None) -> bytes:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        ch = channels or (1 if im.mode == "L" else 3)
        im = im.convert("L" if ch == 1 else "RGB")
        if size is not None:
            im = square(im, size)
        buf = io.BytesIO()
        if fmt == "JPEG":
            im.save(buf, format="JPEG", quality=95)
        else:
            im.save(buf, format="PNG")
    return buf.getvalue()


def _shapes(paths: Sequence[str]) -> list[tuple[int, int, int]]:
    """(height, width, channels) of every file from its header (no decoding: ~0.1 ms a file); channels as the
    decoder will give them (grayscale "L" stays 1 channel, every other mode becomes RGB)."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
                out.append((h, w, 1 if im.mode == "L" else 3))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"{p} is not a readable image: {type(e).__name__}: {e}") from None
    return out


def _one_shape(paths: list[str], size: int | None, mode: str) -> tuple[int | None, int | None]:
    """(size, channels) that make every image of the folder one shape; ValueError naming two files that
    differ when the sizes differ and no `size` was given."""
    shapes = _shapes(paths)
    chans = [c for _, _, c in shapes]
    if mode == "rgb":
        channels = 3
    elif mode == "gray":
        channels = 1
    else:  # the majority; ties go to RGB, which loses nothing of a gray image
        channels = 1 if chans.count(1) > len(chans) / 2 else 3
    if mode == "auto" and len(set(chans)) > 1:
        minority = next(p for p, c in zip(paths, chans) if c != channels)
        print(f"[djc prepare] {chans.count(1)} gray and {chans.count(3)} colour images: converting all to "
              f"{'gray' if channels == 1 else 'RGB'} (e.g. {minority}); --mode rgb|gray chooses", file=sys.stderr)
    if size is None:
        sizes = [(h, w) for h, w, _ in shapes]
        if len(set(sizes)) > 1:
            common = max(set(sizes), key=sizes.count)
            a = paths[sizes.index(common)]
            b = next(p for p, hw in zip(paths, sizes) if hw != common)
            hb, wb = next(hw for hw in sizes if hw != common)
            raise ValueError(f"images of different sizes: {a} is {common[1]}x{common[0]}, {b} is {wb}x{hb} (and "
                             f"{sum(hw != common for hw in sizes) - 1} more); a dataset has one image shape: pass "
                             f"--size N to resize every image (short side to N, then a centre crop)")
    if size is None and set(chans) == {channels}:
        return None, None  # already one shape: the files are stored byte for byte
    return size, channels


def _images_under(d: str) -> list[str]:
    """Image files under d, recursively (like torchvision's ImageFolder), in sorted relative-path order;
    hidden files and folders are ignored."""
    out = []
    for parent, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(parent, f) for f in files
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS)]
    return sorted(out, key=lambda p: os.path.relpath(p, d))


def folder(root: str, size: int | None = None, mode: str = "auto") -> Source:
    """An ImageFolder-style tree: class subfolders (sorted names -> labels 0..C-1), or one flat folder of
    images (labels -1, no class names). Extensions .png .jpg .jpeg .bmp .webp, any case.

    Images beside class subfolders would have no class: that tree is refused rather than half read. Every
    image gets one shape: `size` resizes (short side, then centre crop); gray and colour images are converted
    to the majority, or to `mode` ("rgb" / "gray"); images of different sizes without `size` are refused here,
    naming two of them, rather than when training reads them.
    """
    if size is not None and size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {size}")
    if mode not in ("auto", "rgb", "gray"):
        raise ValueError(f"--mode must be auto, rgb or gray, got {mode!r}")
    base = os.path.expanduser(root)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"image folder not found: {root}")
    entries = sorted(e for e in os.listdir(base) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(base, e))]
    top = [e for e in entries if os.path.isfile(os.path.join(base, e)) and e.lower().endswith(IMAGE_EXTS)]
    if classes and top:
        raise ValueError(f"{root} holds both class subfolders ({', '.join(classes[:3])}, ...) and loose images "
                         f"({', '.join(top[:3])}, ...): use one layout")
    if classes:
        paths: list[str] = []
        labels: list[int] = []
        for c, name in enumerate(classes):
            found = _images_under(os.path.join(base, name))
            paths += found
            labels += [c] * len(found)
    else:
        paths, labels = [os.path.join(base, e) for e in top], [-1] * len(top)
    if not paths:
        raise FileNotFoundError(f"no images ({' '.join(IMAGE_EXTS)}) under {root}")
    return Source(FileImages(paths, *_one_shape(paths, size, mode)), np.asarray(labels, dtype=np.int64), classes)

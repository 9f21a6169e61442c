"""`shapes`: a procedural RGB benchmark whose classes differ only in structure, made by djc itself.

Ten classes of object, 32x32 RGB, each defined by its shape, layout or texture alone:

  disc, ring, triangle, square, plus, star, crescent   silhouettes
  stripes, checker                                     textures inside a disc (the disc's silhouette)
  dots                                                 layout: three small discs at a triangle's corners

Everything a clustering method should be invariant to varies per image, independently of the class: the
object's colour and shading, the background's two colours, gradient and blotchy texture, the object's position
(it may touch the border), size (12-24 px across), aspect (up to 1.35:1), rotation (any angle), clutter (up to
four strokes and specks, a third of them in front of the object) and pixel noise. The only constraint between
them is a luminance step of at least 0.2 between object and background, so the shape survives grayscale. So
raw pixels mostly measure colour and position: k-means on them lands near chance (tests/test_shapes.py), while
a representation invariant to crops, colour and rotation separates the classes.

Rendering is vectorised numpy over chunks of images (signed distances of every pixel to the shape, a 1-px
anti-aliasing ramp, alpha compositing); 20,000 images take a few seconds. The images of a split depend only on
(seed, split, images per class): every per-image parameter is drawn up front from one generator, and the pixel
noise of each chunk of 1,024 images from a generator of its own.
"""

from __future__ import annotations

import numpy as np

CLASSES = ("disc", "ring", "triangle", "square", "plus", "star", "crescent", "stripes", "checker", "dots")
SIDE = 32  # image side in px
PER_CLASS = {"train": 2000, "test": 200}  # balanced sources: 20,000 train images, 2,000 test images
_SPLIT_CODE = {"train": 0, "test": 1}  # separate random streams: a split never repeats the other's images
_CHUNK = 1024  # images rendered at once: ~20 (n, 32, 32) float32 temporaries of 4 MB

RADIUS_PX = (6.0, 12.0)  # object radius: 12-24 px across, 0.38-0.75 of the side
MAX_LOG_ASPECT = 0.15  # x and y stretched by e^{+-a}, a ~ U(-0.15, 0.15): up to 1.35:1
MIN_LUMA_STEP = 0.2  # least |luma(object) - luma(background under it)|: the shape survives grayscale
MAX_CLUTTER = 4  # strokes and specks per image, 0..4
NOISE_STD = (0.0, 0.06)  # per-image Gaussian pixel noise, in [0, 1] units
_LUMA = np.array([0.2989, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as the views' grayscale


# --------------------------------------------------------------------------------------------------------
# Shapes as signed distances in object units (the object spans about the unit disc; negative inside).


def _polygon(u: np.ndarray, v: np.ndarray, n: int, circumradius: float) -> np.ndarray:
    apothem = circumradius * np.cos(np.pi / n)
    phis = 2 * np.pi * np.arange(n) / n + np.pi / 2
    return np.max([u * np.cos(p) + v * np.sin(p) for p in phis], axis=0) - apothem


def _bands(t: np.ndarray, period: float) -> np.ndarray:
    """Distance to the nearest band of half the period's width, negative inside: stripes along t."""
    return np.abs(np.mod(t / period, 1.0) - 0.5) * period - period / 4


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    rho, phi = np.hypot(u, v), np.arctan2(v, u) - np.pi / 2
    w = np.abs(2 * np.mod(phi / (2 * np.pi / 5), 1.0) - 1)  # 1 at the 5 points, 0 between them
    return rho - (0.42 + 0.58 * w)  # outer radius 1.0, inner 0.42


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
    return np.min([np.hypot(u - 0.62 * np.cos(a), v - 0.62 * np.sin(a)) for a in angles], axis=0) - 0.3


def _checker(u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    du, dv = _bands(u, period), _bands(v, period)
    on = (du < 0) ^ (dv < 0)
    return np.where(on, -1.0, 1.0) * np.minimum(np.abs(du), np.abs(dv))


def signed_distance(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Class `label`'s shape at object coordinates (u, v): < 0 inside, in object units."""
    rho = np.hypot(u, v)
    name = CLASSES[label]
    if name == "disc":
        return rho - 0.85
    if name == "ring":
        return np.abs(rho - 0.68) - 0.2  # 0.4 units wide: 2.4-4.8 px
    if name == "triangle":
        return _polygon(u, v, 3, 1.0)
    if name == "square":
        return _polygon(u, v, 4, 0.95)
    if name == "plus":
        return np.minimum(np.maximum(np.abs(u) - 0.95, np.abs(v) - 0.27),
                          np.maximum(np.abs(v) - 0.95, np.abs(u) - 0.27))
    if name == "star":
        return _star(u, v)
    if name == "crescent":
        return np.maximum(rho - 0.9, 0.72 - np.hypot(u - 0.42, v))
    if name == "stripes":
        return np.maximum(rho - 0.9, _bands(u, 0.65))  # period 3.9-7.8 px
    if name == "checker":
        return np.maximum(rho - 0.9, _checker(u, v, 0.8))  # cells 2.4-4.8 px
    if name == "dots":
        return _dots(u, v)
    raise ValueError(f"no shape for label {label}")


# --------------------------------------------------------------------------------------------------------
# Rendering


def _draw_params(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Every per-image random choice except pixel noise, drawn in a fixed order (float32 where rendered)."""
    f = np.float32
    p: dict[str, np.ndarray] = {}
    p["radius"] = rng.uniform(*RADIUS_PX, n).astype(f)
    p["log_aspect"] = rng.uniform(-MAX_LOG_ASPECT, MAX_LOG_ASPECT, n).astype(f)
    p["angle"] = rng.uniform(0, 2 * np.pi, n).astype(f)
    # The centre keeps at least 3/4 of the radius inside: objects may be cut by the border, as in photos.
    lo, hi = 0.75 * p["radius"], SIDE - 0.75 * p["radius"]
    p["cx"] = (lo + (hi - lo) * rng.random(n)).astype(f)
    p["cy"] = (lo + (hi - lo) * rng.random(n)).astype(f)
    p["bg_a"] = rng.random((n, 3)).astype(f)
    p["bg_b"] = np.clip(p["bg_a"] + rng.normal(0, 0.3, (n, 3)), 0, 1).astype(f)  # the gradient's far colour
    p["bg_dir"] = rng.uniform(0, 2 * np.pi, n).astype(f)
    p["bg_texture"] = rng.uniform(0, 0.15, n).astype(f)  # amplitude of the blotchy low-frequency texture
    p["bg_blotches"] = rng.normal(0, 1, (n, 3, 4, 4)).astype(f)  # 4x4 grid, upsampled to the image
    p["obj_shade"] = rng.uniform(0, 0.4, n).astype(f)  # object brightness varies by +-shade/2 across it
    p["obj_shade_dir"] = rng.uniform(0, 2 * np.pi, n).astype(f)
    p["clutter"] = rng.integers(0, MAX_CLUTTER + 1, n)
    p["clutter_stroke"] = rng.random((n, MAX_CLUTTER)) < 0.7  # else a speck
    p["clutter_front"] = rng.random((n, MAX_CLUTTER)) < 1 / 3  # drawn over the object
    p["clutter_xy"] = rng.uniform(0, SIDE, (n, MAX_CLUTTER, 2)).astype(f)
    p["clutter_dir"] = rng.uniform(0, 2 * np.pi, (n, MAX_CLUTTER)).astype(f)
    p["clutter_len"] = rng.uniform(5, 12, (n, MAX_CLUTTER)).astype(f)  # stroke length, px
    p["clutter_width"] = rng.uniform(0.5, 1.0, (n, MAX_CLUTTER)).astype(f)  # stroke half-width / speck radius - 1
    p["clutter_rgb"] = rng.random((n, MAX_CLUTTER, 3)).astype(f)
    p["noise"] = rng.uniform(*NOISE_STD, n).astype(f)
    # Object colour: uniform RGB, redrawn where the luma step to the background under the object is below
    # MIN_LUMA_STEP (about 40% of first draws; the loop ends after a handful of rounds).
    t_centre = _gradient_t(p["cx"], p["cy"], p["bg_dir"])
    bg_there = p["bg_a"] + (p["bg_b"] - p["bg_a"]) * t_centre[:, None]
    rgb = rng.random((n, 3)).astype(f)
    while (bad := np.abs((rgb - bg_there) @ _LUMA) < MIN_LUMA_STEP).any():
        rgb[bad] = rng.random((int(bad.sum()), 3)).astype(f)
    p["obj_rgb"] = rgb
    return p


def _gradient_t(x: np.ndarray, y: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Position along a gradient direction through the image centre, 0 at one corner's side, 1 at the other."""
    half = SIDE / 2
    proj = (x - half) * np.cos(direction) + (y - half) * np.sin(direction)
    return np.clip(0.5 + proj / (SIDE * np.sqrt(2)), 0, 1)


def _alpha(d_px: np.ndarray) -> np.ndarray:
    return np.clip(0.5 - d_px, 0.0, 1.0)  # 1-px anti-aliasing ramp across the edge


def _over(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite colour rgb (n, 3) or (n, 3, H, W) with coverage alpha (n, H, W) over img (n, 3, H, W)."""
    rgb = rgb[:, :, None, None] if rgb.ndim == 2 else rgb
    return img + (rgb - img) * alpha[:, None]


def _upsample_matrix(small: int, big: int) -> np.ndarray:
    """(big, small) bilinear interpolation weights (align_corners=False, edges clamped)."""
    src = np.clip((np.arange(big) + 0.5) * small / big - 0.5, 0, small - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, small - 1)
    m = np.zeros((big, small), dtype=np.float32)
    m[np.arange(big), lo] += 1 - (src - lo)
    m[np.arange(big), hi] += src - lo
    return m


def render(labels: np.ndarray, p: dict[str, np.ndarray], noise_rng: np.random.Generator) -> np.ndarray:
    """uint8 (n, 32, 32, 3) images of classes `labels` (n,) under the per-image parameters p."""
    n = len(labels)
    xs = np.arange(SIDE, dtype=np.float32) + 0.5  # pixel centres
    gx, gy = xs[None, None, :], xs[None, :, None]  # (1, 1, W), (1, H, 1)

    # Background: a two-colour linear gradient plus blotches (a 4x4 noise grid upsampled), per channel.
    t = _gradient_t(gx, gy, p["bg_dir"][:, None, None])  # (n, H, W)
    img = p["bg_a"][:, :, None, None] + (p["bg_b"] - p["bg_a"])[:, :, None, None] * t[:, None]
    up = _upsample_matrix(4, SIDE)
    img += p["bg_texture"][:, None, None, None] * np.einsum("hi,ncij,wj->nchw", up, p["bg_blotches"], up)

    # Clutter: strokes (capsules) and specks (discs), each with its own colour.
    def clutter_alpha(j: int, sel: np.ndarray) -> np.ndarray:
        def col(key: str) -> np.ndarray:
            return p[key][sel, j, None, None]

        cx, cy = p["clutter_xy"][sel, j, 0, None, None], p["clutter_xy"][sel, j, 1, None, None]
        ang, half, width = col("clutter_dir"), col("clutter_len") / 2, col("clutter_width")
        along = (gx - cx) * np.cos(ang) + (gy - cy) * np.sin(ang)
        across = -(gx - cx) * np.sin(ang) + (gy - cy) * np.cos(ang)
        stroke = np.hypot(np.clip(np.abs(along) - half, 0, None), across) - width
        speck = np.hypot(gx - cx, gy - cy) - (1.0 + width)
        return _alpha(np.where(col("clutter_stroke"), stroke, speck))

    def draw_clutter(img: np.ndarray, front: bool) -> None:
        for j in range(MAX_CLUTTER):  # only the images that have item j on this layer: ~1/4 of the work
            sel = np.flatnonzero((j < p["clutter"]) & (p["clutter_front"][:, j] == front))
            img[sel] = _over(img[sel], p["clutter_rgb"][sel, j], clutter_alpha(j, sel))

    draw_clutter(img, front=False)

    # The object: pixel -> object coordinates (translate, rotate, stretch, scale), then the class's shape.
    dx, dy = gx - p["cx"][:, None, None], gy - p["cy"][:, None, None]  # (n, 1, W), (n, H, 1)
    c, s = np.cos(p["angle"])[:, None, None], np.sin(p["angle"])[:, None, None]
    r = p["radius"][:, None, None]
    ax = np.exp(p["log_aspect"])[:, None, None]
    u, v = (dx * c + dy * s) / (r * ax), (-dx * s + dy * c) * ax / r
    d = np.empty((n, SIDE, SIDE), dtype=np.float32)
    for k in np.unique(labels):
        sel = labels == k
        d[sel] = signed_distance(int(k), u[sel], v[sel])
    shade = 1 + p["obj_shade"][:, None, None] * (_gradient_t(gx, gy, p["obj_shade_dir"][:, None, None]) - 0.5)
    obj = p["obj_rgb"][:, :, None, None] * shade[:, None]  # (n, 3, H, W)
    img = _over(img, obj, _alpha(d * r))  # object units -> px: d * r

    draw_clutter(img, front=True)
    img += p["noise"][:, None, None, None] * noise_rng.standard_normal(img.shape, dtype=np.float32)
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)


def generate(split: str, seed: int = 0, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 32, 32, 3), labels int64 (n,)) of `split`, `per_class` images of every class (the
    split's default: PER_CLASS), in label order. Deterministic in (seed, split)."""
    if split not in PER_CLASS:
        raise ValueError(f"unknown split {split!r}: shapes has {' and '.join(repr(s) for s in PER_CLASS)}")
    m = PER_CLASS[split] if per_class is None else per_class
    if m < 1:
        raise ValueError(f"per_class must be >= 1, got {m}")
    labels = np.repeat(np.arange(len(CLASSES), dtype=np.int64), m)
    n = len(labels)
    params = _draw_params(np.random.default_rng([seed, _SPLIT_CODE[split]]), n)
    images = np.empty((n, SIDE, SIDE, 3), dtype=np.uint8)
    for i, lo in enumerate(range(0, n, _CHUNK)):
        sl = slice(lo, lo + _CHUNK)
        noise_rng = np.random.default_rng([seed, _SPLIT_CODE[split], 1, i])
        images[sl] = render(labels[sl], {k: v[sl] for k, v in params.items()}, noise_rng)
    return images, labels


def longtail(ratio: float = 10, seed: int = 0, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The long-tailed train split in memory, (images uint8 (n, 32, 32, 3), labels (n,)): the images `djc prepare
    shapes --imbalance-ratio RATIO --seed SEED` keeps (before its shard shuffle), for probes and tests that
    skip the files."""
    from djc.data.longtail import longtail_subset

    images, labels = generate("train", seed=seed, per_class=per_class)
    keep = longtail_subset(labels, len(CLASSES), ratio, seed)
    return images[keep], labels[keep]

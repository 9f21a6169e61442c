"""Cluster galleries: what each cluster holds, as a person would check it.

One row per cluster, largest first: its size (and, when labelled, its majority class and purity), its most
confident images on the left and its least confident on the right, where a wrong member shows first. A page
holds at most `per_page` clusters (50 rows of 32-48 px images: 1,850-2,650 px tall), so every page opens at once;
`pages` pages of the largest clusters are drawn, and when clusters remain (K = 1000 is 20 pages of 50), one more
page samples `per_page` of them evenly over their size ranking, down to the smallest. The page is composed
as one RGB array and drawn by matplotlib with its text: ~1 s a page.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from djc.data.images import read_images
from djc.data.shards import Manifest
from djc.runfiles import PLOT_DPI, write_png

LABEL_W = 230  # px of the text column
PAD = 2  # px around each thumbnail
GAP = 18  # px between the most and the least confident images
HEADER = 46  # px of the page title and the column heads
MIN_SIDE, MAX_SIDE = 32, 48  # thumbnails: 8x8 digits scaled x4 (nearest), 32 px as they are, photos to 48 px


def thumb_side(side: int) -> int:
    return side * math.ceil(MIN_SIDE / side) if side < MIN_SIDE else min(side, MAX_SIDE)


def thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 (side, side, 3) from a (H, W, C) image: nearest when enlarged (pixels stay sharp), else Lanczos."""
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[:2] == (side, side):
        return image
    grow = side > max(image.shape[:2])
    return np.asarray(Image.fromarray(image).resize((side, side), Image.NEAREST if grow else Image.LANCZOS))


def plan_pages(sizes: np.ndarray, pages: int, per_page: int) -> list[tuple[str, np.ndarray]]:
    """[(page name, cluster ids)], largest first: `pages` full pages, then one sampled page of what remains."""
    order = np.argsort(-sizes, kind="stable")
    order = order[sizes[order] > 0]
    out = [(f"p{i + 1}", order[i * per_page:(i + 1) * per_page]) for i in range(pages) if i * per_page < len(order)]
    rest = order[pages * per_page:]
    if len(rest):
        pick = np.unique(np.linspace(0, len(rest) - 1, min(per_page, len(rest))).round().astype(int))
        out.append(("sample", rest[pick]))
    return out


def members(cluster: np.ndarray, confidence: np.ndarray, k: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of cluster k's `images` most confident members and, disjoint from them, its `images` least
    confident ones (all of a small cluster, split between the two)."""
    rows = np.flatnonzero(cluster == k)
    rows = rows[np.argsort(-confidence[rows], kind="stable")]
    top = rows[:min(images, math.ceil(len(rows) / 2))]
    bottom = rows[len(top):][-images:]
    return top, bottom


def describe(k: int, n: int, labels: np.ndarray, class_names: tuple[str, ...]) -> str:
    """'cluster 3 · 127 images' and, when labelled, '\nclass 5 (92%)': its majority class and its purity."""
    text = f"cluster {k} · {n} image{'s' if n != 1 else ''}"
    known = labels[labels >= 0]
    if known.size:
        counts = np.bincount(known)
        c = int(counts.argmax())
        name = class_names[c] if c < len(class_names) and class_names[c] != str(c) else ""
        text += f"\nmostly class {c}{f' {name}' if name else ''}: {counts[c] / known.size:.0%}"
    return text


def write_gallery(plot_dir: str, split: str, manifest: Manifest, index: np.ndarray, cluster: np.ndarray,
                  confidence: np.ndarray, label: np.ndarray, pages: int = 4, per_page: int = 50,
                  images: int = 8) -> list[str]:
    """gallery_<split>_p1.png .. (and _sample.png) under plot_dir; returns their URLs. `index`, `cluster`,
    `confidence`, `label` are the split's rows of assignments.parquet."""
    index, cluster = np.asarray(index, np.int64), np.asarray(cluster, np.int64)
    confidence, label = np.asarray(confidence, np.float64), np.asarray(label, np.int64)
    sizes = np.bincount(cluster, minlength=int(cluster.max(initial=-1)) + 1)
    plan = plan_pages(sizes, pages, per_page)
    chosen = {k: members(cluster, confidence, k, images) for _, ks in plan for k in ks.tolist()}
    wanted = np.concatenate([index[np.concatenate(tb)] for tb in chosen.values()]) if chosen else np.zeros(0)
    pictures = read_images(manifest, wanted)
    side = thumb_side(max(manifest.image_shape[:2]) if manifest.image_shape else MAX_SIDE)
    urls = []
    for name, ks in plan:
        url = f"{plot_dir}/gallery_{split}_{name}.png"
        title = (f"{split}: clusters {'largest first' if name != 'sample' else 'sampled over the size ranking'}"
                 f" (page {name}), {len(index)} images, {int((sizes > 0).sum())} clusters used")
        rows = [(describe(k, int(sizes[k]), label[cluster == k], manifest.class_names),
                 [pictures.get(int(index[r])) for r in chosen[k][0]],
                 [pictures.get(int(index[r])) for r in chosen[k][1]],
                 confidence[chosen[k][0]], confidence[chosen[k][1]]) for k in ks.tolist()]
        _draw_page(url, title, rows, side, images)
        urls.append(url)
    return urls


def _draw_page(url: str, title: str, rows: list, side: int, images: int) -> None:
    cell = side + 2 * PAD
    width = LABEL_W + 2 * images * cell + GAP
    height = HEADER + len(rows) * cell
    canvas = np.full((height, width, 3), 255, np.uint8)
    for r, (_, top, bottom, _, _) in enumerate(rows):
        y = HEADER + r * cell + PAD
        if r % 2:  # banded rows: the eye follows one cluster across
            canvas[HEADER + r * cell:HEADER + (r + 1) * cell] = 244
        for j, im in enumerate(top):
            if im is not None:
                x = LABEL_W + j * cell + PAD
                canvas[y:y + side, x:x + side] = thumbnail(im, side)
        for j, im in enumerate(bottom):  # right-aligned: the least confident image is always last
            if im is not None:
                x = width - (len(bottom) - j) * cell + PAD
                canvas[y:y + side, x:x + side] = thumbnail(im, side)
    fig = Figure(figsize=(width / PLOT_DPI, height / PLOT_DPI), dpi=PLOT_DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    ax.text(8, 14, title, va="center", fontsize=10, weight="bold")
    ax.text(LABEL_W, HEADER - 4, "most confident →", va="bottom", fontsize=8, color="0.3")
    ax.text(width - 4, HEADER - 4, "← least confident", va="bottom", ha="right", fontsize=8, color="0.3")
    small = 7 if cell < 44 else 8
    for r, (text, _, _, conf_top, conf_bottom) in enumerate(rows):
        y = HEADER + r * cell + cell / 2
        span = f"\nconfidence {conf_top[0]:.2f} … {(conf_bottom if len(conf_bottom) else conf_top)[-1]:.2f}"
        ax.text(8, y, text + span, va="center", fontsize=small, linespacing=1.15)
    write_png(url, fig)

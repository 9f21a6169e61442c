"""Batched augmentation views in pure torch, on whatever device the images are on.

The loader only decodes to uint8 (B, C, H, W); every random op below works on the whole batch with per-sample
parameters, so one view costs a handful of kernels instead of B PIL pipelines on the CPU. A view is its random
choices (`sample_params`, drawn from torchvision's distributions) applied by `apply_params`. Each op, and the
whole chain under the same choices, matches torchvision.transforms.v2.functional per image, and the choices
match torchvision's samplers in distribution (tests/test_views.py checks both), except:

- ColorJitter runs in the fixed order brightness, contrast, saturation, hue; torchvision permutes the four
  per image. The factor distributions are the same.
- RandomResizedCrop resamples with bilinear, antialias off (one grid_sample for the batch). That is exactly
  torchvision's result when the crop is upsampled (CIFAR/STL, where crops are smaller than the output); when
  it is downsampled (ImageNet-size decodes) torchvision/PIL antialias and we alias.
- The flip is applied right after the crop instead of last (SeCu); every later op is flip-equivariant
  (per-pixel, global means, symmetric blur with reflect padding), so the distribution of views is unchanged.
- Rotation (off in SeCu's views; on for digits) comes right after the flip, with torchvision's RandomRotation
  sampler (angle ~ U(-d, d)) and bilinear resampling about the centre, fill 0. It is drawn after every other
  choice and only when d > 0, so views without it are exactly what they were before it existed.
- Inversion (x -> 1 - x, after grey, before blur) and additive Gaussian pixel noise (last, clamped to [0, 1])
  are not in SeCu's views nor in torchvision's pipelines; both are off unless asked for (augment.invert_p,
  augment.noise), and a view without them is exactly what it was before they existed. They exist for data
  whose light-on-dark polarity or sensor noise varies per image independently of the class: both views of an
  image share them, so a contrastive loss learns them as identity cues and k-means then splits on them
  (benchmarks/shapes_nuisance.py measured it on the shapes benchmark; docs/results.md). The noise of a sample
  comes from a counter-based hash of a per-sample key, so a view's noise is a function of its random choices
  alone, like every other op (the fixed views of `ViewPair.by_index` keep it per sample).
- Gaussian blur follows BYOL's 224-px recipe scaled to the image: kernel 10% of the side, sigma ~ U(0.1, 2.0)
  * side / 224. SeCu's PIL blur uses sigma 0.1-2 px at any size, far stronger on 32-px CIFAR; we keep the
  BYOL scale, under which blur is nearly the identity on CIFAR (as in solo-learn's CIFAR configs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, torchvision's weights
_BLUR_REF_SIDE = 224  # sigma range (0.1, 2.0) and the 23-px kernel are BYOL's values at 224 px
_BLUR_MIN_SIDE = 16  # below this a 3-tap kernel already spans a fifth of the image: skip blur


@dataclass(frozen=True)
class ViewSpec:
    """One augmentation view, BYOL/SeCu-style; defaults are SeCu's CIFAR view 1."""

    crop_scale_min: float = 0.3  # RandomResizedCrop area scale (min, max); 0.2 CIFAR-100/STL, 0.08 ImageNet
    crop_scale_max: float = 1.0  # above 1 a box may hold more than the image (zoom out, border pixels repeated)
    hflip: bool = True  # p=0.5; turn off for digits (a flipped 2 is not a 2)
    jitter_p: float = 0.8  # probability of applying ColorJitter to a sample
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 1.0  # 1.0 in view 1, 0.1 in view 2 (BYOL's asymmetry)
    solarize_p: float = 0.0  # 0.0 in view 1, 0.2 in view 2; threshold 0.5
    degrees: float = 0.0  # rotation ~ U(-degrees, degrees) about the centre; 0 = none (SeCu's views)
    invert_p: float = 0.0  # probability that a view is inverted (x -> 1 - x); 0 = never (SeCu's views)
    noise: float = 0.0  # Gaussian pixel noise of std ~ U(0, noise), in [0, 1] units, per view; 0 = none


_CROP_MIN = {"cifar100": 0.2, "cifar10": 0.3, "stl": 0.2, "imagenet": 0.08}  # SeCu's --min-crop per dataset


def secu_view_specs(dataset: str = "cifar10") -> tuple[ViewSpec, ViewSpec]:
    """SeCu's asymmetric pair: view 1 always blurred, view 2 rarely blurred but sometimes solarised.

    `dataset` is matched by substring ("cifar100-lt" -> cifar100); cifar100 is tried before cifar10.
    """
    name = dataset.lower().replace("_", "").replace("-", "")
    s_min = next((v for k, v in _CROP_MIN.items() if k in name), None)
    if s_min is None:
        raise ValueError(f"no SeCu crop scale for dataset {dataset!r}; known: {list(_CROP_MIN)}")
    return (ViewSpec(crop_scale_min=s_min, blur_p=1.0, solarize_p=0.0),
            ViewSpec(crop_scale_min=s_min, blur_p=0.1, solarize_p=0.2))


def _rand(n: int, x: Tensor, generator: torch.Generator | None, k: int | None = None) -> Tensor:
    shape = (n,) if k is None else (n, k)
    return torch.rand(shape, generator=generator, device=x.device, dtype=torch.float32)


# ---------------------------------------------------------------- random resized crop


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float] = (0.3, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """torchvision's RandomResizedCrop sampler, vectorised: (n, 4) long boxes (top, left, h, w).

    All 10 attempts are drawn for every sample at once and the first valid one is kept; samples with none
    valid fall back to the central crop clipped to the ratio range, as torchvision does.

    With scale[1] > 1 (not torchvision's) a box may be larger than the image along a side: the image then lies
    inside it at a uniform offset (top in [H - h, 0]), resized_crop repeats the border pixels around it, and the
    view is zoomed out. Every box is then valid. With scale[1] <= 1 the boxes are torchvision's exactly.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    u = torch.rand((n, 4, 10), generator=generator, device=dev)  # area, log-ratio, top, left draws
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, 0])  # (n, 10)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    ar = torch.exp(lo + (hi - lo) * u[:, 1])
    w = torch.round(torch.sqrt(area * ar))  # round half to even, like Python's round()
    h = torch.round(torch.sqrt(area / ar))
    zoom_out = scale[1] > 1
    valid = (w > 0) & (h > 0) & (zoom_out | ((w <= width) & (h <= height)))  # (n, 10)
    first = valid.int().argmax(dim=1, keepdim=True)  # first valid attempt (0 if none; masked below)
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    top = _offset(u[:, 2].gather(1, first)[:, 0], height - h)
    left = _offset(u[:, 3].gather(1, first)[:, 0], width - w)

    in_ratio = width / height  # central fallback, torchvision's rule
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    ok = valid.any(dim=1)
    # Tensor.where with a Python scalar fills on the device: no host -> device copy (a stream sync on a GPU)
    return torch.stack([top.where(ok, (height - fh) // 2), left.where(ok, (width - fw) // 2), h.where(ok, fh),
                        w.where(ok, fw)], dim=1).long()  # (n, 4)


def _offset(u: Tensor, room: Tensor) -> Tensor:
    """Uniform integer offset of a box with `room` = image side - box side: in {0..room}, or {room..0} when the
    box is the larger (room < 0). floor(U * count) is uniform on {0..count-1}; the clamp guards U * count
    rounding up to count in float32."""
    off = torch.minimum(torch.floor(u * (room.abs() + 1)), room.abs())
    return torch.where(room >= 0, off, -off)


def resized_crop(images: Tensor, boxes: Tensor, out_size: int) -> Tensor:
    """Crop each image to its box and resize to (out_size, out_size), bilinear, in one grid_sample.

    Equals torchvision's crop-then-resize (antialias=False): sample positions follow interpolate's
    align_corners=False rule, src = (j + 0.5) * w / out - 0.5, clamped to the box so edge pixels replicate the
    box's border instead of blending in pixels outside it.
    """
    B, _, H, W = images.shape
    b = boxes.to(device=images.device, dtype=torch.float32)
    top, left, h, w = b.unbind(dim=1)  # each (B,)
    j = torch.arange(out_size, device=images.device, dtype=torch.float32) + 0.5  # (out,)
    xs = (left[:, None] + (j * (w / out_size)[:, None] - 0.5).clamp(min=0)).minimum((left + w - 1)[:, None])
    ys = (top[:, None] + (j * (h / out_size)[:, None] - 0.5).clamp(min=0)).minimum((top + h - 1)[:, None])
    gx = (2 * xs + 1) / W - 1  # pixel index -> grid_sample's [-1, 1] with align_corners=False, (B, out)
    gy = (2 * ys + 1) / H - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, out, out, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------- per-sample ops; factors and masks are (B,)


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image counter-clockwise by degrees[i] about its centre, bilinear, fill 0: torchvision's
    rotate(interpolation=BILINEAR) per image, as one affine_grid + grid_sample for the batch."""
    B, _, H, W = x.shape
    a = torch.deg2rad(degrees.to(device=x.device, dtype=torch.float32))
    c, s = torch.cos(a), torch.sin(a)
    # The inverse map (output pixel -> input pixel) of a counter-clockwise turn, in grid_sample's normalised
    # coordinates: x and y are scaled by W/2 and H/2, hence the aspect factors on the off-diagonal terms.
    zero = torch.zeros_like(c)
    theta = torch.stack([torch.stack([c, -s * H / W, zero], dim=1), torch.stack([s * W / H, c, zero], dim=1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), [B, x.shape[1], H, W], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _col(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1), broadcasts over C, H, W


def hflip(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(_col(mask), x.flip(-1), x)


def grayscale(x: Tensor) -> Tensor:
    """Luma, (B, 1, H, W); the identity for one channel."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def random_grayscale(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(_col(mask), grayscale(x).expand_as(x), x)  # kept at C channels


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * _col(f)).clamp(0, 1)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1): blend towards the mean grey
    return (_col(f) * x + (1 - _col(f)) * mean).clamp(0, 1)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (_col(f) * x + (1 - _col(f)) * grayscale(x)).clamp(0, 1)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate hue by f (in turns, |f| <= 0.5): RGB -> HSV, shift, -> RGB, all elementwise."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)  # (B, H, W) each
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    d = maxc - minc
    s = d / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    dd = torch.where(d > 0, d, torch.ones_like(d))  # grey pixels: h = 0 whatever the numerator
    rc, gc, bc = (maxc - r) / dd, (maxc - g) / dd, (maxc - b) / dd
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))  # same tie order as tv
    h6 = torch.remainder(h / 6 + f.view(-1, 1, 1), 1.0) * 6
    # HSV -> RGB without a lookup table: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1),
    # k = (n + 6h) mod 6
    k = torch.remainder(torch.stack([5 + h6, 3 + h6, 1 + h6], dim=1), 6)  # (B, 3, H, W)
    v, s = maxc.unsqueeze(1), s.unsqueeze(1)
    return (v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)).clamp(0, 1)


def blur_kernel_size(side: int) -> int:
    """~10% of the side, odd, >= 3 (23 at 224 px, BYOL's value)."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Per-sample sigma (B,), separable, reflect padding; one grouped conv per axis for the whole batch."""
    B, C, H, W = x.shape
    lim = (kernel_size - 1) / (2 * math.sqrt(2))  # torchvision's kernel: exp(-i^2 / (2 sigma^2)), normalised
    t = torch.linspace(-lim, lim, kernel_size, device=x.device, dtype=x.dtype)
    k1 = torch.softmax(-(t[None, :] / sigma[:, None]).pow(2), dim=1)  # (B, k)
    wgt = k1.repeat_interleave(C, dim=0)[:, None, None, :]  # (B*C, 1, 1, k), one filter per channel
    p = kernel_size // 2
    y = x.reshape(1, B * C, H, W)  # samples become channel groups
    y = F.conv2d(F.pad(y, (p, p, 0, 0), mode="reflect"), wgt, groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, p, p), mode="reflect"), wgt.transpose(2, 3), groups=B * C)
    return y.reshape(B, C, H, W)


def solarize(x: Tensor, mask: Tensor, threshold: float = 0.5) -> Tensor:
    return torch.where(_col(mask) & (x >= threshold), 1 - x, x)


# ---------------------------------------------------------------- views


def _to_unit(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    return images.float()  # already in [0, 1]


def _normalise(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    # Tensors already on x's device pass through as_tensor untouched; Python numbers are copied in (a stream
    # sync on a GPU): the training loop's ViewPair hands over device tensors.
    m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


class ViewParams(NamedTuple):
    """Every random choice of one view of a batch, per sample (B,): drawn first, then applied in one pass."""

    boxes: Tensor  # (B, 4) long crop boxes (top, left, h, w)
    flip: Tensor  # bool
    brightness: Tensor  # ColorJitter factors; 1 where jitter is not applied
    contrast: Tensor
    saturation: Tensor
    hue: Tensor  # in turns, 0 where jitter is not applied
    gray: Tensor  # bool
    blur: Tensor  # bool; always false below _BLUR_MIN_SIDE
    sigma: Tensor  # blur sigma in px of the output
    solarize: Tensor  # bool
    angle: Tensor | None = None  # degrees, counter-clockwise; None when the spec does not rotate
    invert: Tensor | None = None  # bool; None when the spec never inverts
    noise: Tensor | None = None  # std of the pixel noise; None when the spec adds none
    noise_key: Tensor | None = None  # int64 per-sample key of the noise's hash; None without noise


def _factor(u: Tensor, amount: float, on: Tensor) -> Tensor:
    # ColorJitter's U(max(0, 1 - a), 1 + a); 1 (the identity) where jitter is not applied
    lo = max(0.0, 1.0 - amount)
    return torch.where(on, lo + (1.0 + amount - lo) * u, torch.ones_like(u))


def sample_params(n: int, height: int, width: int, out: int, spec: ViewSpec,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None) -> ViewParams:
    """One view's random choices for n images of (height, width) cropped to (out, out).

    Every number comes from `generator` (on `device`) in a fixed order, whatever the spec's probabilities, so a
    seed fixes the view. Rotation angles come last and only when the spec rotates, then the noise's std and keys
    only when it adds noise; inversion reads the spare column of the draws every spec makes."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    boxes = crop_boxes(n, height, width, (spec.crop_scale_min, spec.crop_scale_max), generator=generator, device=dev)
    u = torch.rand((n, 6), generator=generator, device=dev)  # flip, jitter, gray, blur, solarize, invert
    f = torch.rand((5, n), generator=generator, device=dev)  # brightness, contrast, saturation, hue, sigma
    on = u[:, 1] < spec.jitter_p
    angle = (2 * torch.rand(n, generator=generator, device=dev) - 1) * spec.degrees if spec.degrees > 0 else None
    noise = key = None
    if spec.noise > 0:
        noise = torch.rand(n, generator=generator, device=dev) * spec.noise
        key = torch.randint(0, 2**31 - 1, (n,), generator=generator, device=dev)
    return ViewParams(
        boxes=boxes, flip=(u[:, 0] < 0.5) & spec.hflip,
        brightness=_factor(f[0], spec.brightness, on), contrast=_factor(f[1], spec.contrast, on),
        saturation=_factor(f[2], spec.saturation, on),
        hue=torch.where(on, (2 * f[3] - 1) * spec.hue, torch.zeros_like(f[3])),
        gray=u[:, 2] < spec.gray_p, blur=(u[:, 3] < spec.blur_p) & (out >= _BLUR_MIN_SIDE),
        sigma=(0.1 + 1.9 * f[4]) * out / _BLUR_REF_SIDE, solarize=u[:, 4] < spec.solarize_p,
        angle=angle, invert=u[:, 5] < spec.invert_p if spec.invert_p > 0 else None, noise=noise, noise_key=key)


_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (two rounds of xorshift-multiply) of int64 values in [0, 2^32): every intermediate
    stays below 2^63, so no signed overflow on any device."""
    for mult in (0x7FEB352D, 0x46CA68B5):
        x = ((x ^ (x >> 16)) * mult) & _MASK32
    return x ^ (x >> 16)


def hashed_normal(key: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Standard normal noise (B, *shape), float32, on key's device: row i a function of key[i] alone
    (Box-Muller on two hashed uniforms per element), so a sample's noise does not depend on its batch."""
    count = math.prod(shape)
    j = torch.arange(count, device=key.device, dtype=torch.int64)
    base = _hash32((key.long()[:, None] * 0x9E3779B1 & _MASK32) ^ j[None, :])  # (B, count)
    u1 = (_hash32(base ^ 0x5BD1E995).float() + 0.5) / 2**32  # in (0, 1): log is finite
    u2 = (_hash32(base ^ 0x1B873593).float() + 0.5) / 2**32
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).view(-1, *shape)


def apply_params(x: Tensor, p: ViewParams, out: int) -> Tensor:
    """[0, 1] float (B, C, H, W) -> the view (B, C, out, out) in [0, 1], before normalisation."""
    x = resized_crop(x, p.boxes, out)
    x = hflip(x, p.flip)
    if p.angle is not None:
        x = rotate(x, p.angle)
    x = adjust_brightness(x, p.brightness)
    x = adjust_contrast(x, p.contrast)
    if x.shape[1] == 3:  # one channel has no saturation or hue
        x = adjust_hue(adjust_saturation(x, p.saturation), p.hue)
    x = random_grayscale(x, p.gray)
    if p.invert is not None:
        x = torch.where(_col(p.invert), 1 - x, x)
    if out >= _BLUR_MIN_SIDE:
        # unblurred samples get sigma -> 0, whose kernel is an exact delta (softmax underflows to one-hot), so
        # the whole batch shares one conv
        x = gaussian_blur(x, torch.where(p.blur, p.sigma, torch.full_like(p.sigma, 1e-6)), blur_kernel_size(out))
    x = solarize(x, p.solarize)
    if p.noise is not None:
        x = (x + _col(p.noise) * hashed_normal(p.noise_key, tuple(x.shape[1:]))).clamp_(0, 1)
    return x


def augment(images: Tensor, spec: ViewSpec, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
            generator: torch.Generator | None = None, out_size: int | None = None) -> Tensor:
    """uint8 (or [0, 1] float) (B, C, H, W) on any device -> normalised float32 (B, C, out, out)."""
    x = _to_unit(images)
    B, _, H, W = x.shape
    out = out_size if out_size is not None else min(H, W)
    p = sample_params(B, H, W, out, spec, generator, x.device)
    return _normalise(apply_params(x, p, out), mean, std)


def two_views(images: Tensor, specs: tuple[ViewSpec, ViewSpec], mean: Sequence[float] | Tensor,
              std: Sequence[float] | Tensor,
              generator: torch.Generator | None = None, out_size: int | None = None) -> tuple[Tensor, Tensor]:
    """The two views of a batch, drawn one after the other from the same generator."""
    return (augment(images, specs[0], mean, std, generator, out_size),
            augment(images, specs[1], mean, std, generator, out_size))


def eval_view(images: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor,
              out_size: int | None = None) -> Tensor:
    """Deterministic view: resize to (out, out) if the size differs (bilinear, antialiased), normalise."""
    x = _to_unit(images)
    if out_size is not None and tuple(x.shape[-2:]) != (out_size, out_size):
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=True)
    return _normalise(x, mean, std)

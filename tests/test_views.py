"""Batched views against torchvision's per-image ops, and the samplers' distributions."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2.functional as TF

from djc.data import views as V

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture
def x() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 20, 24, generator=g)


def _per_image(fn, x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    return torch.stack([fn(x[i], f) for i, f in enumerate(factors)])


# ---------------------------------------------------------------- deterministic ops, exact


def test_hflip_grayscale_solarize(x: torch.Tensor) -> None:
    mask = torch.tensor([True, False, True, True, False, False])
    ref = torch.stack([TF.hflip(im) if m else im for im, m in zip(x, mask)])
    torch.testing.assert_close(V.hflip(x, mask), ref, atol=1e-5, rtol=0)
    ref = torch.stack([TF.rgb_to_grayscale(im, 3) if m else im for im, m in zip(x, mask)])
    torch.testing.assert_close(V.random_grayscale(x, mask), ref, atol=1e-5, rtol=0)
    ref = torch.stack([TF.solarize(im, 0.5) if m else im for im, m in zip(x, mask)])
    torch.testing.assert_close(V.solarize(x, mask), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,factors", [
    ("brightness", [0.6, 1.0, 1.4, 0.8, 1.2, 0.0]),
    ("contrast", [0.6, 1.0, 1.4, 0.8, 1.2, 0.0]),
    ("saturation", [0.8, 1.0, 1.2, 0.0, 2.0, 0.5]),
])
def test_color_factors_match_torchvision(x: torch.Tensor, name: str, factors: list[float]) -> None:
    ours = getattr(V, f"adjust_{name}")(x, torch.tensor(factors))
    ref = _per_image(getattr(TF, f"adjust_{name}"), x, factors)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_hue_matches_torchvision(x: torch.Tensor) -> None:
    factors = [-0.5, -0.1, 0.0, 0.05, 0.1, 0.5]
    x = x.clone()
    x[0, :, :4] = 0.3  # grey pixels (max == min) and ties between channels take special branches
    x[1, 0, :4] = x[1, 1, :4]
    ours = V.adjust_hue(x, torch.tensor(factors))
    torch.testing.assert_close(ours, _per_image(TF.adjust_hue, x, factors), atol=1e-5, rtol=0)


def test_one_channel_jitter(x: torch.Tensor) -> None:
    g = x[:, :1]
    f = torch.tensor([0.6, 1.0, 1.4, 0.8, 1.2, 0.3])
    torch.testing.assert_close(V.adjust_contrast(g, f), _per_image(TF.adjust_contrast, g, f.tolist()),
                               atol=1e-5, rtol=0)
    assert torch.equal(V.adjust_saturation(g, f), g) and torch.equal(V.adjust_hue(g, f - 1), g)


def test_gaussian_blur_matches_torchvision(x: torch.Tensor) -> None:
    sigmas = [0.3, 0.7, 1.0, 1.5, 2.0, 3.0]
    for k in (3, 5, 9):
        ours = V.gaussian_blur(x, torch.tensor(sigmas), k)
        ref = torch.stack([TF.gaussian_blur(im, [k, k], [s, s]) for im, s in zip(x, sigmas)])
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # a vanishing sigma is an exact identity: how unblurred samples share the batch's conv
    assert torch.equal(V.gaussian_blur(x, torch.full((6,), 1e-6), 5), x)


@pytest.mark.parametrize("out", [32, 8])  # upsampling (CIFAR crops) and downsampling
def test_resized_crop_matches_torchvision(x: torch.Tensor, out: int) -> None:
    boxes = torch.tensor([[0, 0, 20, 24], [3, 5, 10, 12], [10, 12, 10, 12], [0, 17, 7, 7], [13, 0, 7, 9],
                          [5, 6, 11, 11]])
    ours = V.resized_crop(x, boxes, out)
    ref = torch.stack([TF.resized_crop(im, *b.tolist(), size=[out, out], antialias=False)
                       for im, b in zip(x, boxes)])
    # both follow interpolate's align_corners=False rule, so they agree downsampling too
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- samplers


def _tv_boxes(n: int, h: int, w: int, scale: tuple[float, float]) -> torch.Tensor:
    img = torch.empty(3, h, w)
    return torch.tensor([T1.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3]) for _ in range(n)])


@pytest.mark.parametrize("hw,s_min", [((32, 32), 0.3), ((32, 32), 0.08), ((20, 40), 0.2)])
def test_crop_box_distribution(hw: tuple[int, int], s_min: float) -> None:
    H, W = hw
    torch.manual_seed(0)
    n = 20_000
    ours = V.crop_boxes(n, H, W, (s_min, 1.0), generator=torch.Generator().manual_seed(1))
    ref = _tv_boxes(n, H, W, (s_min, 1.0))
    top, left, h, w = ours.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    frac, ref_frac = (h * w).float() / (H * W), (ref[:, 2] * ref[:, 3]).float() / (H * W)
    # rounding the sides to pixels moves the area a little below s_min
    assert frac.min() >= s_min - 0.05 and frac.max() <= 1.0
    assert abs(frac.mean() - ref_frac.mean()) < 0.01
    assert abs(frac.std() - ref_frac.std()) < 0.01
    assert abs((w / h).float().mean() - (ref[:, 3] / ref[:, 2]).float().mean()) < 0.01


def test_crop_aspect_ratio_range() -> None:
    b = V.crop_boxes(5000, 224, 224, (0.08, 1.0), generator=torch.Generator().manual_seed(0))
    r = b[:, 3].float() / b[:, 2].float()
    assert r.min() >= 3 / 4 - 0.03 and r.max() <= 4 / 3 + 0.03
    lr = r.log()  # log-uniform: both ends reached, mean near 0
    assert lr.min() < math.log(3 / 4) + 0.02 and lr.max() > math.log(4 / 3) - 0.02 and abs(lr.mean()) < 0.02


def test_zoomed_out_boxes_hold_the_image_and_shrink_what_is_in_it() -> None:
    n = 20_000
    b = V.crop_boxes(n, 32, 32, (0.6, 2.0), generator=torch.Generator().manual_seed(0))
    top, left, h, w = b.unbind(1)
    area = (h * w).float() / 32**2
    assert area.min() > 0.55 and area.max() < 2.1 and abs(area.mean().item() - 1.3) < 0.02
    big_h, big_w = h > 32, w > 32
    assert big_h.float().mean() > 0.3  # most boxes zoom out along some side
    assert ((top <= 0) & (top + h >= 32))[big_h].all() and ((left <= 0) & (left + w >= 32))[big_w].all()
    assert ((top >= 0) & (top + h <= 32))[~big_h].all() and ((left >= 0) & (left + w <= 32))[~big_w].all()
    # the image's offset inside a larger box is uniform: a centred box on average
    assert abs((top[big_h] + h[big_h] / 2 - 16).float().mean().item()) < 0.2
    # A white square in the middle of a black image: zoomed out 2x it covers a quarter of the pixels it covered
    x = torch.zeros(1, 1, 32, 32)
    x[..., 8:24, 8:24] = 1
    out = V.resized_crop(x, torch.tensor([[-16, -16, 64, 64]]), 32)
    assert out.sum().item() == pytest.approx(x.sum().item() / 4, rel=0.05)
    assert out[..., :8, :].abs().max() == 0  # the black border repeated around the image


def test_crop_fallback_is_central() -> None:
    # scale (0.99, 1) at ratios 3/4-4/3 never fits a 30 x 100 image (h >= 47): every sample takes the fallback,
    # clipped to ratio 4/3 on a wide image
    b = V.crop_boxes(4, 30, 100, (0.99, 1.0), generator=torch.Generator().manual_seed(0))
    assert (b == torch.tensor([0, 30, 30, 40])).all()


def _only(**kw) -> V.ViewSpec:
    # crop scale 1 on a square image is the whole image, so one op is isolated
    off = dict(crop_scale_min=1.0, hflip=False, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)
    return V.ViewSpec(**{**off, **kw})


def _u8(n: int, c: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, side, side), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_flip_and_gray_rates() -> None:
    u8, n = _u8(4000, side=8), 4000
    x = u8.float() / 255
    view = V.augment(u8, _only(hflip=True), (0, 0, 0), (1, 1, 1), torch.Generator().manual_seed(0))
    same = (view - x).abs().amax(dim=(1, 2, 3)) < 1e-4
    flipped = (view - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-4
    assert (same ^ flipped).all() and abs(flipped.float().mean() - 0.5) < 0.03
    view = V.augment(u8, _only(gray_p=0.2), (0, 0, 0), (1, 1, 1), torch.Generator().manual_seed(0))
    gray = (view.amax(dim=1) - view.amin(dim=1)).amax(dim=(1, 2)) < 1e-6
    assert abs(gray.float().mean() - 0.2) < 0.03 and n == len(gray)


def test_identity_spec_is_normalised_input() -> None:
    u8 = _u8(8)
    view = V.augment(u8, _only(), MEAN, STD, torch.Generator().manual_seed(0))
    torch.testing.assert_close(view, V.eval_view(u8, MEAN, STD), atol=1e-4, rtol=0)


def test_reproducible_shape_and_dtype() -> None:
    u8 = _u8(16, side=32)
    specs = V.secu_view_specs("cifar100-lt")
    assert specs[0].crop_scale_min == 0.2 and specs[1].solarize_p == 0.2 and specs[1].blur_p == 0.1
    a1, a2 = V.two_views(u8, specs, MEAN, STD, torch.Generator().manual_seed(3), out_size=24)
    b1, b2 = V.two_views(u8, specs, MEAN, STD, torch.Generator().manual_seed(3), out_size=24)
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    assert a1.shape == (16, 3, 24, 24) and a1.dtype == torch.float32 and torch.isfinite(a1).all()
    c1, _ = V.two_views(u8, specs, MEAN, STD, torch.Generator().manual_seed(4), out_size=24)
    assert not torch.equal(a1, c1)
    assert V.eval_view(u8, MEAN, STD, out_size=16).shape == (16, 3, 16, 16)


def test_digits_one_channel_small() -> None:
    u8 = _u8(10, c=1, side=8)
    spec = V.ViewSpec(hflip=False, blur_p=1.0, solarize_p=0.5)
    v = V.augment(u8, spec, (0.13,), (0.31,), torch.Generator().manual_seed(0))
    assert v.shape == (10, 1, 8, 8) and torch.isfinite(v).all()
    # blur is skipped below 16 px: with nothing else on, the view is the input
    v = V.augment(u8, _only(blur_p=1.0), (0.0,), (1.0,), torch.Generator().manual_seed(0))
    torch.testing.assert_close(v, u8.float() / 255, atol=1e-4, rtol=0)


def test_secu_view_specs() -> None:
    assert V.secu_view_specs()[0] == V.ViewSpec()
    assert V.secu_view_specs("stl10")[0].crop_scale_min == 0.2
    assert V.secu_view_specs("imagenet")[1].crop_scale_min == 0.08
    with pytest.raises(ValueError):
        V.secu_view_specs("mnist")


# ---------------------------------------------------------------- whole views against torchvision


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import ks_2samp

    return float(ks_2samp(a.numpy(), b.numpy()).statistic)


@pytest.mark.parametrize("degrees", [0.0, 20.0])
def test_a_whole_view_equals_torchvision_per_image_under_the_same_choices(degrees: float) -> None:
    u8 = _u8(12, side=40, seed=3)[..., :36]  # 40 x 36: crops both up- and downsampled to 32
    spec = V.ViewSpec(crop_scale_min=0.2, gray_p=0.4, blur_p=0.5, solarize_p=0.5, degrees=degrees)
    out = 32
    p = V.sample_params(12, 40, 36, out, spec, torch.Generator().manual_seed(5))
    assert p.flip.any() and p.gray.any() and p.blur.any() and p.solarize.any() and (p.brightness == 1).any()
    ours = V.augment(u8, spec, MEAN, STD, torch.Generator().manual_seed(5), out_size=out)
    k = V.blur_kernel_size(out)
    ref = []
    for i, im in enumerate(u8.float() / 255):
        im = TF.resized_crop(im, *p.boxes[i].tolist(), size=[out, out], antialias=False)
        im = TF.hflip(im) if p.flip[i] else im
        im = TF.rotate(im, float(p.angle[i]), interpolation=TF.InterpolationMode.BILINEAR) if degrees else im
        im = TF.adjust_brightness(im, float(p.brightness[i]))
        im = TF.adjust_contrast(im, float(p.contrast[i]))
        im = TF.adjust_saturation(im, float(p.saturation[i]))
        im = TF.adjust_hue(im, float(p.hue[i]))
        im = TF.rgb_to_grayscale(im, 3) if p.gray[i] else im
        im = TF.gaussian_blur(im, [k, k], [float(p.sigma[i])] * 2) if p.blur[i] else im
        im = TF.solarize(im, 0.5) if p.solarize[i] else im
        ref.append(TF.normalize(im, list(MEAN), list(STD)))
    torch.testing.assert_close(ours, torch.stack(ref), atol=2e-4, rtol=0)


def test_rotate_matches_torchvision(x: torch.Tensor) -> None:
    angles = torch.tensor([0.0, 13.0, -30.0, 90.0, 7.5, -179.0])
    ours = V.rotate(x, angles)  # 20 x 24: the aspect correction matters
    ref = torch.stack([TF.rotate(x[i], float(a), interpolation=TF.InterpolationMode.BILINEAR)
                       for i, a in enumerate(angles)])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_rotation_angles_are_uniform_and_leave_other_choices_unchanged() -> None:
    n = 20_000
    plain = V.sample_params(n, 8, 8, 8, V.ViewSpec(), torch.Generator().manual_seed(1))
    turned = V.sample_params(n, 8, 8, 8, V.ViewSpec(degrees=15.0), torch.Generator().manual_seed(1))
    assert plain.angle is None  # no rotation, no draw: views without it are as before it existed
    for name in V.ViewParams._fields:
        if name != "angle" and getattr(plain, name) is not None:
            assert torch.equal(getattr(plain, name), getattr(turned, name)), name
    assert turned.angle.abs().max() <= 15.0
    torch.manual_seed(0)
    ref = torch.tensor([T1.RandomRotation.get_params([-15.0, 15.0]) for _ in range(n)])
    assert _ks(turned.angle, ref) < 0.03


def test_inversion_and_noise_leave_the_other_choices_unchanged_and_do_what_they_say() -> None:
    n = 20_000
    plain = V.sample_params(n, 8, 8, 8, V.ViewSpec(degrees=15.0), torch.Generator().manual_seed(1))
    both = V.sample_params(n, 8, 8, 8, V.ViewSpec(degrees=15.0, invert_p=0.3, noise=0.1),
                           torch.Generator().manual_seed(1))
    assert plain.invert is None and plain.noise is None and plain.noise_key is None  # off: views as before
    for name in V.ViewParams._fields:
        if getattr(plain, name) is not None:
            assert torch.equal(getattr(plain, name), getattr(both, name)), name
    assert abs(both.invert.float().mean().item() - 0.3) < 0.015
    assert both.noise.min() >= 0 and both.noise.max() <= 0.1 and _ks(both.noise, 0.1 * torch.rand(n)) < 0.03

    u8 = _u8(6)
    x = u8.float() / 255
    inverted = V.augment(u8, _only(invert_p=1.0), (0, 0, 0), (1, 1, 1), torch.Generator().manual_seed(0))
    torch.testing.assert_close(inverted, 1 - x, atol=1e-6, rtol=0)

    # Noise on mid-grey images (no clamping): each sample's residual has the std it drew, and a sample's noise
    # is its own whatever batch it is applied in (the fixed views of ViewPair.by_index index the choices).
    grey = torch.full((64, 3, 32, 32), 0.5)
    p = V.sample_params(64, 32, 32, 32, _only(noise=0.2), torch.Generator().manual_seed(2))
    resid = V.apply_params(grey, p, 32) - grey
    torch.testing.assert_close(resid.flatten(1).std(dim=1), p.noise, atol=0.012, rtol=0.05)
    assert abs(resid.mean().item()) < 2e-3
    rows = torch.tensor([5, 40, 7])
    alone = V.apply_params(grey[rows], V.ViewParams(*(None if t is None else t[rows] for t in p)), 32)
    torch.testing.assert_close(alone, V.apply_params(grey, p, 32)[rows], atol=0, rtol=0)
    z = V.hashed_normal(torch.arange(256), (3, 32, 32))
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    assert _ks(z.flatten()[:20_000], torch.randn(20_000, generator=torch.Generator().manual_seed(0))) < 0.02


@pytest.mark.parametrize("view", [0, 1])
def test_random_choices_follow_torchvision_samplers(view: int) -> None:
    spec = V.secu_view_specs("cifar10")[view]
    n, out = 20_000, 96
    p = V.sample_params(n, out, out, out, spec, torch.Generator().manual_seed(view))
    rates = {"flip": p.flip, "gray": p.gray, "blur": p.blur, "solarize": p.solarize, "jitter": p.brightness != 1}
    expect = {"flip": 0.5, "gray": spec.gray_p, "blur": spec.blur_p, "solarize": spec.solarize_p,
              "jitter": spec.jitter_p}
    for name, mask in rates.items():
        assert abs(mask.float().mean().item() - expect[name]) < 0.015, name
    torch.manual_seed(view)
    jit = [T1.ColorJitter.get_params([1 - spec.brightness, 1 + spec.brightness], [1 - spec.contrast,
                                     1 + spec.contrast], [1 - spec.saturation, 1 + spec.saturation],
                                     [-spec.hue, spec.hue])[1:] for _ in range(n)]
    ref = torch.tensor(jit)  # (n, 4) brightness, contrast, saturation, hue
    on = rates["jitter"]
    for j, ours in enumerate((p.brightness, p.contrast, p.saturation, p.hue)):
        assert _ks(ours[on], ref[:, j]) < 0.03, j
    lo, hi = 0.1 * out / 224, 2.0 * out / 224  # BYOL's sigma range, scaled to the side
    sig = torch.tensor([T1.GaussianBlur.get_params(lo, hi) for _ in range(n)])
    assert _ks(p.sigma[p.blur], sig) < 0.03

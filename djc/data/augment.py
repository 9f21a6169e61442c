"""The two training views of a step, made on the training device from the run's augment settings.

The batched ops live in djc/data/views.py; this is the pair a training step uses: SeCu's asymmetric CIFAR
views scaled by `augment.*` (augment.policy=crop_flip keeps only their crop and flip; none, the plain view twice),
seeded by (seed, step, rank) so that a resumed run sees the same views.
"""

from __future__ import annotations

import torch
from torch import Tensor

from djc.config import Config
from djc.data import views
from djc.methods.base import ClusteringMethod


class ViewPair:
    """Two augmented views of a uint8 batch, made on the training device (the loader only decodes)."""

    def __init__(self, cfg: Config, mean: list[float], std: list[float], image_side: int):
        a = cfg.augment
        v1, v2 = views.secu_view_specs("cifar10")
        scale = a.strength

        def adapt(v: views.ViewSpec) -> views.ViewSpec:
            if a.policy == "crop_flip":  # the colour and blur ops all off: each draws, none applies
                return views.ViewSpec(crop_scale_min=a.crop_scale_min, crop_scale_max=a.crop_scale_max, hflip=a.hflip,
                                      jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0, degrees=a.degrees)
            return views.ViewSpec(
                crop_scale_min=a.crop_scale_min, crop_scale_max=a.crop_scale_max, hflip=a.hflip, jitter_p=v.jitter_p,
                brightness=v.brightness * scale, contrast=v.contrast * scale,
                saturation=v.saturation * scale, hue=min(0.5, v.hue * scale),
                gray_p=a.gray_p, blur_p=v.blur_p, solarize_p=v.solarize_p, degrees=a.degrees,
                invert_p=a.invert_p, noise=a.noise,
            )

        self.specs = (adapt(v1), adapt(v2))
        self.plain = a.policy == "none"
        self.mean, self.std = mean, std
        self.out = a.out_size or image_side
        self.seed = cfg.seed
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}  # mean, std copied once per device

    def _on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._stats:
            self._stats[device] = (torch.tensor(self.mean, device=device), torch.tensor(self.std, device=device))
        return self._stats[device]

    def train(self, images: Tensor, step: int, rank: int) -> tuple[Tensor, Tensor]:
        # Seeded by (seed, step, rank): reproducible and resumable without saving generator state.
        g = torch.Generator(device=images.device).manual_seed((self.seed * 1_000_003 + step) * 4099 + rank)
        return views.two_views(images, self.specs, *self._on(images.device), generator=g, out_size=self.out)

    def eval(self, images: Tensor) -> Tensor:
        return views.eval_view(images, *self._on(images.device), out_size=self.out)

    def for_batch(self, method: ClusteringMethod, batch: dict, device: torch.device, step: int,
                  rank: int) -> tuple[Tensor, Tensor]:
        """The two inputs of a training step from a loader batch (djc/features.py's views take the same call)."""
        # non_blocking: a blocking host -> GPU copy synchronises the stream
        return self.for_method(method, batch["image"].to(device, non_blocking=True), step, rank)

    def by_index(self, images: Tensor, index: Tensor, num_samples: int) -> Tensor:
        """The first training view of each image, its random choices drawn from (seed, dataset index) alone: the
        same view of a sample whatever its batch or worker (the selection score's stability, djc/selection.py).
        The choices of all `num_samples` are drawn at once (~15 numbers each) and kept."""
        H, W = images.shape[-2:]
        key = (num_samples, H, W)
        if getattr(self, "_fixed", (None,))[0] != key:
            g = torch.Generator().manual_seed(self.seed)
            self._fixed = (key, views.sample_params(num_samples, H, W, self.out, self.specs[0], g))
        rows = index.cpu()
        p = views.ViewParams(*(None if t is None else t[rows].to(images.device) for t in self._fixed[1]))
        return views._normalise(views.apply_params(views._to_unit(images), p, self.out), *self._on(images.device))

    def for_method(self, method: ClusteringMethod, images: Tensor, step: int, rank: int) -> tuple[Tensor, Tensor]:
        """The two inputs of a training step: augmented views, or the plain view twice (autoencoders, and
        augment.policy=none)."""
        if not method.augmented or self.plain:
            x = self.eval(images)
            return x, x
        return self.train(images, step, rank)

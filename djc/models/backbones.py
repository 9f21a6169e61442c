"""Backbones: a feature extractor f(x) -> (B, feat_dim), chosen by `model.backbone`.

smallconv suits 8x8 digits and 28x28 inputs; conv4 is a four-stage convnet for 32 px on a CPU budget (the
shapes benchmark); resnet18_cifar is ResNet-18 with the CIFAR stem (3x3 conv,
stride 1, no max-pool), the standard for 32 px clustering; resnet50 is torchvision's, for 224 px ImageNet;
torchvision:<name> and timm:<name> are the libraries' (djc/models/zoo.py). Every plain BatchNorm is a
GlobalBatchNorm so the statistics are over the global batch. `build_encoder` is what a method builds: the
backbone with model.weights loaded (djc/models/weights.py) and model.freeze applied (djc/models/freeze.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from djc.models import freeze, weights, zoo
from djc.models.norm import globalize_batchnorm


class Backbone(NamedTuple):
    net: nn.Module
    feat_dim: int
    notes: tuple[str, ...] = ()  # what loading model.weights left out, for the driver to print


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_convnet(in_channels: int, width: int) -> Backbone:
    # Two 3x3 stages then global pooling: at 8x8 the receptive field already covers the digit.
    w = width
    net = nn.Sequential(
        *_conv_bn(in_channels, w), *_conv_bn(w, w), nn.MaxPool2d(2),
        *_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    return Backbone(net, 2 * w)


def conv4(in_channels: int, width: int) -> Backbone:
    """Four conv-BN-ReLU stages of width w, 2w, 4w, 8w with a 2x2 max-pool between them, then global pooling:
    at 32 px the last stage sees 4x4 cells whose receptive field spans the image, so a whole object's shape
    (not only its edges) reaches the features. At w = 32: 15 M multiply-adds per 32-px image, 1.7 ms for its
    forward and backward on one CPU thread (ResNet-18's CIFAR stem: 0.56 G, ~40x more)."""
    layers: list[nn.Module] = []
    c = in_channels
    for k, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += _conv_bn(c, out) + ([nn.MaxPool2d(2)] if k < 3 else [])
        c = out
    return Backbone(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), c)


def mlp(in_dim: int, width: int) -> Backbone:
    net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                        nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True))
    return Backbone(net, width)


def resnet(depth: int, in_channels: int, cifar_stem: bool) -> Backbone:
    import torchvision  # heavy import, only when a ResNet is asked for

    net = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth](weights=None)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return Backbone(net, feat_dim)


def build_backbone(name: str, image_shape: tuple[int, int, int], width: int = 64) -> Backbone:
    """`image_shape` is (H, W, C) of the backbone's input (the views' output)."""
    h, w, c = image_shape
    if zoo.library(name):
        bb = Backbone(*zoo.build(name, c, h))
    elif name == "smallconv":
        bb = small_convnet(c, width)
    elif name == "conv4":
        bb = conv4(c, width)
    elif name == "mlp":
        bb = mlp(h * w * c, width)
    elif name == "resnet18_cifar":
        bb = resnet(18, c, cifar_stem=True)
    elif name == "resnet50":
        bb = resnet(50, c, cifar_stem=False)
    else:
        raise ValueError(f"unknown model.backbone '{name}'")
    return Backbone(globalize_batchnorm(bb.net), bb.feat_dim)


def build_encoder(model, image_shape: tuple[int, int, int]) -> Backbone:
    """The run's backbone from its `model` section (djc.models.settings.ModelConfig): built for inputs of
    `image_shape` (H, W, C), its weights loaded from model.weights, frozen as model.freeze says."""
    bb = build_backbone(model.backbone, image_shape, model.width)
    notes = weights.load_into(bb.net, model.weights, model.backbone, model.weights_key) if model.weights else []
    if model.weights_head:
        state, (dim_in, hidden, dim_out) = weights.run_dir_head(model.weights)
        if dim_in != bb.feat_dim:
            raise weights.WeightsError(f"model.weights_head: the projection head of {model.weights} takes {dim_in} "
                                       f"features, model.backbone={model.backbone} gives {bb.feat_dim}")
        head = projection_head(dim_in, hidden, dim_out)
        head.load_state_dict(state)
        bb = Backbone(PretextEncoder(bb.net, head), dim_out)
        notes.append(f"with its projection head ({dim_in} -> {hidden} -> {dim_out}, normalised): the features")
    freeze.apply(bb.net, model.freeze, model.backbone)
    return Backbone(bb.net, bb.feat_dim, tuple(notes))


class PretextEncoder(nn.Module):
    """A pretext run's backbone followed by its projection head, L2-normalised (model.weights_head): the space its
    contrastive loss shaped, which holds the classes better than the backbone's own features do (k-means on the
    shapes benchmark: 0.279 on these against 0.194 on the backbone's; docs/pretrained.md)."""

    def __init__(self, net: nn.Module, head: nn.Module):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.net(x)), dim=1)


def projection_head(in_dim: int, hidden: int, out_dim: int) -> nn.Module:
    """Linear-BN-ReLU-Linear (SeCu, SimCLR); the caller normalises the output."""
    return globalize_batchnorm(nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden),
                                             nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


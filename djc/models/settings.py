"""The `model` section of the config: the backbone, its weights and what of it trains, and the heads' sizes.

Defined beside the models (like each method's section beside its method) and assembled into the tree by
djc/config.py. docs/pretrained.md says how pretrained and frozen backbones run.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from djc.confignode import Node
from djc.models import zoo

OWN_BACKBONES = ("smallconv", "conv4", "resnet18_cifar", "resnet50", "mlp")


class ModelConfig(Node):
    # djc's own (smallconv, conv4, mlp, resnet18_cifar, resnet50) or a library's: torchvision:<builder> (its ResNets and
    # ViTs: torchvision:resnet50, torchvision:vit_b_16) or timm:<model> with the tag of the weights you load
    # (timm:vit_base_patch16_224.dino: the tag brings their normalisation); timm needs `pip install -e '.[timm]'`
    backbone: str = "smallconv"
    width: int = Field(64, gt=0)  # channels of the small convnet (conv4: of its first stage) / hidden units of the MLP
    proj_hidden: int = Field(512, gt=0)  # hidden units of the projection head
    proj_dim: int = Field(128, gt=0)  # D, the normalised feature dimension the clustering heads see
    # The backbone's weights: an fsspec URL (path, file://, s3://) of a state dict in its library's format (.pth /
    # .pt, read without running code; .safetensors), an official DINO / DINOv2 checkpoint, or a djc run dir (its
    # latest checkpoint's encoder: the two-stage recipe). "" = random initialisation. djc never downloads weights.
    weights: str = ""
    # The network to take from a checkpoint that holds several (DINO's teacher / student); DINO evaluates the
    # teacher. Also the key of a state dict nested in a dict, when it is not 'state_dict' or 'model'.
    weights_key: str = "teacher"
    # With model.weights a djc run dir: also take that run's projection head (proj.*), so the features are its
    # normalised outputs, the space the pretext's contrastive loss shaped, not the backbone's (docs/pretrained.md)
    weights_head: bool = False
    # What of the backbone trains: none = all of it; all = none of it (with an unaugmented input, its features are
    # then computed once: model.cache_features); N = only its last N blocks (P2OT's release on DINO ViT-B/16: 1)
    freeze: Literal["all", "none"] | int = "none"
    # With model.freeze=all and no augmentation on the backbone's input (augment.policy=none, or AE-CM), compute
    # every image's features once per run and train the heads on them; false = recompute them at every step
    cache_features: bool = True

    @field_validator("backbone")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in OWN_BACKBONES:
            if not zoo.library(name):
                raise ValueError(f"unknown backbone {name!r}: one of {', '.join(OWN_BACKBONES)}, "
                                 f"torchvision:<name> or timm:<name>")
            zoo.check_name(name)
        return name

    @model_validator(mode="after")
    def _head_needs_run(self) -> ModelConfig:
        if self.weights_head and not self.weights:
            raise ValueError("model.weights_head=true takes the projection head of model.weights, a djc run dir; "
                             "model.weights is empty")
        if self.weights_head and self.freeze not in ("all", "none"):
            raise ValueError(f"model.weights_head=true: model.freeze is all or none (got {self.freeze}): the "
                             f"blocks of a backbone with a head on top are not counted")
        return self

    @field_validator("freeze")
    @classmethod
    def _positive(cls, n: str | int) -> str | int:
        if isinstance(n, int) and n < 1:
            raise ValueError("the number of last blocks that train is at least 1 ('all' freezes every block)")
        return n

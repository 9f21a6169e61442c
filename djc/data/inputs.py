"""What the views hand the backbone: the normalisation and the side of its input.

From the dataset (its manifest's mean and std, its image side) for a backbone trained from scratch; from the
backbone when weights are loaded, since they were trained on inputs normalised and sized their way:
- a torchvision or timm backbone with model.weights: the published statistics (ImageNet's mean and std; a timm
  tag's own, e.g. vit_base_patch16_224.dino) and side (224), the dataset's images resized on the device;
- a djc run dir: what that run's views handed its encoder (its own inputs, found the same way).
A ViT's side is fixed by its position embeddings (224 for torchvision's), with or without weights; augment.out_size
overrides the side of any other backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

from djc.data.shards import read_manifest
from djc.models import zoo
from djc.models.settings import ModelConfig
from djc.models.zoo import InputSpec

MAX_CHAIN = 8  # run dirs whose encoders come from run dirs: deeper than this is a loop


def run_input(model: ModelConfig, out_size: int, mean: Sequence[float], std: Sequence[float],
              image_shape: Sequence[int], depth: int = 0) -> InputSpec:
    """The views' normalisation and output side for this model on a dataset of (H, W, C) images."""
    from djc.models.weights import WeightsError, is_run_dir

    if model.weights and is_run_dir(model.weights):
        if depth >= MAX_CHAIN:
            raise WeightsError(f"model.weights {model.weights}: more than {MAX_CHAIN} run dirs each taking its "
                               f"encoder from the next; is one of them its own source?")
        theirs = _their_input(model.weights, depth)
        return InputSpec(theirs.mean, theirs.std, out_size or theirs.size)
    side, channels = image_shape[0], image_shape[2]
    if not zoo.library(model.backbone):
        return InputSpec(tuple(mean), tuple(std), out_size or side)
    published, fixed = zoo.spec(model.backbone, channels)
    if model.weights:
        return InputSpec(published.mean, published.std, out_size or published.size)
    return InputSpec(tuple(mean), tuple(std), out_size or (published.size if fixed else side))


def _their_input(url: str, depth: int) -> InputSpec:
    """The input a djc run dir's encoder was trained on: its config and its training set's manifest."""
    import fsspec
    import yaml

    from djc.models.weights import WeightsError

    try:
        with fsspec.open(f"{url.rstrip('/')}/config.yaml", "r") as f:
            config = yaml.safe_load(f)
        model = ModelConfig.model_validate(config["model"])
        out_size, train = int(config["augment"]["out_size"]), config["data"]["train"]
    except (FileNotFoundError, KeyError, TypeError, ValueError) as err:
        raise WeightsError(f"model.weights {url}: its config.yaml does not say what its encoder was trained on "
                           f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    m = read_manifest(train)
    return run_input(model, out_size, m.mean, m.std, m.image_shape, depth + 1)

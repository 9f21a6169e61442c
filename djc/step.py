"""A method on its device and one training step: the only step body in djc. djc/train.py, the benchmarks and
the tests all step through `train_step`, so what is measured and tested is what trains. No Ray here: the
equivalence tests run it on gloo process groups.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from djc.config import Config
from djc.methods import REGISTRY
from djc.methods.base import ClusteringMethod, DataInfo, Setup, StepOut
from djc.data.augment import ViewPair
from djc.data.inputs import run_input
from djc.models.zoo import InputSpec


def views_input(cfg: Config, info: DataInfo) -> InputSpec:
    """The normalisation and side of what the views hand the method: the dataset's, or with model.weights the
    backbone's (djc/data/inputs.py); augment.out_size sets the side."""
    return run_input(cfg.model, cfg.augment.out_size, info.mean, info.std, info.image_shape)


def run_views(cfg: Config, info: DataInfo) -> ViewPair:
    """The views a run trains, evaluates and predicts with (`views_input`'s normalisation and side). Training and
    `djc predict` both build them here: a run on a 24-px pretext predicted at its images' own 32 px agreed with
    its own clusters on half the rows."""
    spec = views_input(cfg, info)
    return ViewPair(cfg, spec.mean, spec.std, spec.size)


def setup(cfg: Config, info: DataInfo) -> Setup:
    """The shared settings a method is built with. The image shape is what the views hand the method
    (`views_input`: an MLP's input width, an autoencoder's output, a ViT's grid depend on it)."""
    side = views_input(cfg, info).size
    shape = info.image_shape if side == info.image_shape[0] else (side, side, info.image_shape[2])
    return Setup(num_clusters=cfg.method.num_clusters, num_samples=info.num_samples, image_shape=shape,
                 num_classes=info.num_classes, global_batch=cfg.data.batch_size, epochs=cfg.optim.epochs,
                 seed=cfg.seed, model=cfg.model, kmeans=cfg.method.kmeans)


def build_method(cfg: Config, info: DataInfo) -> ClusteringMethod:
    """The run's method (method.name) from its own section and the shared `setup`; `info` describes the dataset."""
    entry = REGISTRY[cfg.method.name]
    torch.manual_seed(cfg.seed)  # same initial weights on every worker (DDP also broadcasts rank 0's)
    return entry.cls(cfg.method.selected(), setup(cfg, info))


# ---------------------------------------------------------------------------------------------------------
# Device placement: precision, memory format, compilation (trainer.precision / memory_format / compile).


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """trainer.precision -> the backbone's autocast dtype; "auto" is bf16 on CUDA (no loss scaling needed, unlike
    fp16) and float32 elsewhere."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def nhwc(memory_format: str, device: torch.device) -> bool:
    """trainer.memory_format -> whether conv weights go channels-last (NHWC). auto: on a GPU (cuDNN's bf16
    tensor-core kernels want it) and on a CPU with oneDNN, whose NHWC convolutions ran the shapes jobs' conv4
    steps 1.14-1.29x faster than contiguous ones on 2 cores (benchmarks/memory_format.py, docs/performance.md)."""
    return memory_format == "channels_last" or (memory_format == "auto" and (
        device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available())))


def to_device(method: ClusteringMethod, cfg: Config, device: torch.device) -> ClusteringMethod:
    """The method on `device`, with the step's precision, memory format and (optional) compiled backbone."""
    t = cfg.trainer
    if device.type == "cuda":  # fixed shapes every step: let cuDNN time its algorithms once (process-wide)
        torch.backends.cudnn.benchmark = True
    method = method.to(device)
    method.amp_dtype = amp_dtype(t.precision, device)
    backbone = getattr(method, "backbone", None)  # AE-CM's small MLPs have none and stay float32
    if backbone is not None and nhwc(t.memory_format, device):
        # Conv weights in NHWC: a conv with NHWC weights returns NHWC whatever its input, so the batch is
        # converted by the first conv. 2D tensors (MLPs, ViT tokens) are unaffected.
        backbone.to(memory_format=torch.channels_last)
    if backbone is not None and t.compile:
        backbone.compile()  # in place: parameter names, checkpoints and DDP see the same module
    return method


def wrap_ddp(method: ClusteringMethod) -> nn.Module:
    """DDP that syncs parameters and buffers once at init and never buffers again: cluster state is identical
    by construction, and re-broadcasting a 1.28M-entry memory every step would cost more than the step.
    Parameters the method averages itself (`self_reduced_parameters`) are left out of DDP altogether, init
    broadcast included: the method builds them identically on every worker from the seed."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = method.self_reduced_parameters()
    if not any(p.requires_grad for name, p in method.named_parameters() if name not in ignored):
        # Nothing for DDP to average (a frozen encoder under SeCu's self-reduced centers alone, center_space=
        # backbone), and DDP refuses such a module; its init broadcast has nothing to fix either: every worker
        # built the same weights from the seed and the weights file.
        return method
    if ignored:
        DDP._set_params_and_buffers_to_ignore_for_model(method, ignored)
    # torch >= 2.15 renamed the per-forward switch; the GPU images' torch 2.11 only has the old one.
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return DDP(method, forward_sync_buffers=False)
    return DDP(method, broadcast_buffers=False)


def train_step(model: nn.Module, method: ClusteringMethod, opt: torch.optim.Optimizer,
               index: Tensor, x1: Tensor, x2: Tensor) -> StepOut:
    """One optimisation step. `model` is `method` or its DDP wrapper (whose forward averages gradients)."""
    out: StepOut = model(index, x1, x2)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    method.reduce_gradients(out.update)
    opt.step()
    method.update_state(out.update)
    return out

"""What a step asks of a device, counted op by op on the CPU, and the time it would take on a GPU.

`census(fn)` runs fn once under a TorchDispatchMode that sees every aten op: its FLOPs (torch's own formulas for
matmuls and convolutions, 2 per multiply-add), the bytes of its tensor inputs and outputs (an upper bound of its
memory traffic), whether it computes in float64, and whether it reads a device value on the host (a sync). The
counts depend only on shapes, so a step run on a CPU tells what it costs on a GPU:

  GPU time = sum over ops of max(FLOPs / FLOP rate, bytes / memory bandwidth) + ops x DISPATCH_S + syncs x SYNC_S

with the rates of one H100 / H200 (GPU below). Collectives are not in it (they are counted by djc.dist).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

# One H100 / H200 SXM: dense bf16 tensor-core matmul measured ~790 TFLOP/s on the lent H200; float32 without TF32
# (PyTorch's default for matmuls) 67 TFLOP/s and float64 34 TFLOP/s (the data sheets' non-tensor rates); a
# device-to-device copy measured ~4.3 TB/s. DISPATCH_S: what one eager op costs at least, host dispatch and
# kernel launch (PyTorch eager spends ~5-10 us per op on a fast host; small kernels cannot go faster than their
# launches); SYNC_S: a host read of a device value drains the queue, so the host stops feeding the GPU.
GPU = {"bf16": 790e12, "fp32": 67e12, "fp64": 34e12, "bytes": 4.3e12}
DISPATCH_S = 6e-6
SYNC_S = 20e-6
_SYNC_OPS = {"_local_scalar_dense", "item"}
_FREE_OPS = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "slice", "select",
             "unsqueeze", "squeeze", "alias", "detach", "as_strided", "split", "split_with_sizes", "unbind",
             "lift_fresh", "_to_copy_noop", "empty", "empty_like", "empty_strided", "new_empty"}


@dataclass
class Census:
    ops: int = 0  # kernels launched (metadata-only ops such as views excluded)
    syncs: int = 0  # host reads of device values
    flops: dict[str, float] = field(default_factory=lambda: {"fp32": 0.0, "fp64": 0.0, "bf16": 0.0})
    bytes: float = 0.0  # inputs + outputs of every counted op
    gpu_s: float = 0.0  # roofline of every op, summed (without DISPATCH_S and SYNC_S)

    @property
    def total_flops(self) -> float:
        return sum(self.flops.values())

    def gpu_seconds(self) -> float:
        """The estimated GPU time of the counted work (module docstring)."""
        return self.gpu_s + self.ops * DISPATCH_S + self.syncs * SYNC_S


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Counter(TorchDispatchMode):
    def __init__(self, out: Census):
        super().__init__()
        self.c = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.c.syncs += 1
            return result
        if name in _FREE_OPS:
            return result
        ts = _tensors((args, kwargs)) + _tensors(result)
        nbytes = float(sum(t.numel() * t.element_size() for t in ts))
        dtypes = {t.dtype for t in ts}
        kind = "fp64" if torch.float64 in dtypes else "bf16" if torch.bfloat16 in dtypes else "fp32"
        formula = flop_registry.get(func.overloadpacket)
        flops = float(formula(*args, **kwargs, out_val=result)) if formula is not None else 0.0
        self.c.ops += 1
        self.c.bytes += nbytes
        self.c.flops[kind] += flops
        self.c.gpu_s += max(flops / GPU[kind], nbytes / GPU["bytes"])
        return result


def census(fn: Callable[[], object]) -> Census:
    """Run fn once and count what it asks of a device (module docstring)."""
    out = Census()
    with _Counter(out):
        fn()
    return out

"""What a step asks of a device, counted op by op on the CPU, and the time it would take on a GPU.

`census(fn)` runs fn once under a TorchDispatchMode that sees every aten op: its FLOPs (torch's own formulas for
matmuls and convolutions, 2 per multiply-add), the bytes of its tensor inputs and outputs (an upper bound of its
memory traffic), whether it computes in float64, and whether it reads a device value on the host (a sync). The
counts depend only on shapes, so a step run on a CPU tells what it costs on a GPU:

  device time = sum over ops of max(FLOPs / FLOP rate, bytes / memory bandwidth, KERNEL_MIN_S)
                + syncs x SYNC_S (after a host read the GPU idles until the host enqueues the next kernels)
  host time   = ops x DISPATCH_S (eager PyTorch's dispatch and launch; it overlaps with the GPU's work on earlier
                kernels, the encoder's included, unless a sync makes the host wait)

with the rates of one H100 / H200 (GPU below). Collectives are not in it (djc.dist counts their bytes). Two
CPU-only reads are not syncs: F.one_hot's range check (CUDA relies on a device assert), as in tests/test_step.py.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

# One H100 / H200 SXM: dense bf16 tensor-core matmul measured ~790 TFLOP/s on the lent H200; float32 without TF32
# (PyTorch's default for matmuls) 67 TFLOP/s and float64 34 TFLOP/s (the data sheets' non-tensor rates); a
# device-to-device copy measured ~4.3 TB/s. DISPATCH_S: what one eager op costs at least, host dispatch and
# kernel launch (PyTorch eager spends ~5-10 us per op on a fast host); KERNEL_MIN_S: the shortest a kernel runs on
# the GPU; SYNC_S: a host read of a device value drains the queue and the GPU idles until the host catches up.
GPU = {"bf16": 790e12, "fp32": 67e12, "fp64": 34e12, "bytes": 4.3e12}
DISPATCH_S = 6e-6
KERNEL_MIN_S = 2e-6
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
    kernels_s: float = 0.0  # every op's max(FLOPs / rate, bytes / bandwidth, KERNEL_MIN_S), summed

    def device_seconds(self) -> float:
        """The estimated GPU time of the counted work (module docstring)."""
        return self.kernels_s + self.syncs * SYNC_S

    def host_seconds(self) -> float:
        """The host's time to dispatch it (module docstring)."""
        return self.ops * DISPATCH_S


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class _Counter(TorchDispatchMode):
    def __init__(self, out: Census):
        super().__init__()
        self.c, self.reading = out, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.c.syncs += not self.reading and not any("one_hot(" in (f.line or "")
                                                         for f in traceback.extract_stack(limit=12))
            return result
        if name in _FREE_OPS:
            return result
        ts = _tensors((args, kwargs)) + _tensors(result)
        nbytes = float(sum(t.numel() * t.element_size() for t in ts))
        dtypes = {t.dtype for t in ts}
        kind = "fp64" if torch.float64 in dtypes else "bf16" if torch.bfloat16 in dtypes else "fp32"
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            flops = float(formula(*args, **kwargs, out_val=result))
        elif name in ("mv", "dot"):  # matrix-vector products: 2 per multiply-add, as the registry counts mm
            flops = 2.0 * args[0].numel()
        else:
            flops = 0.0
        self.c.ops += 1
        self.c.bytes += nbytes
        self.c.flops[kind] += flops
        self.c.kernels_s += max(flops / GPU[kind], nbytes / GPU["bytes"], KERNEL_MIN_S)
        return result


def census(fn: Callable[[], object]) -> Census:
    """Run fn once and count what it asks of a device (module docstring)."""
    out = Census()
    mode = _Counter(out)
    # On a CPU, .item(), .tolist() and .numpy() read memory without dispatching an op; on a GPU each is a sync.
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "numpy")}

    def counted(real):
        def read(t, *args, **kwargs):
            out.syncs += 1
            mode.reading += 1  # an .item() that also dispatches _local_scalar_dense counts once
            try:
                return real(t, *args, **kwargs)
            finally:
                mode.reading -= 1
        return read

    try:
        for name, real in saved.items():
            setattr(torch.Tensor, name, counted(real))
        with mode:
            fn()
    finally:
        for name, real in saved.items():
            setattr(torch.Tensor, name, real)
    return out

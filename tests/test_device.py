"""The training step on each device: a CUDA step equals the CPU step, the views equal on both, channels-last and
bf16 reach the convolutions, a compiled backbone gives the eager losses, DDP runs the step on one process.

Tests marked `gpu` need CUDA and are skipped without it (benchmarks/gpu_check.sh runs them on a GPU machine); where
the same check means something on a CPU (channels-last and bf16 on the CPU's kernels, DDP over gloo, compile with
the CPU's inductor) a CPU variant runs everywhere. No test here needs Ray: the GPU machines lent to this project
have none. The host-sync and dtype-by-region checks of every method are in tests/test_step.py (CPU and CUDA).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as torch_dist
from torch import nn

from djc.data import views as V
from djc.optim import make_optimizer
from djc.step import build_method, to_device, train_step, wrap_ddp
from djc.methods.base import DataInfo
from tests.test_step import DEVICES, METHODS, N, SIDE, _cfg, _setup

CUDA = pytest.param("cuda", marks=pytest.mark.gpu)


@contextmanager
def _exact_fp32():
    """cuDNN convolutions in TF32 are PyTorch's default on CUDA (10-bit mantissas): off, so fp32 means fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _assert_same_state(a: nn.Module, b: nn.Module, rtol: float, atol: float) -> None:
    """Every parameter and buffer: integers (memories, histograms, counters) exactly, floats to rtol / atol."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        w = sb[k].cpu()
        if v.is_floating_point():
            torch.testing.assert_close(w, v.cpu(), rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(w, v.cpu()), k


# The suite's lr 0.2 where comparing two devices' steps cannot work at it: AE-CM's summed losses diverge under SGD
# (losses 6.5e3, 2.1e9, nan).
STABLE_LR = {"aecm": 1e-3}


def _finite_lr(name: str, *opts: torch.optim.Optimizer) -> None:
    """Each optimiser at STABLE_LR[name] where the method has one: the two steps compared must stay comparable."""
    if name in STABLE_LR:
        for g in [g for o in opts for g in o.param_groups]:
            g["lr"] = STABLE_LR[name]


# ---------------------------------------------------------------------------------------------------------
# One step, two ways: the CPU's contiguous fp32 step is the reference.


@pytest.mark.parametrize("target", ["cpu-channels_last", CUDA])
@pytest.mark.parametrize("name", METHODS)
def test_a_step_equals_the_contiguous_cpu_step(name, target):
    """3 fp32 steps of every method on `target` against the CPU's: losses and logs to 1e-4, gradients and the
    cluster state after each step to rtol 1e-3 / atol 1e-4, integer state (memories, histograms) exactly.

    cuDNN (or the CPU's channels-last kernels) sums convolutions in another order than the CPU's contiguous ones:
    fp32 rounding, ~1e-6 relative per op. Each step starts both from the reference's state (model and optimiser
    copied over after the comparison), so what is compared is one step's rounding: left to run on, SeCu's sharp
    logits (1 / 0.05) grow it chaotically, to 2e-3 at step 2 at lr 0.05 and 6e-5 at lr 0.2 on one Xeon's oneDNN
    kernels (torch 2.14), though both runs are right. A label flips only if two clusters' scores tie to ~1e-6,
    which these seeds do not give (a flip would fail the integer state)."""
    device = "cuda" if target == "cuda" else "cpu"
    trainer = {"precision": "fp32", "memory_format": "auto" if device == "cuda" else "channels_last"}
    torch.manual_seed(0)
    ref, ref_opt, views, batches = _setup(name, precision="fp32", memory_format="contiguous")
    cfg = _cfg(name, **trainer)
    other = to_device(copy.deepcopy(ref), cfg, torch.device(device))
    opt = make_optimizer(cfg, other)
    _finite_lr(name, ref_opt, opt)
    with _exact_fp32():
        for step, (index, images) in enumerate(batches):
            # The views are drawn once, on the CPU: a CUDA generator's stream differs from the CPU's.
            x1, x2 = views.for_method(ref, images, step, 0)
            a = train_step(ref, ref, ref_opt, index, x1, x2)
            b = train_step(other, other, opt, index.to(device), x1.to(device), x2.to(device))
            for k in ["loss", *a.logs]:
                want, got = (a.loss, b.loss) if k == "loss" else (a.logs[k], b.logs[k])
                torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
            for (k, p), q in zip(ref.named_parameters(), other.parameters()):
                assert (p.grad is None) == (q.grad is None), k
                if p.grad is not None:
                    torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-4,
                                               msg=lambda m, k=k: f"grad of {k} at step {step}: {m}")
            _assert_same_state(ref, other, rtol=1e-3, atol=1e-4)
            other.load_state_dict(ref.state_dict())  # the next step from the same state: one step's rounding
            opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # its own buffers, not views of the reference's


@pytest.mark.gpu
@pytest.mark.parametrize("degrees", [0.0, 20.0])
def test_the_views_on_cuda_equal_the_cpu_views_under_the_same_choices(degrees):
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (12, 3, 40, 36), generator=g, dtype=torch.uint8)  # crops up- and downsampled
    spec = V.ViewSpec(crop_scale_min=0.2, gray_p=0.4, blur_p=0.5, solarize_p=0.5, degrees=degrees)
    p = V.sample_params(12, 40, 36, 32, spec, torch.Generator().manual_seed(5))
    cpu = V.apply_params(u8.float() / 255, p, 32)
    on_gpu = V.ViewParams(*(t.cuda() if t is not None else None for t in p))
    gpu = V.apply_params(u8.cuda().float() / 255, on_gpu, 32)
    # Bilinear sampling and the blur agree to float rounding; a pixel within ~1e-7 of solarize's 0.5 threshold
    # may fall on either side (tests/test_views.py allows 2e-4 against torchvision for the same reason).
    off = (gpu.cpu() - cpu).abs() > 2e-4
    assert off.float().mean() < 1e-4, f"{int(off.sum())} of {off.numel()} values differ by more than 2e-4"
    # Drawn on the device from a CUDA generator: a normalised float32 batch that never leaves it.
    v = V.augment(u8.cuda(), spec, [0.5] * 3, [0.25] * 3, torch.Generator(device="cuda").manual_seed(0), 32)
    assert v.device.type == "cuda" and v.dtype == torch.float32 and v.shape == (12, 3, 32, 32)
    assert bool(torch.isfinite(v).all())


# ---------------------------------------------------------------------------------------------------------
# What step.to_device sets up reaches the kernels.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backbone", ["smallconv", "resnet18_cifar"])
def test_channels_last_and_bf16_reach_every_convolution(backbone, device):
    """On CUDA the defaults (auto) must give NHWC weights and bf16 autocast; on a CPU both are forced. Every
    convolution then returns NHWC bf16, so every one after the first is fed NHWC (the first converts the batch)."""
    trainer = {} if device == "cuda" else {"precision": "bf16", "memory_format": "channels_last"}
    cfg = _cfg("secu", backbone, **trainer)
    method = to_device(build_method(cfg, DataInfo(N, (SIDE, SIDE, 3), 4)), cfg, torch.device(device))
    assert method.amp_dtype == torch.bfloat16
    convs = [m for m in method.backbone.modules() if isinstance(m, nn.Conv2d)]
    nhwc = torch.channels_last
    assert convs and all(c.weight.is_contiguous(memory_format=nhwc) for c in convs)
    seen: list[tuple[bool, bool, torch.dtype]] = []
    hooks = [c.register_forward_hook(lambda m, i, o: seen.append(
        (i[0].is_contiguous(memory_format=nhwc), o.is_contiguous(memory_format=nhwc), o.dtype))) for c in convs]
    try:
        _, _, views, batches = _setup("secu", device)
        index, images = batches[0]
        out = method(index, *views.train(images, 0, 0))
        out.loss.backward()
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(convs)
    assert all(o for _, o, _ in seen), "a convolution returned a contiguous (NCHW) tensor"
    assert all(i for i, _, _ in seen[1:]), "a convolution after the first was fed NCHW"
    assert {dt for _, _, dt in seen} == {torch.bfloat16}
    assert out.loss.dtype == torch.float32 and bool(torch.isfinite(out.loss))


# ---------------------------------------------------------------------------------------------------------
# DDP and trainer.compile (last: compiling takes the longest).


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", METHODS)
def test_ddp_on_one_process_runs_the_step(name, backend, tmp_path, monkeypatch):
    """step.wrap_ddp on a real process group of one (NCCL on a GPU, gloo on a CPU): every djc.dist helper then
    runs its collective (no single-process shortcut), so a CPU tensor in a collective or a DDP setting the
    method breaks shows here. 3 steps equal the same steps without a process group."""
    device = "cuda" if backend == "nccl" else "cpu"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # one process: loopback is all it needs
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "lo")
    torch.manual_seed(0)
    plain, plain_opt, views, batches = _setup(name, device)
    method = copy.deepcopy(plain)
    opt = make_optimizer(_cfg(name), method)
    _finite_lr(name, plain_opt, opt)
    losses = []
    for step, (index, images) in enumerate(batches):  # before the process group exists: the plain path
        losses.append(train_step(plain, plain, plain_opt, index, *views.for_method(plain, images, step, 0)).loss)
    if device == "cuda":
        torch.cuda.set_device(0)
    torch_dist.init_process_group(backend, init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = wrap_ddp(method)
        for step, (index, images) in enumerate(batches):
            out = train_step(model, method, opt, index, *views.for_method(method, images, step, 0))
            torch.testing.assert_close(out.loss, losses[step], rtol=1e-5, atol=1e-6)
        _assert_same_state(plain, method, rtol=1e-5, atol=1e-6)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_a_compiled_backbone_gives_the_eager_losses(device, capsys):
    """trainer.compile=true (inductor) against eager, 3 fp32 SeCu steps: losses to rtol 1e-3 (inductor fuses
    batch norm and reorders sums). Graph breaks are printed: each one splits the backbone's graph."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    eager, eager_opt, views, batches = _setup("secu", device, precision="fp32")
    cfg = _cfg("secu", precision="fp32", compile=True)
    compiled = to_device(copy.deepcopy(eager), cfg, torch.device(device))
    opt = make_optimizer(cfg, compiled)
    with _exact_fp32():
        for step, (index, images) in enumerate(batches):
            x1, x2 = views.for_method(eager, images, step, 0)
            a = train_step(eager, eager, eager_opt, index, x1, x2)
            b = train_step(compiled, compiled, opt, index, x1, x2)
            torch.testing.assert_close(b.loss, a.loss, rtol=1e-3, atol=1e-5, msg=lambda m: f"step {step}: {m}")
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1, "nothing was compiled"
    breaks = dict(counters["graph_break"])
    with capsys.disabled():
        print(f"\n[compile] {device}: {counters['stats']['unique_graphs']} graph(s), graph breaks: {breaks or 'none'}")
    torch._dynamo.reset()

"""The training step on the hot path: no host syncs per step, and bf16 autocast confined to the backbone.

Both are checked with a dispatch mode that sees every op a real step runs (views, forward, backward, optimiser,
state update): the ops that make a host wait for a GPU are the same ops on any device, so the CPU run checks them
everywhere. The `gpu` variants run the same checks on CUDA, where CUDA's own sync detector must agree.
"""

from __future__ import annotations

import traceback
import warnings
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from djc.config import from_dict
from djc.data.augment import ViewPair
from djc.optim import make_optimizer
from djc.step import amp_dtype, build_method, nhwc, to_device, train_step
from djc.methods.base import DataInfo, EpochContext
from djc.methods.p2ot import CHECK_EVERY

aten = torch.ops.aten
METHODS = ["secu", "dcl", "statdec", "aecm", "p2ot"]
N, B, SIDE = 64, 16, 16  # 16 px: the blur runs too
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class HostSyncs(TorchDispatchMode):
    """Records the ops that stall the host on a GPU, with the source line that ran them: reading a value (.item(),
    bool(), int(), .tolist()), outputs sized by values (boolean masks, nonzero, bincount, unique), and tensors
    made from host data (a blocking host -> device copy).

    One CPU-only read is left out, because on CUDA it does not happen: F.one_hot checks its labels' range on the
    CPU (CUDA relies on the scatter's device assert). `t[rows, idx] = 0` counts: it lifts the 0 to a host tensor,
    and on an H200 its copy to the device synchronised (2026-12-04; scatter_ / index_fill_ / masked_fill fill on
    the device)."""

    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.bincount, aten.masked_select, aten._unique2,
               aten.unique_dim, aten.unique_consecutive, aten.lift_fresh}

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []  # the source line of each syncing op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        bool_index = func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and any(
            t is not None and t.dtype == torch.bool for t in args[1])
        if func.overloadpacket in self.SYNCING or bool_index:
            line = self._caller()
            if "one_hot(" in line:
                return out
            self.calls.append(line)
        return out

    @staticmethod
    def _caller() -> str:
        return next((f.line for f in reversed(traceback.extract_stack()) if f.name not in HostSyncs.HOOKS
                     and ("/djc/" in f.filename or f.filename.endswith("test_step.py"))), "?")

    # On the CPU, .tolist() and .numpy() read the memory without an op to dispatch: wrap them while recording.
    HOOKS = ("__torch_dispatch__", "_caller", "recorded")

    def __enter__(self):
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, real in self._saved.items():
            def recorded(t, *args, _real=real, **kwargs):
                self.calls.append(self._caller())
                return _real(t, *args, **kwargs)
            setattr(torch.Tensor, name, recorded)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)

    @property
    def syncs(self) -> list[str]:
        return [c for c in self.calls if c]


# Each method with the settings that restore its official release's rules (docs/methods/*.md).
RELEASE = {"secu": {"constraint": "entropy", "share_norm": "counted", "bn_views": "separate"},
           "dcl": {"tau_plus_share": "dataset", "bn_views": "separate"},
           "aecm": {"pretrain_optimizer": "sgd", "fresh_optimizer": True, "adam_eps_hat": True},
           "p2ot": {"head": "cosine", "batch_only_epochs": 1, "view_solves": "chained"}}


def _cfg(name: str, backbone: str = "smallconv", release: bool = False, options: dict | None = None, **trainer):
    method = {"name": name, "num_clusters": 4, "secu": {"num_heads": 2},
              "aecm": {"hidden": [32, 32], "init": "rand"}, "p2ot": {"bank_batches": 2}}
    optim = {"epochs": 10}
    if release and name in RELEASE:
        method[name] = {**method.get(name, {}), **RELEASE[name]}
        optim |= {"name": "adam"} if name == "aecm" else {}  # the release's optimisers are Adam's
    if options:  # the method's own settings beyond the suite's
        method[name] = {**method.get(name, {}), **options}
    return from_dict({
        "model": {"backbone": backbone, "width": 8, "proj_hidden": 32, "proj_dim": 16},
        "method": method, "data": {"batch_size": B}, "trainer": {"num_workers": 1, **trainer}, "optim": optim,
    })


def _setup(name: str, device: str = "cpu", release: bool = False, options: dict | None = None, **trainer):
    """Method, optimiser, views and 3 batches (index, uint8 images) on `device`; the same numbers on any device."""
    cfg = _cfg(name, release=release, options=options, **trainer)
    method = to_device(build_method(cfg, DataInfo(N, (SIDE, SIDE, 3), 4)), cfg, torch.device(device))
    opt = make_optimizer(cfg, method)  # SGD: Adam's step counter is a host tensor by design
    views = ViewPair(cfg, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], SIDE)
    method.on_epoch_start(EpochContext(0, 10, N // B, map_train=None))
    if name == "statdec":  # statistics ready: the KL term and the pooled EMA run too
        method.pool.reset((torch.rand(4, 1 + 2 * 16) + 0.5).to(device))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randperm(N, generator=g)[:B].to(device),
                torch.randint(0, 256, (B, 3, SIDE, SIDE), generator=g, dtype=torch.uint8).to(device))
               for _ in range(3)]
    return method, opt, views, batches


def _step(method, opt, views, batch, step: int):
    index, images = batch
    x1, x2 = views.for_method(method, images, step, 0)
    out = train_step(method, method, opt, index, x1, x2)
    torch.stack([out.loss.detach(), *out.logs.values()])  # what the loop accumulates
    return out


@contextmanager
def _cuda_syncs(device: str):
    """CUDA's own detector, on a GPU: the synchronising calls (device -> host copies, stream syncs) made in the
    block, as warnings of torch.cuda.set_sync_debug_mode. Yields a list that fills in; empty on a CPU."""
    found: list[str] = []
    if device != "cuda":
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)
    # "called a synchronizing CUDA operation"; not the one-time notice that the debug mode is a prototype.
    found += [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


@pytest.mark.parametrize("release", [False, True])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METHODS)
def test_a_training_step_never_waits_on_the_device(name, device, release):
    """release: each method with the settings that restore its official release."""
    torch.manual_seed(0)
    method, opt, views, batches = _setup(name, device, release)
    for step in range(2):  # epoch 0 fills the memories, so the next step takes the update's every branch
        _step(method, opt, views, batches[step], step)
    with _cuda_syncs(device) as cuda_syncs, HostSyncs() as mode:
        out = _step(method, opt, views, batches[2], 2)
    # On CUDA nothing synchronises beyond what the dispatch mode saw (P2OT's reads, one copy each).
    assert len(cuda_syncs) <= len(mode.syncs), cuda_syncs
    if name == "p2ot":
        # The Sinkhorn loop decides convergence on the host, one read per CHECK_EVERY scaling iterations of the
        # two views' batched solve (until the slower has converged; chained: of each view's solve), and nothing
        # else reads.
        assert set(mode.syncs) == {"converged = (changes < tol).T.tolist()  # the block's one host read"}
        loop = round(float(out.logs["sinkhorn_loop"]))  # iterations the loops ran
        solves = 2 if release else 1
        assert loop / CHECK_EVERY <= len(mode.syncs) < loop / CHECK_EVERY + solves and loop > CHECK_EVERY
    else:
        assert mode.syncs == []
    # The detector itself sees a host read, a boolean mask, a tensor from host data, .tolist() and .numpy().
    with HostSyncs() as mode:
        x = torch.randn(4)
        float(x.sum()), x[x > 0], x + torch.tensor([1.0, 2.0, 3.0, 4.0]), x.tolist(), x.numpy()
    assert len(mode.syncs) == 5
    with _cuda_syncs(device) as cuda_syncs:  # and CUDA's detector sees a read of a device value
        torch.ones(1, device=device).sum().item()
    assert len(cuda_syncs) == (1 if device == "cuda" else 0)


@pytest.mark.parametrize("nn_k", [1, 5])
@pytest.mark.parametrize("device", DEVICES)
def test_dcl_with_its_neighbour_bank_never_waits_on_the_device(device, nn_k):
    """The shapes reference's NNCLR positives (nn_weight > 0): the bank's lookup (one nearest row, or the mean of
    nn_k) and its update run on the device too. The H200 check of 2026-12-04 ran DCL with the bank off only."""
    torch.manual_seed(0)
    options = {"nn_weight": 0.5, "nn_start_epoch": 0, "nn_k": nn_k}
    method, opt, views, batches = _setup("dcl", device, options=options)
    for step in range(2):  # the first steps fill the bank, so the third finds neighbours in it
        _step(method, opt, views, batches[step], step)
    assert bool(method.nn_filled.any())
    with _cuda_syncs(device) as cuda_syncs, HostSyncs() as mode:
        out = _step(method, opt, views, batches[2], 2)
    assert "nn_loss" in out.logs and mode.syncs == [] and cuda_syncs == []


class DtypesByRegion(TorchDispatchMode):
    """Floating output dtypes of every op, split into those run inside the backbone and the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = False
        self.dtypes: dict[bool, set[torch.dtype]] = {True: set(), False: set()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.dtypes[self.inside].add(t.dtype)
        return out


@contextmanager
def _watch(module: torch.nn.Module, mode: DtypesByRegion):
    pre = module.register_forward_pre_hook(lambda *a: setattr(mode, "inside", True))
    post = module.register_forward_hook(lambda *a: setattr(mode, "inside", False))
    try:
        yield
    finally:
        pre.remove()
        post.remove()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", METHODS)
def test_bf16_runs_the_backbone_only_and_the_step_trains(name, device):
    torch.manual_seed(0)
    method, opt, views, batches = _setup(name, device, precision="bf16")
    assert method.amp_dtype == torch.bfloat16
    before = {k: v.clone() for k, v in method.state_dict().items()}
    index, images = batches[0]
    x1, x2 = views.for_method(method, images, 0, 0)
    mode = DtypesByRegion()
    region = _watch(method.backbone, mode) if hasattr(method, "backbone") else _watch(method.encoder, mode)
    with region, mode:
        out = method(index, x1, x2)
    if name == "aecm":  # its small MLPs have no backbone: everything stays float32
        assert mode.dtypes[True] == {torch.float32}
    else:
        assert torch.bfloat16 in mode.dtypes[True]
    # Projection heads, cluster statistics, Sinkhorn and losses: float32 (float64 where asked), never bf16.
    assert mode.dtypes[False] <= {torch.float32, torch.float64}, mode.dtypes[False]
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    method.update_state(out.update)
    changed = [k for k, v in method.state_dict().items() if not torch.equal(v, before[k])]
    assert any("backbone" in k or "encoder" in k for k in changed)
    assert all(torch.isfinite(v.float()).all() for v in method.state_dict().values())


def test_precision_and_memory_format_follow_the_device():
    assert amp_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("fp32", torch.device("cuda")) is None
    assert amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert nhwc("auto", torch.device("cuda")) and nhwc("channels_last", torch.device("cpu"))
    assert not nhwc("contiguous", torch.device("cuda"))
    assert nhwc("auto", torch.device("cpu")) == torch.backends.mkldnn.is_available()  # oneDNN's NHWC kernels
    method, *_ = _setup("secu", memory_format="contiguous")
    conv = next(m for m in method.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous() and method.amp_dtype is None  # fp32 on a CPU: the plain path
    method, *_ = _setup("secu")
    conv = next(m for m in method.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()


@pytest.mark.parametrize("n", [115_846, 1_281_167])  # ImageNet-LT train, ImageNet-1k train
def test_per_instance_state_for_imagenet_sizes(n, capsys):
    """SeCu's 10 heads keep one int32 label per instance each: 10 x 4 bytes per image, replicated per worker."""
    from djc.methods.base import state_bytes
    from djc.methods.secu import SeCuUpdate

    cfg = from_dict({"model": {"backbone": "mlp", "width": 8, "proj_dim": 128},
                     "method": {"num_clusters": 1000, "secu": {"num_heads": 10}}, "data": {"batch_size": 1024}})
    method = build_method(cfg, DataInfo(n, (4, 4, 3), 1000))
    size = state_bytes(method, n)
    assert size["per_instance"] == n * 10 * 4
    centers = 128 * 1000 * sum(range(1, 11)) * 4  # D x K (h + 1) float32 over 10 heads
    assert size["parameters"] >= centers and size["other_buffers"] >= centers  # + W_prev, the epoch snapshot
    # One state update over a global batch of 1024: memories and histograms stay consistent.
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:1024]
    labels = torch.stack([torch.randint(0, 1000 * (h + 1), (1024,)) for h in range(10)], 1)
    method.update_state(SeCuUpdate(torch.cat([index[:, None], labels], 1)))
    assert all(int(hd.hist.sum()) == 1024 == int((hd.memory >= 0).sum()) for hd in method.heads)
    with capsys.disabled():
        print(f"\n[memory] SeCu, N={n:,}, 10 heads, K=1000, D=128: per-instance "
              f"{size['per_instance'] / 2**20:.1f} MiB, parameters {size['parameters'] / 2**20:.1f} MiB, "
              f"other buffers {size['other_buffers'] / 2**20:.1f} MiB per worker")


@pytest.mark.parametrize("name, backbone", [("secu", "mlp"), ("aecm", "mlp"), ("p2ot", "smallconv")])
def test_methods_are_built_for_the_views_output_size_not_the_datasets(name, backbone):
    # 8x8 digits cropped and resized to 16x16 views: an MLP (and AE-CM's autoencoder) must take 16 x 16 inputs.
    cfg = from_dict({"model": {"backbone": backbone, "width": 8, "proj_hidden": 16, "proj_dim": 8},
                     "augment": {"out_size": 16}, "data": {"batch_size": 16},
                     "method": {"name": name, "num_clusters": 4, "secu": {"num_heads": 1},
                                "aecm": {"hidden": [16], "init": "rand"}}})
    method = build_method(cfg, DataInfo(64, (8, 8, 1), 4))
    views = ViewPair(cfg, [0.5], [0.25], image_side=8)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    x1, x2 = views.for_method(method, images, step=0, rank=0)
    assert x1.shape[-2:] == (16, 16)
    out = method(torch.arange(16), x1, x2)
    assert torch.isfinite(out.loss)

"""`model.weights`: a backbone's weights from any fsspec URL (path, file://, s3://), read without running code.

What a URL may hold:
- a state dict in its library's format: `.safetensors` (timm, Hugging Face) read with safetensors, anything else
  (torchvision's `.pth`, DINO's and DINOv2's official files) with torch.load(weights_only=True): tensors and plain
  data only. The one other object allowed is argparse.Namespace, the `args` a DINO training checkpoint carries
  (a bag of attribute values: rebuilding it calls no code of the file's choosing).
- a checkpoint around state dicts: DINO's {student, teacher, ...} (model.weights_key picks one: the teacher, as
  DINO evaluates), DINOv2's or timm's {model: ...} / {state_dict: ...}.
- a djc run dir: the encoder (`backbone.*`) of its latest checkpoint, which must be of the same model.backbone;
  with model.weights_head also its projection head (`proj.*`, `run_dir_head`).
Keys are then unwrapped: `module.` (DDP) is dropped; when some keys are under `backbone.` (DINO's multi-crop
wrapper) those are the backbone and the rest is its projection head; a networks' prefix (DINOv2's `teacher.`) is
picked by model.weights_key. Then converted to the backbone's layout: timm's own converter for the model's family
(DINOv2's layout; position embeddings resampled to the input side), or DINO's / timm's ViT layout renamed to
torchvision's (`vit_to_torchvision`). The keys must then match the backbone exactly: what is missing, left over
or of another shape is a WeightsError that lists them, except a classifier or projection head the backbone does
not have, which is left out and reported (`load_into` returns the notes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pickle
import sys
from typing import Any

import fsspec
import torch
from torch import Tensor, nn

from djc import checkpoint

HEADS = ("fc", "head", "heads", "head_dist", "classifier", "last_layer")  # top-level names of heads, never features


class WeightsError(ValueError):
    """Weights that cannot be loaded into the backbone; the message names the URL and what does not match."""


# ---------------------------------------------------------------------------------------------------------
# Reading


def is_run_dir(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isdir(path)


def _read_bytes(url: str) -> bytes:
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise WeightsError(f"model.weights {url}: no such file") from None
    except OSError as err:
        raise WeightsError(f"model.weights {url}: cannot read it ({type(err).__name__}: {err})") from None


def _safe_globals():
    allowed = [argparse.Namespace]
    if hasattr(torch.serialization, "safe_globals"):  # torch >= 2.5
        return torch.serialization.safe_globals(allowed)
    torch.serialization.add_safe_globals(allowed)
    return contextlib.nullcontext()


def read_file(url: str) -> Any:
    """The object a weights file holds: safetensors' tensors, or a torch pickle of tensors and plain data."""
    data = _read_bytes(url)
    if url.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as err:  # safetensors raises its own SafetensorError on bad bytes
            raise WeightsError(f"model.weights {url} is not a readable safetensors file: {err}") from None
    try:
        with _safe_globals():
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        what = f" ({lines[0][:200]})" if lines else ""
        raise WeightsError(f"refusing to load model.weights {url}: it holds objects other than tensors and plain "
                           f"data, so loading it could run code{what}; save its state_dict() instead") from None
    except (EOFError, RuntimeError) as err:
        raise WeightsError(f"model.weights {url} is not a torch or safetensors weights file: "
                           f"{type(err).__name__}: {str(err)[:200]}") from None


def _run_dir_method(url: str) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(the method's tensors of its latest checkpoint, the run's config as plain data, the checkpoint's URL)."""
    import yaml

    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(f"{path}/{checkpoint.RAY_RECORD}", "r") as f:
            record = json.load(f)
        with fs.open(f"{path}/config.yaml", "r") as f:
            config = yaml.safe_load(f)
        name = record["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        raise WeightsError(f"model.weights {url} is a directory but not a djc run dir with a checkpoint "
                           f"({checkpoint.RAY_RECORD} and config.yaml)") from None
    if (config.get("model") or {}).get("weights_head"):
        # Its backbone.* holds the backbone and the head it was handed: name the run that trained them instead.
        raise WeightsError(f"model.weights {url} clustered on a pretext run's encoder and head "
                           f"(model.weights_head); name that pretext run, {config['model'].get('weights')}")
    ckpt = f"{url.rstrip('/')}/train/{name}/{checkpoint.CKPT_FILE}"
    with fsspec.open(ckpt, "rb") as f:
        state = checkpoint.load(io.BytesIO(f.read()), name=ckpt)
    return state["method"], config, ckpt


def _part(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def run_dir_encoder(url: str) -> tuple[dict[str, Tensor], dict[str, Any], str]:
    """(the encoder's tensors, the run's config as plain data, the checkpoint's URL) of a djc run dir."""
    state, config, ckpt = _run_dir_method(url)
    enc = _part(state, "backbone.")
    if not enc:
        raise WeightsError(f"model.weights {url}: its checkpoint {ckpt} holds no encoder (no backbone.* tensors: "
                           f"method {config.get('method', {}).get('name')} has none)")
    return enc, config, ckpt


def run_dir_head(url: str) -> tuple[dict[str, Tensor], tuple[int, int, int]]:
    """The projection head (`proj.*`: Linear-BN-ReLU-Linear) of a djc run dir's latest checkpoint, and its sizes
    (in, hidden, out): what model.weights_head puts on top of the loaded backbone."""
    state, config, ckpt = _run_dir_method(url)
    head = _part(state, "proj.")
    if "0.weight" not in head or "3.weight" not in head:
        raise WeightsError(f"model.weights_head: the checkpoint {ckpt} holds no projection head (proj.*): method "
                           f"{config.get('method', {}).get('name')} has none; DCL, SeCu and StatDEC runs have one")
    (hidden, dim_in), dim_out = head["0.weight"].shape, head["3.weight"].shape[0]
    return head, (int(dim_in), int(hidden), int(dim_out))


def _tensors(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def unwrap(obj: Any, key: str, url: str) -> tuple[dict[str, Tensor], list[str]]:
    """The backbone's tensors out of what a file holds, and notes on what was left out (module docstring)."""
    notes = []
    if not _tensors(obj):
        inner = next((obj[k] for k in (key, "state_dict", "model") if isinstance(obj, dict) and k in obj), None)
        if not _tensors(inner):
            keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
            raise WeightsError(f"model.weights {url} holds no state dict of tensors at its top level or under "
                               f"{key!r}, 'state_dict' or 'model' (it holds: {keys}); set model.weights_key")
        obj = inner
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith(f"{key}.") for k in state):  # several networks in one dict (DINOv2's teacher./student.)
        state = {k[len(key) + 1:]: v for k, v in state.items() if k.startswith(f"{key}.")}
    if any(k.startswith("backbone.") for k in state):  # DINO's multi-crop wrapper: backbone + projection head
        head = [k for k in state if not k.startswith("backbone.")]
        if head:
            notes.append(f"left out {len(head)} tensor(s) of the checkpoint's projection head ({_some(head)})")
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state, notes


def _some(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------------
# Converting to the backbone's layout


def vit_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DINO's / timm's ViT keys -> torchvision's VisionTransformer keys (the same tensors: qkv is torchvision's
    in_proj, stacked q, k, v in both). Keys of neither layout pass through, to be reported as not matching."""
    top = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "norm.weight": "encoder.ln.weight",
           "norm.bias": "encoder.ln.bias", "patch_embed.proj.weight": "conv_proj.weight",
           "patch_embed.proj.bias": "conv_proj.bias"}
    inner = {"norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight",
             "attn.qkv.bias": "self_attention.in_proj_bias", "attn.proj": "self_attention.out_proj",
             "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}
    out = {}
    for k, v in state.items():
        if k in top:
            k = top[k]
        elif k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            for old, new in inner.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            k = f"encoder.layers.encoder_layer_{i}.{rest}"
        out[k] = v
    return out


def convert(state: dict[str, Tensor], net: nn.Module, backbone: str) -> dict[str, Tensor]:
    lib = backbone.partition(":")[0] if ":" in backbone else ""
    if lib == "timm":
        fn = getattr(sys.modules[type(net).__module__], "checkpoint_filter_fn", None)
        return fn(state, net) if fn is not None else state
    if hasattr(net, "encoder") and hasattr(net.encoder, "layers") and "blocks.0.attn.qkv.weight" in state:
        return vit_to_torchvision(state)
    return state


# ---------------------------------------------------------------------------------------------------------
# Loading


def match(net: nn.Module, state: dict[str, Tensor], url: str, backbone: str) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors of `state` that the backbone takes, with notes; WeightsError listing every mismatch."""
    own = net.state_dict()
    # A counter of batch-norm updates, absent from older torchvision files: the backbone's own value stays.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    heads = [k for k in extra if k.split(".", 1)[0] in HEADS]
    extra = [k for k in extra if k not in heads]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = [f"{what} [{_some(keys)}]" for what, keys in
                 (("missing from the file", missing), ("not in the backbone", extra), ("of another shape", shapes))
                 if keys]
        raise WeightsError(f"model.weights {url} does not fit model.backbone={backbone}: "
                           f"{len(missing) + len(extra) + len(shapes)} key(s) do not match: {'; '.join(parts)}")
    notes = [f"left out {len(heads)} tensor(s) of a head the backbone does not have ({_some(heads)})"] if heads else []
    return {k: v for k, v in state.items() if k in own}, notes


def load_into(net: nn.Module, url: str, backbone: str, key: str = "teacher") -> list[str]:
    """Load model.weights into `net` (in place); returns notes on what was left out, for the driver to print."""
    if is_run_dir(url):
        state, config, ckpt = run_dir_encoder(url)
        theirs = (config.get("model") or {}).get("backbone")
        if theirs != backbone:
            raise WeightsError(f"model.weights {url} is a run of model.backbone={theirs}; this run's "
                               f"model.backbone is {backbone}")
        notes = [f"the encoder of {ckpt}"]
    else:
        state, notes = unwrap(read_file(url), key, url)
        state = convert(state, net, backbone)
    state, more = match(net, state, url, backbone)
    net.load_state_dict(state, strict=False)  # strict in effect: match() refused every other difference
    return notes + more

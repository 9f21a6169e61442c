"""Training checkpoints: the state a run resumes from, written by rank 0 and read back without running code.

A checkpoint is read from a run dir, which may sit on a shared S3 prefix or have come from someone else. A
pickle can name any callable to rebuild an object, so `torch.load(weights_only=False)` on a crafted file runs
its code on every training worker. djc writes only tensors and plain data (dicts, lists, numbers, strings), so
it reads with `weights_only=True`, which rebuilds nothing else, and refuses a file that needs more.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import IO, Any

import fsspec
import torch

CKPT_FILE = "state.pt"
# Ray Train's record of the checkpoints a run dir holds, the latest one named by latest_checkpoint_result's
# checkpoint_dir_name (relative to <run dir>/train).
RAY_RECORD = "train/checkpoint_manager_snapshot.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely; the message names the file."""


def save(directory: str | Path, state: dict[str, Any]) -> None:
    torch.save(state, Path(directory) / CKPT_FILE)


def load(path: str | Path | IO[bytes], map_location: Any = "cpu", name: str | None = None) -> dict[str, Any]:
    """Tensors and plain data only; anything else is refused before a single object of it is built. `path` is a
    local path or any fsspec URL (djc predict reads a run dir on S3), or an open file (a checkpoint read from
    object storage), then `name` is what messages call it."""
    path_name = name or path
    try:
        if isinstance(path, (str, Path)):
            with fsspec.open(str(path), "rb") as f:
                state = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the line that names the refused global is the one to show.
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        what = f" ({lines[0][:200]})" if lines else ""
        raise CheckpointError(f"refusing to load {path_name}: it holds objects other than tensors and plain data, so "
                              f"loading it could run code{what}; djc never writes such files") from None
    except (EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(f"cannot read checkpoint {path_name}: {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(state, dict) or not {"method", "optimizer", "stream", "epoch", "step"} <= state.keys():
        raise CheckpointError(f"{path_name} is not a djc checkpoint (expected method, optimizer, stream, epoch, step)")
    return state

"""The main-process side of a ShardStream: a DataLoader over it that knows which batch comes next."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader

from djc.data.stream import ShardStream


class StreamLoader:
    """The main-process side: a DataLoader over a ShardStream that knows which batch comes next.

    Each iteration starts fresh workers (persistent_workers=False) from the stream's current (epoch,
    position), so state_dict() taken between two batches resumes at exactly the next one.
    """

    def __init__(self, stream: ShardStream, loader_workers: int = 0, *, pin_memory: bool = False):
        self.stream, self.loader_workers, self.pin_memory = stream, loader_workers, pin_memory
        self.next_batch, self.skipped = stream.position, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.stream.full_batches_all_ranks()

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def position(self) -> int:
        return self.next_batch

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)
        self.next_batch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.set_position(self.stream.epoch, self.next_batch)
        if self.next_batch >= self.stream.num_batches():
            return
        kw: dict[str, Any] = {}
        if self.loader_workers > 0:
            # fork starts workers in milliseconds and needs no pickling; spawn where fork does not exist.
            ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            kw = dict(num_workers=self.loader_workers, prefetch_factor=2, persistent_workers=False,
                      multiprocessing_context=ctx)
        expected = self.next_batch
        for batch in DataLoader(self.stream, batch_size=None, pin_memory=self.pin_memory, **kw):
            if batch["batch_id"] != expected:  # the resume contract depends on this order
                raise RuntimeError(f"stream batch {batch['batch_id']} arrived where {expected} was due")
            expected = self.next_batch = expected + 1
            self.skipped += batch["skipped"]
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.stream.epoch, "batch": self.next_batch, "seed": self.stream.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.stream.load_state_dict(state)
        self.next_batch = self.stream.position

"""Run a function on W real processes joined by a gloo process group on loopback (no Ray, no mocks).

The equivalence tests use it: W workers each step on their slice of a batch, and the result is compared with
one process stepping on the whole batch. Functions must be importable (module level) and return picklable
values (numpy arrays, not tensors).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple, q) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        q.put((rank, fn(rank, world, *args), None))
    except BaseException:
        q.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_gloo(fn: Callable, world: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """fn(rank, world, *args) on `world` spawned processes; returns the results in rank order."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(world):
            rank, value, err = q.get(timeout=timeout)
            if err:
                raise RuntimeError(f"worker {rank} failed:\n{err}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def assert_two_workers_equal_one(fn: Callable, *args: Any, rtol: float = 1e-4, atol: float = 1e-5) -> dict:
    """The equivalence property: fn(rank, world, *args) -> {name: array} of every parameter and buffer after some
    steps. Both workers must hold the same state, equal to one process's on the concatenated batches (one step
    on W workers = one step on one worker with the concatenated batch): integers exactly, floats to `rtol` /
    `atol`. Returns the one-process state."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    single = fn(0, 1, *args)
    w0, w1 = run_gloo(fn, 2, *args)
    assert set(single) == set(w0) == set(w1)
    for k, v in single.items():
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=f"{k} differs between workers")
        if v.dtype.kind in "iub":
            np.testing.assert_array_equal(w0[k], v, err_msg=f"{k}: 2 workers != 1 worker")
        else:
            np.testing.assert_allclose(w0[k], v, rtol=rtol, atol=atol, err_msg=f"{k}: 2 workers != 1 worker")
    return single


def state_tensors(method: Any) -> dict[str, Any]:
    """Every parameter and buffer, by name: what the equivalence test compares."""
    return {k: v.detach().clone() for k, v in method.state_dict().items()}

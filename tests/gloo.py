"""Run a function on W real processes joined by a gloo process group on loopback (no Ray, no mocks), kept for
the session (a pool: see _Pool).

The equivalence tests use it: W workers each step on their slice of a batch, and the result is compared with
one process stepping on the whole batch. Functions must be importable (module level) and return picklable
values (numpy arrays, not tensors).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util as mp_util
import os
import pickle
import queue
import shutil
import sys
import tempfile
import traceback
from typing import Any, Callable


def _serve(rank: int, world: int, store: str, calls, results) -> None:
    """One pool worker: joins the gloo group once, then runs each call it is sent in that group, in order."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    # A file store, not a TCP one: torch's TCP store listens on every interface, and the group outlives a call
    # (tests/test_bad_input.py checks that nothing of the session listens beyond loopback).
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    parent = os.getppid()
    try:
        while True:
            try:
                call = calls.get(timeout=5)
            except queue.Empty:
                if os.getppid() != parent:  # the test session is gone (killed): do not linger
                    return
                continue
            if call is None:
                return
            env, path, payload = call
            os.environ.clear()  # the caller's environment and import path now, as a fresh spawn would inherit them
            os.environ.update(env)
            sys.path[:] = path
            torch.set_num_threads(1)
            try:
                fn, args = pickle.loads(payload)  # after the path: fn travels by reference to its module
                results.put((rank, fn(rank, world, *args), None))
            except BaseException:
                results.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Pool:
    """`world` spawned processes in one gloo group, kept for the test session. Spawning two processes that import
    torch and djc cost each call 3-4 s on 2 cores (some 40 calls in the suite); the group and the imports now
    outlive a call. Every function seeds what it uses, so a call sees what a fresh process would, and a call that
    fails or times out closes the pool: the next one starts fresh processes, never a group left mid-collective."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world, self.results = world, ctx.Queue()
        self.calls = [ctx.Queue() for _ in range(world)]
        self.dir = tempfile.mkdtemp(prefix="djc-gloo-")
        store = os.path.join(self.dir, "store")
        self.procs = [ctx.Process(target=_serve, args=(r, world, store, self.calls[r], self.results), daemon=False)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, timeout: float) -> list[Any]:
        payload = pickle.dumps((fn, args))
        for q in self.calls:
            q.put((dict(os.environ), list(sys.path), payload))
        results: dict[int, Any] = {}
        for _ in range(self.world):
            rank, value, err = self.results.get(timeout=timeout)
            if err:
                raise RuntimeError(f"worker {rank} failed:\n{err}")
            results[rank] = value
        return [results[r] for r in range(self.world)]

    def close(self) -> None:
        for q in self.calls:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_pools: dict[int, _Pool] = {}


def _close_pools() -> None:
    while _pools:
        _pools.popitem()[1].close()


# At exit, before multiprocessing joins its children (a plain atexit hook would run after that join, which waits
# for workers still serving): finalizers with an exit priority run first.
mp_util.Finalize(None, _close_pools, exitpriority=10)


def run_gloo(fn: Callable, world: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """fn(rank, world, *args) on `world` processes in one gloo group; returns the results in rank order."""
    pool = _pools.get(world) or _pools.setdefault(world, _Pool(world))
    try:
        return pool.run(fn, args, timeout)
    except BaseException:
        _pools.pop(world).close()
        raise


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


def sharded_map_train(method: Any, data: Any, rank: int, world: int) -> Callable:
    """EpochContext.map_train over this worker's contiguous slice of `data` (N, ...), global indices
    0..N-1: what the training loop hands a method's epoch-start passes, in eval mode and without gradients."""
    import torch

    n = len(data)
    rows = slice(rank * n // world, (rank + 1) * n // world)
    index = torch.arange(n)[rows]

    def map_train(fn: Callable) -> Any:
        method.eval()
        try:
            with torch.no_grad():
                return fn(data[rows], index), index
        finally:
            method.train()

    return map_train


def state_tensors(method: Any) -> dict[str, Any]:
    """Every parameter and buffer, by name: what the equivalence test compares."""
    return {k: v.detach().clone() for k, v in method.state_dict().items()}

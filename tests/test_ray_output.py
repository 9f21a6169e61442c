"""What Ray forwards from workers to the driver's terminal: a crashed worker is one line, not its dump."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest


def test_a_worker_that_dies_hard_prints_one_line_not_its_dump(ray_local, capsys):
    """A worker killed by a signal (here SIGSEGV; in a failed run, a sibling torn down mid-collective) has Ray's
    native frames and faulthandler's module list forwarded to the driver: 15-110 lines that buried the run's
    one-line error. The driver prints one line naming the worker's log, which keeps the whole dump; output of
    other workers still arrives."""
    from djc.ray_setup import CrashDumpFilter

    ray = ray_local

    @ray.remote(max_retries=0)
    def crash():
        print("before the crash", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSEGV)

    @ray.remote
    def speak():
        print("still heard", file=sys.stderr, flush=True)
        return os.getpid()

    with pytest.raises(ray.exceptions.WorkerCrashedError):
        ray.get(crash.remote())
    ray.get(speak.remote())
    err, deadline = "", time.time() + 30
    while ("still heard" not in err or "this worker crashed" not in err) and time.time() < deadline:
        time.sleep(0.5)
        err += capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "pid=" in ln]
    assert any("before the crash" in ln for ln in lines), err
    crashed = [ln for ln in lines if "this worker crashed (SIGSEGV)" in ln]
    assert len(crashed) == 1 and ".err under " in crashed[0], err
    log = crashed[0].split("Ray's log ")[1].split(" ")[0]
    dumps = list(Path(crashed[0].split(" under ")[1].split(" on ")[0]).glob(log))
    assert dumps and "Fatal Python error" in dumps[0].read_text(), (log, dumps)  # the dump is kept
    for dump_line in ("Fatal Python error", "Extension modules", "logging.cc", "Stack (most recent call first)"):
        assert dump_line not in err, err
    assert "still heard" in err, err
    assert sum(isinstance(h, CrashDumpFilter) for _, h in
               ray._private.ray_logging.global_worker_stdstream_dispatcher.handlers) == 1

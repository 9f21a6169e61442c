"""A run dir belongs to one run at a time, and a rerun continues only what its checkpoint can continue.

Ownership: `owned(run_dir)` holds a lock for as long as a run writes there. On a local disk it is an flock on
`.djc-lock`, which the kernel drops when the process ends however it ends, so a crashed or killed run never
leaves it stuck. On an object store (no locks) it is a lease: `.djc-lock` names its owner and is rewritten
every HEARTBEAT_S seconds; one older than STALE_S belongs to a run that died, and is taken over.

Resume: Ray Train restarts from the latest checkpoint in `<run dir>/train` by itself, so a second `djc train`
with the same --out continues the first. `check_resume` refuses, before anything is rewritten, a config that
changes what the checkpoint was trained with (seed, method, model, data, batch, workers), and says what a rerun
with no more epochs than the checkpoint holds will do (evaluate again, not train).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec

from djc import checkpoint
from djc.config import Config, ConfigError, from_dict, to_dict

LOCK_FILE = ".djc-lock"
ERROR_LOG = "logs/error-rank{rank}.txt"  # a worker's failure with its full traceback (djc/train.py writes it)
HEARTBEAT_S = 15.0
STALE_S = 120.0  # 8 missed heartbeats: the owner is gone (and clocks of two hosts may differ by a minute)
SNAPSHOT = checkpoint.RAY_RECORD  # Ray Train's record of the checkpoints it kept
TRAIN_DIR = "train"  # where the checkpoints are: Ray Train's RunConfig(name=...), and djc/session.py's InProcessSession

# What a resumed run may change: how long it trains, where and how it runs, what it evaluates. Everything else
# is what the checkpoint was trained with. trainer.num_workers is not here: the stream position in a checkpoint
# counts batches of global_batch / workers on each rank.
MAY_CHANGE = ("name", "optim.epochs", "data.eval", "data.source", "data.source_root", "data.imbalance_ratio",
              "data.profile", "data.prepare_seed", "data.loader_workers", "data.on_corrupt", "data.cache_dir",
              "data.cache_max_gb", "data.prefetch_batches", "data.retries", "trainer.use_gpu",
              "trainer.cpus_per_worker", "trainer.threads_per_worker", "trainer.max_failures",
              "trainer.checkpoint_every", "trainer.keep_checkpoints", "trainer.log_every", "trainer.precision",
              "trainer.memory_format", "trainer.compile", "trainer.ray_address", "trainer.poll_interval_s",
              "trainer.ray_log_level", "trainer.resource_wait_s", "trainer.in_process", "eval", "storage",
              "method.kmeans")


class RunDirError(ConfigError):
    """A run dir that this run may not use as asked; the message names the dir and what to do."""


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


# ---------------------------------------------------------------------------------------------------------
# Ownership


def _owner() -> dict[str, Any]:
    return {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


def _describe(info: dict[str, Any]) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, since {since}"


@contextlib.contextmanager
def owned(run_dir: str, wait: bool = False) -> Iterator[None]:
    """Hold `run_dir` for one run; RunDirError naming the holder if another run holds it, or with `wait`,
    wait for it (two runs that prepare the same dataset on first use: the second then finds it made)."""
    if _is_local(run_dir):
        with _flock(run_dir.removeprefix("file://"), wait):
            yield
    else:
        with _lease(run_dir, wait):
            yield


def _busy(what: str, holder: str) -> RunDirError:
    return RunDirError(f"run dir {what} is in use by another djc run ({holder}); wait for it to finish, or give "
                       f"this run another --out")


@contextlib.contextmanager
def _flock(path: str, wait: bool) -> Iterator[None]:
    import fcntl

    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"--out {path} is a file, not a directory") from None
    except NotADirectoryError:
        raise RunDirError(f"--out {path}: a parent of it is a file, not a directory") from None
    except PermissionError:
        raise RunDirError(f"--out {path}: permission denied creating it") from None
    lock = os.path.join(path, LOCK_FILE)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        raise RunDirError(f"--out {path} is not writable (permission denied)") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = _describe(json.loads(os.pread(fd, 4096, 0) or b"{}"))
            except ValueError:
                holder = "another process"
            if not wait:
                raise _busy(path, holder) from None
            print(f"[djc] waiting for {path}, in use by {holder}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        yield
    finally:
        os.close(fd)  # drops the flock (and the kernel drops it for us if this process dies first)


@contextlib.contextmanager
def _lease(run_dir: str, wait: bool) -> Iterator[None]:
    fs, root = fsspec.core.url_to_fs(run_dir)
    path = posixpath.join(root, LOCK_FILE)
    me = _owner()

    def read() -> dict[str, Any] | None:
        try:
            with fs.open(path, "rb") as f:
                return json.loads(f.read() or b"{}")
        except (FileNotFoundError, ValueError):
            return None

    def write() -> None:
        with fs.open(path, "wb") as f:
            f.write(json.dumps({**me, "heartbeat": time.time()}).encode())

    while True:
        fs.invalidate_cache(root)
        held = read()
        if not held or time.time() - held.get("heartbeat", 0) >= STALE_S:
            break
        holder = f"{_describe(held)}; lease renewed {time.time() - held.get('heartbeat', 0):.0f} s ago"
        if not wait:
            raise _busy(run_dir, holder)
        print(f"[djc] waiting for {run_dir}, in use by {holder}", file=sys.stderr, flush=True)
        time.sleep(HEARTBEAT_S / 3)
    write()
    time.sleep(0.5)  # a rival that wrote at the same moment: the last write wins, and only one reads itself back
    fs.invalidate_cache(root)
    if (read() or {}).get("owner") != me["owner"]:
        raise RunDirError(f"run dir {run_dir} was just taken by another djc run; give this run another --out")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a missed beat is retried; STALE_S tolerates several
                write()

    t = threading.Thread(target=beat, name="djc-run-lease", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()
        with contextlib.suppress(Exception):
            if (read() or {}).get("owner") == me["owner"]:
                fs.rm(path)


# ---------------------------------------------------------------------------------------------------------
# Resume


def _read(url: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "r") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_config(run_dir: str) -> Config:
    """The config.yaml of a run dir (djc eval, djc predict), refused in one line when missing or invalid."""
    import yaml

    text = _read(f"{run_dir}/config.yaml")
    if text is None:
        raise ConfigError(f"{run_dir} is not a djc run dir: it has no config.yaml")
    try:
        return from_dict(yaml.safe_load(text))
    except yaml.YAMLError as err:
        raise ConfigError(f"{run_dir}/config.yaml is not valid YAML: {str(err).splitlines()[0]}") from None


def snapshot(run_dir: str) -> dict[str, Any] | None:
    """Ray Train's checkpoint record of the run dir (plain JSON), None when it holds no checkpoint."""
    text = _read(f"{run_dir}/{SNAPSHOT}")
    if text is None:
        return None
    try:
        snap = json.loads(text)
    except ValueError:
        raise RunDirError(f"{run_dir}/{SNAPSHOT} is not valid JSON: the run dir's checkpoint record is damaged; "
                          f"move the run dir away to start afresh") from None
    return snap if snap.get("latest_checkpoint_result") else None


def checkpoint_epoch(run_dir: str) -> int | None:
    """The epoch of the checkpoint a rerun would continue from, None when there is none."""
    snap = snapshot(run_dir)
    return None if snap is None else int(snap["latest_checkpoint_result"]["metrics"]["epoch"])


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = prefix + k
        if isinstance(v, dict) and key not in ("data.eval",):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == m or key.startswith(m + ".") for m in MAY_CHANGE)


def check_unchanged(cfg: Config, run_dir: str) -> int | None:
    """The epoch of the checkpoint `cfg` would continue in `run_dir` (None: none, a fresh start), or RunDirError
    if `cfg` changes what that checkpoint was trained with."""
    import yaml

    epoch = checkpoint_epoch(run_dir)
    text = _read(f"{run_dir}/config.yaml")
    if epoch is None or text is None:
        return None  # nothing to continue: a fresh start (what a failed first attempt wrote is replaced)
    try:
        before = from_dict(yaml.safe_load(text))
    except (ConfigError, yaml.YAMLError) as err:
        raise RunDirError(f"{run_dir}/config.yaml does not hold a valid config ({str(err).splitlines()[0]}); it "
                          f"cannot be checked against this run: use another --out") from None
    old, new = _flat(to_dict(before)), _flat(to_dict(cfg))
    changed = [k for k in new if not _may_change(k) and old.get(k) != new[k]]
    if changed:
        diffs = ", ".join(f"{k} ({old.get(k)!r} -> {new[k]!r})" for k in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise RunDirError(f"run dir {run_dir} holds a run checkpointed at epoch {epoch}, and this config changes "
                          f"what it was trained with: {diffs}{more}. A rerun with the same --out continues that "
                          f"run; give a new run another --out")
    return epoch


def check_resume(cfg: Config, run_dir: str) -> Config:
    """The config this run continues with: `cfg`, or RunDirError if it changes what the run dir's checkpoint
    was trained with. A config asking for no more epochs than the checkpoint holds trains nothing: it keeps the
    checkpoint's optim.epochs (so config.yaml says what the model is) and the outputs are evaluated again."""
    epoch = check_unchanged(cfg, run_dir)
    if epoch is None:
        return cfg
    if cfg.optim.epochs <= epoch:
        asked = (f"optim.epochs={cfg.optim.epochs} asks for fewer" if cfg.optim.epochs < epoch
                 else "that is all optim.epochs asks for")
        print(f"[djc] run dir {run_dir} is already trained to epoch {epoch} ({asked}): nothing is trained, the "
              f"epoch-{epoch} model is evaluated again and config.yaml keeps optim.epochs={epoch}", flush=True)
        tree = to_dict(cfg)
        tree["optim"]["epochs"] = epoch
        return from_dict(tree)
    return cfg


def drop_orphan_checkpoints(run_dir: str) -> list[str]:
    """Delete checkpoint dirs under <run dir>/train that Ray Train's record does not list: what a driver killed
    between uploading a checkpoint and recording it left behind (nothing would ever delete them). Call it only
    while owning the run dir."""
    snap = snapshot(run_dir)
    if snap is None:
        return []
    kept = {r["checkpoint_dir_name"] for r in snap.get("checkpoint_results", [])}
    kept.add(snap["latest_checkpoint_result"]["checkpoint_dir_name"])
    fs, root = fsspec.core.url_to_fs(f"{run_dir}/{TRAIN_DIR}")
    fs.invalidate_cache(root)
    gone = []
    for p in fs.ls(root, detail=False):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("checkpoint_") and name not in kept and not name.endswith(".json"):
            fs.rm(p, recursive=True)
            gone.append(name)
    return gone

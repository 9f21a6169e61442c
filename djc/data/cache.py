"""The local disk cache of remote shards: a shard's first read downloads the whole file (checked against the
manifest's sha256, written to a temporary name and renamed, so concurrent workers never read a partial copy),
and later reads use it. Files are named by their sha256, so datasets never collide. The cache is kept under
its bound by deleting the least recently used copies (by mtime, refreshed on use) after each download; it can
exceed the bound by the shards being downloaded or read, and a download only evicts copies older than itself,
so the most recent copy is always kept. Shared by every worker of a node that uses the same directory.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from typing import IO, Any

from djc.data.io import with_retries
from djc.data.shards import CorruptDataError, ShardInfo


class ShardCache:
    def __init__(self, directory: str, max_bytes: int, retries: int, base_s: float):
        self.dir, self.max_bytes, self.retries, self.base_s = directory, max_bytes, retries, base_s

    def open(self, fs: Any, path: str, info: ShardInfo, url: str) -> tuple[IO[bytes], str]:
        """(open file, local path) of the shard at `path` on `fs`, downloaded first if it is not here."""
        local = os.path.join(self.dir, f"{info.sha256}.parquet")
        try:
            fh = open(local, "rb")  # once open, an eviction cannot take it away (POSIX unlink)
            os.utime(fh.fileno())  # mark it recently used
            return fh, local
        except FileNotFoundError:
            pass
        os.makedirs(self.dir, exist_ok=True)
        tmp = f"{local}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            with_retries(lambda: fs.get_file(path, tmp), url, self.retries, self.base_s)
            fh = open(tmp, "rb")  # opened before it is published: other workers' evictions cannot race us
            h = hashlib.sha256()
            while chunk := fh.read(1 << 22):
                h.update(chunk)
            if h.hexdigest() != info.sha256:
                fh.close()
                raise CorruptDataError(f"shard {url} does not match its sha256 in manifest.json; not cached")
            os.replace(tmp, local)  # atomic: other workers see no file or the whole file
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.evict(keep=local)
        return fh, local

    def evict(self, keep: str) -> None:
        files, stale = [], time.time() - 3600
        for e in os.scandir(self.dir):
            try:
                st = e.stat()
                if e.name.endswith(".parquet"):
                    files.append((st.st_mtime, st.st_size, e.path))
                elif e.name.endswith(".tmp") and st.st_mtime < stale:  # left by a killed worker
                    os.remove(e.path)
            except FileNotFoundError:  # evicted or renamed by another worker meanwhile
                pass
        total = sum(f[1] for f in files)
        # Only copies older than the one just published are evicted. Otherwise two fetchers racing (each
        # keeps its own and removes the other's) could leave the cache empty; this way the newest copy always
        # survives. If `keep` is already gone, a newer copy's owner evicts instead of us.
        mine = max((m for m, _, p in files if p == keep), default=float("-inf"))
        for mtime, size, path in sorted(files):
            if total <= self.max_bytes or mtime >= mine:
                break
            if path != keep:
                try:
                    os.remove(path)  # a worker that has it open keeps reading it (POSIX unlink semantics)
                except FileNotFoundError:  # another worker evicted it first
                    pass
                total -= size

"""Reading remote bytes robustly: transient-error retries with backoff, a file that reopens itself at the same
offset after a dropped connection, and a prefetcher that fetches the row groups of the next batches in threads.

The streaming reader (djc/data/stream.py) decides WHAT to read and in which order; this module only decides
HOW, so no retry or prefetch can change a batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any

import numpy as np

from djc.data.shards import DatasetError

log = logging.getLogger(__name__)

# Error classes of botocore / aiohttp that a retry can cure, matched by name so neither is imported here.
_TRANSIENT_NAMES = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
                    "ResponseStreamingError", "IncompleteReadError", "HTTPClientError", "ClientConnectorError",
                    "ServerDisconnectedError", "ClientPayloadError", "ClientOSError", "ServerTimeoutError"}
_TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                       "ServiceUnavailable", "500", "502", "503", "504"}


class ShardReadError(OSError):
    """A shard that could not be read: a storage error that outlived every retry, or one no retry can cure."""


def is_transient(err: BaseException) -> bool:
    """Whether a retry may cure `err`: network / timeout / throttling, not a missing or forbidden object."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(err).__mro__}
    if "ClientError" in names and isinstance(getattr(err, "response", None), dict):  # botocore: by error code
        return str(err.response.get("Error", {}).get("Code", "")) in _TRANSIENT_S3_CODES  # type: ignore[attr-defined]
    return bool(names & _TRANSIENT_NAMES) or type(err).__module__.split(".")[0] == "aiohttp"


def with_retries(fn: Callable[[], Any], url: str, retries: int, base_s: float,
                 on_error: Callable[[], None] | None = None) -> Any:
    """fn() with `retries` attempts and exponential backoff (base_s, 2 base_s, ...) on transient errors.
    Storage failures come out as DatasetError (missing shard) or ShardReadError, both naming the shard URL."""
    for attempt in range(retries):
        try:
            return fn()
        except DatasetError:  # ours (corrupt data, missing shard): no retry can help
            raise
        except Exception as e:
            if on_error is not None:
                on_error()
            if isinstance(e, FileNotFoundError):
                raise DatasetError(f"shard {url} is missing") from e
            if not is_transient(e) or attempt + 1 == retries:
                tries = f" failed {retries} times; last error" if is_transient(e) else ""
                raise ShardReadError(f"reading shard {url}{tries}: {type(e).__name__}: {e}") from e
            log.warning("reading shard %s: %s: %s; retry %d of %d in %.1f s", url, type(e).__name__, e,
                        attempt + 1, retries - 1, base_s * 2**attempt)
            time.sleep(base_s * 2**attempt)
    raise ShardReadError(f"reading shard {url}: retries={retries} allows no attempt")


class RetryingFile:
    """A read-only file for pyarrow whose reads retry transient errors, reopening at the same offset. Every
    storage failure leaves it as ShardReadError / DatasetError, so any other exception out of pyarrow is a
    parse error: the shard's bytes are corrupt. pyarrow needs only read / seek / tell / close / closed / mode."""

    mode = "rb"

    def __init__(self, opener: Callable[[], IO[bytes]], url: str, retries: int, base_s: float,
                 size: int | None = None):
        self._opener, self.url, self._retries, self._base_s = opener, url, retries, base_s
        self._f, self._pos, self._size, self.closed = None, 0, size, False

    def _call(self, op: Callable[[IO[bytes]], Any]) -> Any:
        def attempt() -> Any:
            if self._f is None:
                self._f = self._opener()
            return op(self._f)

        return with_retries(attempt, self.url, self._retries, self._base_s, on_error=self._drop)

    def _drop(self) -> None:
        try:
            if self._f is not None:
                self._f.close()
        except Exception:  # a broken connection may fail to close too; it is being replaced anyway
            pass
        self._f = None

    def read(self, n: int = -1) -> bytes:
        # seek first: after a reopen it is needed, otherwise it is free (fsspec files seek locally)
        data = self._call(lambda f: (f.seek(self._pos), f.read(n))[1])
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 2 and self._size is None:  # the real size, not the manifest's: a replaced file must parse
            self._size = self._call(lambda f: f.seek(0, 2))
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        self.closed = True


Group = tuple[np.ndarray, np.ndarray, list[bytes]]  # (index, label, image bytes) of one row group
FETCH_THREADS = 4  # concurrent row-group reads per process: ~4 requests in flight cover S3's per-request latency


class Prefetcher:
    """The row groups of a known sequence of batches, fetched `ahead` batches early by FETCH_THREADS threads.

    Each group is read once and dropped after the last batch that needs it, so memory holds the groups of the
    current batch, of the next `ahead` batches, and those in between that a later batch still needs (the
    window's, at most `window` groups). ahead=0 reads on demand in the calling thread."""

    def __init__(self, fetch: Callable[[int], Group], batches: list[np.ndarray], ahead: int):
        self.fetch, self.ahead = fetch, ahead
        self.needs = [list(dict.fromkeys(b.tolist())) for b in batches]  # unit ids per batch, first-use order
        self.last = {u: k for k, us in enumerate(self.needs) for u in us}  # batch after which u can go
        self.live: dict[int, Future | Group | None] = {}
        self.requested = 0  # batches whose groups are requested
        self.pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="djc-fetch") if ahead > 0 else None

    def take(self, k: int) -> dict[int, Group]:
        while self.requested < min(k + 1 + self.ahead, len(self.needs)):
            for u in self.needs[self.requested]:
                if u not in self.live:
                    self.live[u] = self.pool.submit(self.fetch, u) if self.pool is not None else None
            self.requested += 1
        out = {}
        for u in self.needs[k]:
            v = self.live[u]
            if v is None:
                v = self.live[u] = self.fetch(u)
            out[u] = v.result() if isinstance(v, Future) else v
            if self.last[u] == k:
                del self.live[u]
        return out

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:  # an early stop (break, error) abandons what was fetched ahead
            self.pool.shutdown(wait=False, cancel_futures=True)

"""How djc reaches object storage: S3 settings for fsspec, bucket checks, and Ray's view of a run dir.

Every path in djc is an fsspec URL and every read and write goes through `fsspec.core.url_to_fs`; this module
only decides how the `s3` filesystem is built. Settings come, in this order, from the config's `storage`
section (endpoint, region, profile: names, never secrets), then the standard AWS settings that botocore reads
itself (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, AWS_PROFILE, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, ~/.aws/{config,credentials}, an instance role).

Credentials are deliberately NOT config fields: the resolved config is printed, stored in the run dir and in
every checkpoint, so a key placed there would be written out three times. They are never handed to s3fs as
arguments either (s3fs keeps its arguments and pickles them with the filesystem that Ray ships to workers),
so each process resolves them from its own environment, and nothing djc writes can contain them.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import fsspec
import fsspec.config

if TYPE_CHECKING:  # the data layer imports this module and stays free of the config tree
    from djc.config import StorageConfig


class StorageError(Exception):
    """Storage that cannot be used as asked (unknown bucket, access denied); the message names the URL."""


def configure(storage: StorageConfig) -> None:
    """Make the config's S3 settings the defaults of every s3fs filesystem this process builds. Call it once
    per process that touches storage (the CLI, each Ray worker); forked DataLoader workers inherit it."""
    opts: dict[str, Any] = {}
    if storage.endpoint_url:
        opts["endpoint_url"] = storage.endpoint_url
    if storage.region:
        # In client_kwargs, not s3fs' region_name: that one is also sent as a bucket's LocationConstraint,
        # which S3-compatible servers on loopback reject.
        opts["client_kwargs"] = {"region_name": storage.region}
    if storage.profile:
        opts["profile"] = storage.profile
    fsspec.config.conf["s3"] = opts  # replaced, not merged: a second configure() starts from its own settings


def is_remote(url: str) -> bool:
    """Whether `url` names an object store (s3://, gs://, ...) rather than a local or in-memory path."""
    scheme = urlsplit(url).scheme
    return bool(scheme) and scheme not in ("file", "local", "memory") and len(scheme) > 1  # C:\ is a path


def require_bucket(url: str) -> None:
    """StorageError naming `url` when its bucket does not exist or cannot be reached with these credentials.

    Checked before writing, because s3fs creates a missing bucket on makedirs: a typo in --out would
    otherwise make a new bucket instead of failing."""
    if not is_remote(url):
        return
    fs, path = fsspec.core.url_to_fs(url)
    bucket = path.split("/", 1)[0]
    try:
        there = fs.exists(bucket)
    except PermissionError as e:
        raise StorageError(f"access denied to bucket '{bucket}' of {url}: {e}") from None
    if not there:
        raise StorageError(f"bucket '{bucket}' of {url} does not exist (or these credentials cannot see it); "
                           f"create it first, e.g. `aws s3 mb s3://{bucket}`")


def ray_storage(run_dir: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train's RunConfig.

    A local run dir is passed as a path. A remote one is passed as fsspec's own filesystem wrapped for
    pyarrow, so Ray's checkpoint uploads and downloads use the same endpoint and credential chain as
    every other djc read and write (a bare s3:// URL would make Ray build pyarrow's separate S3 client,
    which reads neither the config's storage section nor AWS_ENDPOINT_URL)."""
    if not is_remote(run_dir):
        return run_dir, None
    import pyarrow.fs

    fs, path = fsspec.core.url_to_fs(run_dir)
    return posixpath.normpath(path), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))

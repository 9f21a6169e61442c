"""Damaged datasets for the tests: a shard whose image does not decode, as another tool might have written it."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

BAD_PNG = b"\x89PNG\r\n\x1a\n" + b"garbage" * 5  # PNG magic, then nothing a decoder can read


def with_bad_image(url: str, shard: int, row: int) -> int:
    """Rewrite shard `shard` of the dataset at `url` with image `row` undecodable, and record the new shard's
    size and sha256 in the manifest (the dataset was written that way; only decoding fails). Returns the index
    of the bad image."""
    fs, root = fsspec.core.url_to_fs(url)
    manifest = json.loads(fs.cat_file(f"{root}/manifest.json"))
    entry = manifest["shards"][shard]
    path = f"{root}/{entry['path']}"
    t = pq.read_table(pa.BufferReader(fs.cat_file(path)))
    images = t.column("image").to_pylist()
    images[row] = BAD_PNG
    sink = pa.BufferOutputStream()
    # The same row groups (all of the first one's size but the last), as the manifest lists them.
    pq.write_table(t.set_column(2, "image", pa.array(images, pa.binary())), sink,
                   row_group_size=entry["row_groups"][0])
    data = sink.getvalue().to_pybytes()
    fs.pipe_file(path, data)
    entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    fs.pipe_file(f"{root}/manifest.json", json.dumps(manifest, indent=1).encode())
    return t.column("index")[row].as_py()

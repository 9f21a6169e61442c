"""A few images of a dataset by their index, for the cluster galleries (djc/gallery.py).

The writer gives index i to the i-th row written (djc/data/writer.py), so the row of index i is found from the
manifest's shard and row-group sizes alone, and only the row groups that hold a wanted index are read: a gallery
of 800 thumbnails out of 115,000 ImageNet-LT images reads the groups they fall in, not the dataset.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from djc.data.shards import CorruptDataError, Manifest, decode_array, fs_path


def read_images(manifest: Manifest, indices: np.ndarray) -> dict[int, np.ndarray]:
    """index -> uint8 (H, W, C) image for each wanted index; an undecodable image is left out (a gallery shows
    what it can), an index outside [0, N) is an error."""
    wanted = np.unique(np.asarray(indices, dtype=np.int64))
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= manifest.num_samples):
        raise ValueError(f"index {wanted[0] if wanted[0] < 0 else wanted[-1]} is outside the dataset "
                         f"{manifest.url} of {manifest.num_samples} images")
    # Global first row of every row group, in writing order: (G + 1,) boundaries.
    groups = [(s, g) for s, sh in enumerate(manifest.shards) for g in range(len(sh.row_groups))]
    sizes = np.array([manifest.shards[s].row_groups[g] for s, g in groups], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    where = np.searchsorted(starts, wanted, side="right") - 1  # row group of each wanted index
    fs, root = fs_path(manifest.url)
    out: dict[int, np.ndarray] = {}
    files: dict[int, pq.ParquetFile] = {}
    try:
        for u in np.unique(where).tolist():
            s, g = groups[u]
            if s not in files:
                files[s] = pq.ParquetFile(fs.open(f"{root}/{manifest.shards[s].path}", "rb"))
            t = files[s].read_row_group(g, columns=["index", "image"])
            index = t.column("index").to_numpy()
            rows = {int(i): r for r, i in enumerate(index.tolist())}
            blobs = t.column("image")
            for i in wanted[where == u].tolist():
                r = rows.get(i)
                if r is None:  # a dataset written out of order: the row groups do not hold what the sizes say
                    raise CorruptDataError(f"index {i} is not in row group {g} of {manifest.shard_url(s)}, where "
                                           f"its position puts it: the shards are not in index order")
                try:
                    out[i] = decode_array(blobs[r].as_py(), f"{manifest.shard_url(s)} row group {g} row {r}")
                except CorruptDataError:
                    continue
    finally:
        for f in files.values():
            f.close()
    return out

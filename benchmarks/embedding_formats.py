"""Which file format `djc predict --embeddings` writes: each candidate read back into the (N, D) float32 array that
faiss takes, and into pandas, for N = 100,000 embeddings of D = 128 (ImageNet-LT's train split is 115,846).

    python benchmarks/embedding_formats.py          # prints a line per dtype; docs/predict.md quotes it

Candidates: one .npy (np.load; memory-mappable), Parquet with a fixed-size-list column (pyarrow), Parquet with
one float column per dimension (pandas). The best of 3 reads is kept; files go to a temporary directory.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

N, D = 100_000, 128


def best_of(fn, n: int = 3) -> tuple[float, np.ndarray]:
    times, out = [], None
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for dtype in (np.float16, np.float32):
            z = rng.normal(size=(N, D)).astype(dtype)
            np.save(d / "e.npy", z)
            flat = pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), D)
            pq.write_table(pa.table({"index": np.arange(N), "embedding": flat}), d / "list.parquet")
            pq.write_table(pa.table({"index": np.arange(N), **{f"e{j}": z[:, j] for j in range(D)}}),
                           d / "wide.parquet")
            t_npy, a = best_of(lambda: np.load(d / "e.npy").astype(np.float32))
            t_list, b = best_of(lambda: pq.read_table(d / "list.parquet").column("embedding").combine_chunks()
                                .values.to_numpy().reshape(-1, D).astype(np.float32))
            t_wide, c = best_of(lambda: pd.read_parquet(d / "wide.parquet").drop(columns="index")
                                .to_numpy(dtype=np.float32))
            t_pd, _ = best_of(lambda: np.stack(pd.read_parquet(d / "list.parquet")["embedding"].to_numpy())
                              .astype(np.float32))
            assert np.array_equal(a, b) and np.array_equal(a, c)
            mib = {p.name: p.stat().st_size / 2**20 for p in d.iterdir()}
            print(f"{np.dtype(dtype).name}: read into a ({N}, {D}) float32 array: .npy {t_npy:.3f} s "
                  f"({mib['e.npy']:.0f} MiB); Parquet list column via pyarrow {t_list:.3f} s "
                  f"({mib['list.parquet']:.0f} MiB), via pandas {t_pd:.3f} s; Parquet column per dimension via "
                  f"pandas {t_wide:.3f} s ({mib['wide.parquet']:.0f} MiB)")


if __name__ == "__main__":
    main()

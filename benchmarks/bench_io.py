"""Label export/import speed and memory: OME-Zarr, plain zarr and TIFF writers.

Prints a table: format, input kind, seconds to write, seconds to read back, size on disk,
and the peak of Python-traced allocations during the write relative to the volume size
(a full second copy of the volume would show as >= 1.0x). The reference row in the same
run is numpy's own ``np.save`` of the same array (one full write, no compression).

    python benchmarks/bench_io.py [--shape 64 1024 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _volume(shape, seed=0):
    """Labels like an annotation: ~400 blobs of random size, ids up to 400 (uint16)."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint16)
    for i in range(1, 401):
        c = [int(rng.integers(0, s)) for s in shape]
        r = [max(1, s // 16) for s in shape]
        lab[tuple(slice(max(0, a - b), a + b) for a, b in zip(c, r, strict=True))] = i
    return lab


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs="+", default=[64, 1024, 1024])
    args = ap.parse_args()
    import dask.array as da

    from napari_sam.io.formats import read_labels, write_labels

    lab = _volume(tuple(args.shape))
    nbytes = lab.nbytes
    tmp = Path(tempfile.mkdtemp(prefix="bench_io_"))
    rows = []
    try:
        for fmt, name in (("ome-zarr", "w.ome.zarr"), ("zarr", "w.zarr"), ("tif", "w.tif")):
            write_labels(tmp / name, lab[:2, :64, :64], format=fmt)  # warm-up: imports
            read_labels(tmp / name)
        t0 = time.perf_counter()
        np.save(tmp / "ref.npy", lab)
        rows.append(
            (
                "np.save (reference)",
                "numpy",
                time.perf_counter() - t0,
                float("nan"),
                _size(tmp / "ref.npy"),
                float("nan"),
            )
        )
        for fmt, name in (("ome-zarr", "x.ome.zarr"), ("zarr", "x.zarr"), ("tif", "x.tif")):
            for kind in ("numpy", "dask"):
                data = lab if kind == "numpy" else da.from_array(lab, chunks=(8, 512, 512))
                out = tmp / f"{kind}_{name}"
                tracemalloc.start()
                t0 = time.perf_counter()
                write_labels(out, data, format=fmt, name="bench")
                t_write = time.perf_counter() - t0
                _, peak = tracemalloc.get_traced_memory()
                tracemalloc.stop()
                t0 = time.perf_counter()
                back = read_labels(out)
                t_read = time.perf_counter() - t0
                assert np.array_equal(back.data, lab)
                rows.append((fmt, kind, t_write, t_read, _size(out), peak / nbytes))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"volume {tuple(args.shape)} uint16 = {nbytes / 2**20:.0f} MiB, {os.cpu_count()} CPUs")
    print(
        f"| {'format':20} | {'input':5} | {'write s':>7} | {'read s':>6} | {'MiB on disk':>11} | {'peak mem / volume':>17} |"
    )
    print(f"|{'-' * 22}|{'-' * 7}|{'-' * 9}|{'-' * 8}|{'-' * 13}|{'-' * 19}|")
    for fmt, kind, tw, tr, size, peak in rows:
        print(
            f"| {fmt:20} | {kind:5} | {tw:7.2f} | {tr:6.2f} | {size / 2**20:11.2f} | {peak:16.2f}x |"
        )


if __name__ == "__main__":
    main()

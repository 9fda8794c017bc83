"""Shared array helpers for the writers: validation, smallest dtype, chunk-by-chunk reads.

Every writer reads its input one region at a time through :func:`iter_regions` and
:func:`read_block`, so numpy arrays, dask arrays and zarr arrays are all written without
a second full-size copy in memory (a region is at most ``max_bytes`` of input).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SUPPORTED_NDIM = (2, 3, 4, 5)
DEFAULT_REGION_BYTES = 64 * 2**20
MAX_COLOR_IDS = 65536  # above this many ids, no per-id colours are stored

_UINTS = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64))
_FIX = (
    "Label ids must be whole numbers >= 0 (0 = background). Relabel first, e.g. with "
    "skimage.segmentation.relabel_sequential, or cast an integral float array with "
    ".astype(int)."
)


def describe(data: Any) -> str:
    return f"{type(data).__name__} of shape {tuple(getattr(data, 'shape', ()))}"


def check_array(data: Any, what: str = "labels") -> None:
    """Raise a clear TypeError/ValueError unless ``data`` looks like a 2-5D array."""
    if not (hasattr(data, "shape") and hasattr(data, "dtype") and hasattr(data, "__getitem__")):
        raise TypeError(
            f"{what} must be an array (numpy, dask or zarr), got {type(data).__name__}"
        )
    ndim = len(data.shape)
    if ndim not in SUPPORTED_NDIM:
        raise ValueError(
            f"{what} with {ndim} dimension(s) (shape {tuple(data.shape)}) are not supported: "
            f"napari-sam reads and writes 2D to 5D arrays (y, x / z, y, x / t, z, y, x / "
            "t, c, z, y, x). Add or remove axes first (e.g. data[None] or data[0])."
        )
    if 0 in data.shape:
        raise ValueError(f"{what} are empty (shape {tuple(data.shape)}); nothing to write")
    if np.dtype(data.dtype).kind not in "biuf":
        raise TypeError(
            f"{what} have dtype {np.dtype(data.dtype)}, which cannot be stored as an image; "
            "use an integer, boolean or float array"
        )


def check_vector(
    values: Sequence[float] | None, ndim: int, name: str, default: float
) -> tuple[float, ...]:
    """Return ``values`` as a tuple of ``ndim`` finite floats (``default`` when None)."""
    if values is None:
        return (float(default),) * ndim
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of {ndim} numbers, got {values!r}") from None
    if len(out) != ndim:
        raise ValueError(
            f"{name} has {len(out)} values but the data has {ndim} dimensions; give one "
            f"value per axis: {name}={out!r}"
        )
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} values must be finite numbers, got {out!r}")
    if name.endswith("scale") and any(v <= 0 for v in out):
        raise ValueError(f"{name} values must be > 0 (pixel sizes), got {out!r}")
    return out


def smallest_uint(max_value: int) -> np.dtype:
    """Smallest unsigned integer dtype holding ``0..max_value``."""
    for dt in _UINTS:
        if max_value <= np.iinfo(dt).max:
            return dt
    raise ValueError(
        f"label id {max_value} does not fit in uint64 (max {np.iinfo(np.uint64).max}); " + _FIX
    )


def default_chunks(shape: Sequence[int], n_space: int | None = None) -> tuple[int, ...]:
    """Chunk shape of ~1-4 M elements: 1 along leading (t, c) axes, blocks along space."""
    ndim = len(shape)
    if n_space is None:
        n_space = 3 if ndim >= 3 else 2
    space = (1024, 1024) if n_space == 2 else (32, 256, 256)
    lead = (1,) * (ndim - n_space)
    return tuple(min(int(s), c) for s, c in zip(shape, lead + space, strict=True))


def check_chunks(chunks: Sequence[int] | None, shape: Sequence[int], n_space=None):
    if chunks is None:
        return default_chunks(shape, n_space)
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != len(shape) or any(c < 1 for c in chunks):
        raise ValueError(
            f"chunks must have one positive size per axis ({len(shape)} axes), got {chunks}"
        )
    return tuple(min(c, s) for c, s in zip(chunks, shape, strict=True))


def iter_regions(
    shape: Sequence[int],
    chunks: Sequence[int],
    itemsize: int,
    max_bytes: int = DEFAULT_REGION_BYTES,
) -> Iterator[tuple[slice, ...]]:
    """Yield chunk-aligned regions covering ``shape``, each at most ``max_bytes`` if possible.

    A region spans whole chunks: one chunk-row along axis 0 and everything else, split
    along axis 1, 2, ... (by their chunk size) while it is still larger than ``max_bytes``.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)

    def rec(prefix: tuple[slice, ...], axis: int) -> Iterator[tuple[slice, ...]]:
        rest = math.prod(shape[axis + 1 :]) * itemsize
        for start in range(0, shape[axis], chunks[axis]):
            stop = min(start + chunks[axis], shape[axis])
            here = prefix + (slice(start, stop),)
            if axis + 1 == ndim or (stop - start) * rest <= max_bytes:
                yield here + tuple(slice(0, s) for s in shape[axis + 1 :])
            else:
                yield from rec(here, axis + 1)

    yield from rec((), 0)


def is_dask(data: Any) -> bool:
    return hasattr(data, "dask") and hasattr(data, "chunks") and hasattr(data, "compute")


def _fitting_divisor(dask_chunk: int, target: int) -> int:
    """A zarr chunk size that divides ``dask_chunk`` and is close to ``target``."""
    if dask_chunk <= target:
        return dask_chunk
    for size in range(target, max(1, target // 2) - 1, -1):
        if dask_chunk % size == 0:
            return size
    return dask_chunk  # no good divisor: one zarr chunk per dask chunk


def plan_chunks(
    data: Any, chunks: Sequence[int] | None, n_space: int | None = None
) -> tuple[Any, tuple[int, ...]]:
    """Zarr chunks for ``data`` and the data to read (a dask array may be rechunked).

    For dask input the zarr chunks divide the dask chunks, so that each dask block is
    computed exactly once and written as whole zarr chunks.
    """
    if not is_dask(data):
        return data, check_chunks(chunks, data.shape, n_space)
    regular = all(len(set(c[:-1])) <= 1 and c[-1] <= c[0] for c in data.chunks)
    if chunks is None and regular:
        default = default_chunks(data.shape, n_space)
        return data, tuple(
            _fitting_divisor(int(dc), d) for dc, d in zip(data.chunksize, default, strict=True)
        )
    chunks = check_chunks(chunks, data.shape, n_space)
    aligned = regular and all(
        int(dc) % c == 0 or int(dc) >= s
        for dc, c, s in zip(data.chunksize, chunks, data.shape, strict=True)
    )
    if not aligned:
        data = data.rechunk(chunks)
    return data, chunks


def iter_input_regions(
    data: Any, chunks: Sequence[int], max_bytes: int = DEFAULT_REGION_BYTES
) -> Iterator[tuple[slice, ...]]:
    """Regions to read from ``data``: its dask blocks (each computed once), or chunk-
    aligned regions of at most ``max_bytes`` for numpy / zarr input."""
    if is_dask(data):
        bounds = [np.cumsum((0, *c)).tolist() for c in data.chunks]
        for idx in itertools.product(*(range(len(c)) for c in data.chunks)):
            yield tuple(slice(b[i], b[i + 1]) for b, i in zip(bounds, idx, strict=True))
    else:
        yield from iter_regions(data.shape, chunks, np.dtype(data.dtype).itemsize, max_bytes)


def read_block(data: Any, region: tuple[slice, ...]) -> np.ndarray:
    """``data[region]`` as a numpy array (computes a dask block; reads a zarr block)."""
    block = data[region]
    if hasattr(block, "compute"):
        block = block.compute()
    return np.asarray(block)


def _where(region: tuple[slice, ...], block: np.ndarray, mask: np.ndarray) -> str:
    idx = np.unravel_index(int(np.flatnonzero(mask)[0]), block.shape)
    pos = tuple(int(r.start) + int(i) for r, i in zip(region, idx, strict=True))
    return f"at index {pos}"


def check_label_block(block: np.ndarray, region: tuple[slice, ...]) -> tuple[int, int]:
    """Validate one block of labels; return its (min, max) as Python ints."""
    kind = block.dtype.kind
    if kind == "b":
        return int(block.min()), int(block.max())
    if kind == "f":
        bad = ~np.isfinite(block)
        if bad.any():
            raise ValueError(
                f"labels contain NaN or infinity {_where(region, block, bad)}; " + _FIX
            )
        frac = block != np.floor(block)
        if frac.any():
            value = block[np.unravel_index(int(np.flatnonzero(frac)[0]), block.shape)].item()
            raise ValueError(
                f"labels contain the non-integer value {value} {_where(region, block, frac)}; "
                + _FIX
            )
    lo, hi = block.min().item(), block.max().item()
    if lo < 0:
        raise ValueError(
            f"labels contain the negative value {lo} {_where(region, block, block < 0)}; " + _FIX
        )
    if kind == "f" and hi >= 2.0**64:
        raise ValueError(f"label id {hi:.17g} does not fit in uint64; " + _FIX)
    return int(lo), int(hi)


def ids_in(block: np.ndarray, hi: int) -> np.ndarray:
    """Distinct nonzero ids in a validated label block (bincount when ids are small)."""
    if block.dtype.kind in "bui" and hi < (1 << 20) and block.size > 8 * (hi + 1):
        flat = block.reshape(-1)
        counts = np.zeros(hi + 1, np.int64)
        step = 1 << 22  # bincount converts to intp: bound that temporary to 32 MiB
        for start in range(0, flat.size, step):
            counts += np.bincount(flat[start : start + step], minlength=hi + 1)
        return np.flatnonzero(counts[1:]) + 1
    u = np.unique(block)
    return u[u != 0].astype(np.uint64)


@dataclass
class LabelStats:
    """What a pass over the labels found. ``ids``: sorted nonzero ids, None if > cap."""

    min: int
    max: int
    dtype: np.dtype
    ids: list[int] | None = field(default=None)


def label_stats(
    data: Any,
    chunks: Sequence[int],
    *,
    collect_ids: bool = True,
    max_ids: int = MAX_COLOR_IDS,
    max_bytes: int = DEFAULT_REGION_BYTES,
) -> LabelStats:
    """One validating pass over ``data`` region by region (no full copy)."""
    lo, hi = None, None
    ids: set[int] | None = set() if collect_ids else None
    for region in iter_input_regions(data, chunks, max_bytes):
        block = read_block(data, region)
        blo, bhi = check_label_block(block, region)
        lo = blo if lo is None else min(lo, blo)
        hi = bhi if hi is None else max(hi, bhi)
        if ids is not None:
            ids.update(ids_in(block, bhi).tolist())
            if len(ids) > max_ids:
                ids = None
    assert lo is not None and hi is not None
    return LabelStats(lo, hi, smallest_uint(hi), sorted(ids) if ids is not None else None)


def check_dtype_fits(dtype: Any, max_value: int) -> np.dtype:
    """Validate a user-chosen label dtype against the largest id."""
    dt = np.dtype(dtype)
    if dt.kind not in "ui":
        raise TypeError(
            f"label dtype must be an integer type (uint8/16/32/64), got {dt}; leave dtype "
            "unset to choose the smallest that fits"
        )
    if max_value > np.iinfo(dt).max:
        raise ValueError(
            f"label id {max_value} does not fit in {dt} (max {np.iinfo(dt).max}); choose "
            f"{smallest_uint(max_value)} or leave dtype unset to choose the smallest that fits"
        )
    return dt


def cast_block(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a validated label block (copy only when the dtype differs)."""
    return block.astype(dtype, copy=False)


def auto_colors(ids: Sequence[int]) -> dict[int, tuple[int, int, int, int]]:
    """A deterministic, well-spread RGBA colour (0-255) per label id (golden-ratio hue)."""
    import colorsys

    out = {}
    for i in ids:
        h = (int(i) * 0.618033988749895) % 1.0
        s = 0.55 + 0.45 * ((int(i) * 7919) % 3) / 2
        r, g, b = colorsys.hsv_to_rgb(h, s, 1.0)
        out[int(i)] = (round(r * 255), round(g * 255), round(b * 255), 255)
    return out

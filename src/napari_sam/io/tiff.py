"""Labels to and from TIFF (tifffile), compressed, with ImageJ-compatible calibration.

Written files
-------------
* ids up to 65535 (uint8 / uint16): an ImageJ hyperstack (axes a subset of TZCYX),
  zlib (deflate) compressed, with the voxel size as ImageJ reads it: X/Y resolution tags
  (pixels per unit), ``spacing`` (z step), ``finterval`` (t step), ``unit`` and
  ``xorigin``/``yorigin``/``zorigin`` (the translation, in pixels);
* larger ids (uint32 / uint64, which ImageJ hyperstacks cannot hold), or labels with both
  c and z axes: a standard zlib-compressed multi-page TIFF with the same resolution tags
  and tifffile's JSON "shaped" description (Fiji's Bio-Formats opens it).

Both carry a ``napari_sam`` JSON entry with the exact name, scale, translate, axes and
units, so a round trip is exact (TIFF resolution tags are rationals and would round the
pixel size). Files from other programs are read from the ImageJ / resolution metadata.

The file is written one 2D plane at a time from numpy, dask or zarr input (no second
full copy in memory), to a temporary sibling that is renamed into place when complete.
A session, if given, is saved beside the file as ``<file>.session.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.io import _arrays as A
from napari_sam.io._meta import (
    LabelsData,
    check_axes,
    imagej_unit,
    layer_geometry,
    unit_from_imagej,
)
from napari_sam.io.atomic import atomic_path, check_destination

__all__ = ["read_labels_tiff", "write_labels_tiff"]

_KEY = "napari_sam"


def _planes(prep, check: bool) -> Iterator[np.ndarray]:
    """Yield the 2D planes of ``prep.data`` in C order, reading slabs of <= max_bytes along
    the last leading axis (e.g. z), one index of the axes before it at a time."""
    data = prep.data
    shape = tuple(int(s) for s in data.shape)
    hw = (slice(0, shape[-2]), slice(0, shape[-1]))
    lead = shape[:-2]
    plane_bytes = shape[-1] * shape[-2] * np.dtype(data.dtype).itemsize
    per_slab = max(1, prep.max_bytes // max(plane_bytes, 1))
    if A.is_dask(data) and lead:
        per_slab = int(data.chunksize[-3])  # one dask block row at a time: computed once
    if not lead:
        regions: Iterator[tuple[slice, ...]] = iter([hw])
    else:
        regions = (
            tuple(slice(i, i + 1) for i in idx)
            + (slice(start, min(start + per_slab, lead[-1])),)
            + hw
            for idx in np.ndindex(*lead[:-1])
            for start in range(0, lead[-1], per_slab)
        )
    for region in regions:
        block = A.read_block(data, region)
        if check:
            _lo, hi = A.check_label_block(block, region)
            A.check_dtype_fits(prep.dtype, hi)
        for plane in block.reshape((-1, *block.shape[-2:])):
            yield A.cast_block(plane, prep.dtype)
        del block


def write_labels_tiff(
    path: str | os.PathLike,
    labels: Any,
    *,
    name: str = "labels",
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    axes: str | Sequence[str] | None = None,
    units: str | Sequence[Any] | None = None,
    dtype: Any = None,
    overwrite: bool = False,
    session: Any = None,
    max_bytes: int = A.DEFAULT_REGION_BYTES,
) -> Path:
    """Write ``labels`` (2-5D, axes default ``yx``/``zyx``/``tzyx``/``tczyx``) to a TIFF.

    ``scale``/``translate`` are napari's (world = index * scale + translate); ``units`` one
    per axis or one string for the space axes (``"um"``). See the module docstring for the
    layout. Refuses an existing ``path`` (or session sidecar) unless ``overwrite=True``.
    """
    from napari_sam.io.labels_zarr import _prepare, _session_json

    dest = check_destination(path, overwrite)
    session_json = _session_json(session)
    if session_json is not None:
        from napari_sam.io.session import session_path

        check_destination(session_path(dest), overwrite)
    prep = _prepare(
        labels,
        name=name,
        scale=scale,
        translate=translate,
        axes=axes,
        units=units,
        dtype=dtype,
        chunks=None,
        colors={},
        max_bytes=max_bytes,
    )
    shape = tuple(int(s) for s in prep.data.shape)
    ax = prep.axes
    sc = dict(zip(ax, prep.scale, strict=True))
    tr = dict(zip(ax, prep.translate, strict=True))
    un = dict(zip(ax, prep.units, strict=True))
    exact = {
        "name": prep.name,
        "scale": list(prep.scale),
        "translate": list(prep.translate),
        "axes": list(ax),
        "units": list(prep.units),
        "format_version": 1,
    }
    imagej = np.dtype(prep.dtype).itemsize <= 2 and not ("c" in ax and "z" in ax)
    space_unit = un.get("x") or un.get("y")
    kwargs: dict[str, Any] = {
        "shape": shape,
        "dtype": prep.dtype,
        "photometric": "minisblack",
        "compression": "zlib",
        "resolution": (1.0 / sc["x"], 1.0 / sc["y"]),
    }
    if imagej:
        meta: dict[str, Any] = {"axes": "".join(ax).upper()}
        if "z" in ax:
            meta["spacing"] = sc["z"]
        if "t" in ax:
            meta["finterval"] = sc["t"]
        meta["unit"] = imagej_unit(space_unit) or "pixel"
        meta["xorigin"] = -tr["x"] / sc["x"]
        meta["yorigin"] = -tr["y"] / sc["y"]
        if "z" in ax:
            meta["zorigin"] = -tr["z"] / sc["z"]
        meta[_KEY] = json.dumps(exact, ensure_ascii=True, allow_nan=False)
        kwargs.update(imagej=True, metadata=meta)
    else:
        kwargs.update(
            metadata={"axes": "".join(ax).upper(), _KEY: exact},
            resolutionunit="MICROMETER" if space_unit == "micrometer" else None,
        )
    import tifffile

    with atomic_path(dest, overwrite=overwrite) as tmp:
        planes = _planes(prep, check=not prep.validated)
        tifffile.imwrite(tmp, planes, **kwargs)
    if session_json is not None:
        from napari_sam.io.atomic import atomic_write_text
        from napari_sam.io.session import session_path

        atomic_write_text(session_path(dest), session_json, overwrite=overwrite)
    return dest


def _resolution(page) -> tuple[float, float] | None:
    try:
        xr = page.tags["XResolution"].value
        yr = page.tags["YResolution"].value
    except KeyError:
        return None
    x = xr[0] / xr[1] if xr[1] else 0.0
    y = yr[0] / yr[1] if yr[1] else 0.0
    if x <= 0 or y <= 0:
        return None
    return 1.0 / x, 1.0 / y


def read_labels_tiff(path: str | os.PathLike, *, lazy: bool = False) -> LabelsData:
    """Read a labels TIFF: data plus name/scale/translate/axes/units.

    napari-sam files are restored exactly from their ``napari_sam`` entry; other ImageJ
    TIFFs from resolution, ``spacing``, ``finterval``, ``unit`` and origins; plain TIFFs
    get scale 1 (or the resolution tags) and translate 0. ``lazy`` returns a zarr array
    reading planes on demand.
    """
    import tifffile

    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        tif = tifffile.TiffFile(path)
    except Exception as e:
        raise ValueError(f"{str(path)!r} is not a readable TIFF file ({e})") from e
    with tif:
        series = tif.series[0]
        shape = tuple(series.shape)
        exact = None
        ij = tif.imagej_metadata or {}
        if _KEY in ij:
            try:
                exact = json.loads(ij[_KEY])
            except ValueError:
                exact = None
        elif tif.shaped_metadata:
            exact = tif.shaped_metadata[0].get(_KEY)
        if lazy:
            import zarr

            data = zarr.open(series.aszarr(), mode="r")
        else:
            data = series.asarray()
        page = tif.pages[0]
        res = _resolution(page)
    A.check_array(data, "labels in " + path.name)
    ndim = len(shape)
    if exact:
        axes = check_axes(exact["axes"], ndim)
        scale, trans = layer_geometry(ndim, exact["scale"], exact["translate"])
        units = tuple(exact.get("units") or (None,) * ndim)
        name = str(exact.get("name") or path.stem)
        return LabelsData(
            data=data,
            name=name,
            scale=scale,
            translate=trans,
            axes=axes,
            units=units,
            path=str(path),
            extra={"imagej": bool(ij)},
        )
    # foreign file: derive what we can
    series_axes = series.axes.lower() if series.axes else ""
    if len(series_axes) == ndim and all(a in "tczyx" for a in series_axes):
        try:
            axes = check_axes(series_axes, ndim)
        except ValueError:
            axes = check_axes(None, ndim)
    else:
        axes = check_axes(None, ndim)
    sc = dict.fromkeys(axes, 1.0)
    org = dict.fromkeys(axes, 0.0)
    if res is not None:
        sc["x"], sc["y"] = res
    if "z" in axes and ij.get("spacing"):
        sc["z"] = float(ij["spacing"])
    if "t" in axes and ij.get("finterval"):
        sc["t"] = float(ij["finterval"])
    for a in ("x", "y", "z"):
        if a in axes and ij.get(f"{a}origin") is not None:
            org[a] = float(ij[f"{a}origin"])
    unit = unit_from_imagej(ij.get("unit")) if ij else None
    scale = tuple(sc[a] for a in axes)
    trans = tuple(-org[a] * sc[a] for a in axes)
    units = tuple(unit if a in "zyx" else None for a in axes)
    return LabelsData(
        data=data,
        name=path.name.split(".")[0],
        scale=scale,
        translate=trans,
        axes=axes,
        units=units,
        path=str(path),
        extra={"imagej": bool(ij)},
    )

"""Labels to and from zarr v3: OME-Zarr (NGFF 0.5) labels and plain zarr arrays.

Formats written
---------------
OME-Zarr, NGFF 0.5 (https://ngff.openmicroscopy.org/0.5/, zarr v3, all OME metadata
under the ``"ome"`` attribute key). Three layouts, chosen by the arguments:

* labels only (``image=None``, new path): the store root is a multiscale *image-label*
  group (``ome.multiscales`` + ``ome.image-label``), the layout of one entry of an NGFF
  ``labels/`` group; NGFF readers (ome-zarr-py / napari-ome-zarr) open it as labels;
* image + labels (``image=...``): the root is an image group (``ome.multiscales``,
  arrays ``0``, ``1``, ...), with ``labels/`` (``ome.labels = [<name>]``) holding
  ``labels/<name>``, an image-label group whose ``image-label.source.image`` is ``../../``;
* an existing OME-Zarr image group as ``path`` (and ``image=None``): ``labels/<name>`` is
  added to it; its shape must match the image (minus the channel axis).

Every multiscale has ``axes`` (name, type, unit) and per level
``coordinateTransformations = [scale, translation]`` taken from the layer; ``levels > 1``
adds 2x-subsampled levels in y and x (nearest: every other pixel, so the translation is
unchanged and label ids are never blended). ``image-label.colors`` lists an RGBA colour
per label id.

Plain zarr: one zarr v3 array, ``dimension_names`` = axes, attributes ``name``, ``scale``,
``translate``, ``axes``, ``units`` and ``napari_sam`` (format marker).

Every writer is atomic (:mod:`napari_sam.io.atomic`), refuses an existing destination
unless ``overwrite=True``, chooses the smallest unsigned dtype holding the largest id
(unless ``dtype`` is given, which is then checked), and reads its input region by
region, so numpy, dask and zarr inputs are written without a second full copy in memory.
"""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.io import _arrays as A
from napari_sam.io._meta import (
    AXIS_TYPES,
    ImageData,
    LabelsData,
    check_axes,
    check_colors,
    check_name,
    check_units,
    layer_geometry,
)
from napari_sam.io.atomic import atomic_path, atomic_write_text, check_destination

__all__ = [
    "NGFF_VERSION",
    "OmeZarrContents",
    "is_ome_zarr",
    "read_labels_zarr",
    "read_ome_zarr",
    "write_labels_zarr",
    "write_ome_zarr_labels",
]

NGFF_VERSION = "0.5"
PLAIN_FORMAT = "napari-sam-labels"
PLAIN_FORMAT_VERSION = 1
SESSION_FILE = "napari_sam_session.json"


def _zarr():
    import zarr

    return zarr


def _compressor():
    from zarr.codecs import BloscCodec

    # Blosc(zstd) with bit-shuffle: small label files, readable by every zarr v3 reader.
    return BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")


# --------------------------------------------------------------------------- writing


@dataclass
class _Prepared:
    """Validated labels plus everything needed to write them."""

    data: Any
    name: str
    axes: tuple[str, ...]
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    units: tuple[str | None, ...]
    dtype: np.dtype | None  # None: validated in the write pass
    chunks: tuple[int, ...]
    ids: list[int] | None = None
    max_bytes: int = A.DEFAULT_REGION_BYTES
    colors: dict[int, tuple[int, int, int, int]] | None = None
    validated: bool = False  # True after a stats pass checked every value
    color_fn: Any = None  # colors given as a function of the ids found
    written_ids: set[int] | None = field(default_factory=set)


def _prepare(
    labels,
    *,
    name,
    scale,
    translate,
    axes,
    units,
    dtype,
    chunks,
    colors=None,
    max_bytes=A.DEFAULT_REGION_BYTES,
) -> _Prepared:
    A.check_array(labels, "labels")
    ndim = len(labels.shape)
    axes = check_axes(axes, ndim)
    scale, translate = layer_geometry(ndim, scale, translate)
    n_space = sum(AXIS_TYPES[a] == "space" for a in axes)
    labels, chunks = A.plan_chunks(labels, chunks, n_space)
    color_fn = colors if callable(colors) else None
    prep = _Prepared(
        data=labels,
        name=check_name(name),
        axes=axes,
        scale=scale,
        translate=translate,
        units=check_units(units, axes),
        dtype=None,
        chunks=chunks,
        max_bytes=max_bytes,
        colors=None if color_fn else check_colors(colors),
    )
    if dtype is None:
        stats = A.label_stats(labels, chunks, collect_ids=prep.colors is None, max_bytes=max_bytes)
        prep.dtype = stats.dtype
        prep.ids = stats.ids
        prep.validated = True
    else:
        prep.dtype = A.check_dtype_fits(dtype, 0)
    prep.color_fn = color_fn
    return prep


def _write_label_array(prep: _Prepared, target, key: str | None, attributes=None, validate=None):
    """Create the zarr array (``target`` is a Group and ``key`` its name, or a store) and
    fill it region by region from ``prep.data``."""
    zarr = _zarr()
    kwargs = {
        "shape": tuple(int(s) for s in prep.data.shape),
        "chunks": prep.chunks,
        "dtype": prep.dtype,
        "fill_value": 0,
        "compressors": _compressor(),
        "dimension_names": prep.axes,
    }
    if attributes is not None:
        kwargs["attributes"] = attributes
    if key is None:
        arr = zarr.create_array(store=target, **kwargs)
    else:
        arr = target.create_array(key, **kwargs)
    check = not prep.validated  # values not validated by a stats pass yet
    collect = not prep.validated and prep.colors is None
    for region in A.iter_input_regions(prep.data, prep.chunks, prep.max_bytes):
        block = A.read_block(prep.data, region)
        hi = None
        if check:
            _lo, hi = A.check_label_block(block, region)
            A.check_dtype_fits(prep.dtype, hi)
        if collect and prep.written_ids is not None:
            if hi is None:
                hi = A.check_label_block(block, region)[1]
            prep.written_ids.update(A.ids_in(block, hi).tolist())
            if len(prep.written_ids) > A.MAX_COLOR_IDS:
                prep.written_ids = None
        arr[region] = A.cast_block(block, prep.dtype)
        del block
    return arr


def _write_pyramid(group, base_key: str, shape, axes, chunks, levels: int, max_bytes: int):
    """Add levels 1..levels-1 to ``group``, each a 2x stride subsample of the previous
    level in y and x (read back from disk region by region)."""
    prev = group[base_key]
    out = []
    for level in range(1, levels):
        factors = tuple(2 if a in ("y", "x") else 1 for a in axes)
        new_shape = tuple(-(-s // f) for s, f in zip(prev.shape, factors, strict=True))
        new_chunks = tuple(min(c, s) for c, s in zip(chunks, new_shape, strict=True))
        arr = group.create_array(
            str(level),
            shape=new_shape,
            chunks=new_chunks,
            dtype=prev.dtype,
            fill_value=prev.fill_value,
            compressors=_compressor(),
            dimension_names=tuple(axes),
        )
        for region in A.iter_regions(new_shape, new_chunks, prev.dtype.itemsize, max_bytes):
            src = tuple(
                slice(r.start * f, r.stop * f, f) for r, f in zip(region, factors, strict=True)
            )
            arr[region] = np.asarray(prev[src])
        out.append((str(level), factors))
        prev = arr
    return out


def _level_factors(axes, levels):
    return [tuple(2**k if a in ("y", "x") else 1 for a in axes) for k in range(levels)]


def _multiscale(name, axes, units, scale, translate, levels, kind: str) -> dict[str, Any]:
    axes_meta = []
    for a, u in zip(axes, units, strict=True):
        entry: dict[str, Any] = {"name": a, "type": AXIS_TYPES[a]}
        if u is not None:
            entry["unit"] = u
        axes_meta.append(entry)
    datasets = []
    for k, factors in enumerate(_level_factors(axes, levels)):
        datasets.append(
            {
                "path": str(k),
                "coordinateTransformations": [
                    {
                        "type": "scale",
                        "scale": [s * f for s, f in zip(scale, factors, strict=True)],
                    },
                    {"type": "translation", "translation": list(translate)},
                ],
            }
        )
    ms: dict[str, Any] = {"name": name, "axes": axes_meta, "datasets": datasets}
    if levels > 1:
        ms["type"] = "subsample"
        ms["metadata"] = {
            "description": f"{kind}: every 2nd pixel in y and x per level (nearest, no blending)",
        }
    return ms


def _check_levels(levels: int, shape, axes) -> int:
    if not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1, got {levels!r}")
    yx = [s for s, a in zip(shape, axes, strict=True) if a in ("y", "x")]
    if min(yx) < 2 ** (levels - 1):
        raise ValueError(
            f"levels={levels} is too many for y, x size {tuple(yx)}: the coarsest level "
            "would be smaller than one pixel"
        )
    return int(levels)


def _path_key(name: str) -> str:
    """A zarr-safe folder name for a label name (the exact name stays in the metadata)."""
    key = re.sub(r"[\\/\x00-\x1f:*?\"<>|]", "_", name).strip()
    key = key.lstrip(".")
    if key.startswith("__"):
        key = key.lstrip("_")
    return key or "labels"


def _write_image_label_group(
    root: Path, prep: _Prepared, *, levels: int, source: str | None, session_json: str | None
) -> None:
    """Write a complete image-label multiscale group at folder ``root`` (must not exist)."""
    zarr = _zarr()
    from zarr.storage import LocalStore

    group = zarr.create_group(store=LocalStore(root), zarr_format=3)
    _write_label_array(prep, group, "0")
    _write_pyramid(group, "0", prep.data.shape, prep.axes, prep.chunks, levels, prep.max_bytes)
    colors = prep.colors
    if colors is None:
        ids = prep.ids if prep.validated else prep.written_ids
        if ids is not None:
            fn = prep.color_fn or A.auto_colors
            colors = check_colors(fn(sorted(ids)))
    image_label: dict[str, Any] = {"version": NGFF_VERSION}
    if colors is not None:
        image_label["colors"] = [
            {"label-value": k, "rgba": list(v)} for k, v in sorted(colors.items())
        ]
    if source is not None:
        image_label["source"] = {"image": source}
    group.attrs.update(
        {
            "ome": {
                "version": NGFF_VERSION,
                "multiscales": [
                    _multiscale(
                        prep.name,
                        prep.axes,
                        prep.units,
                        prep.scale,
                        prep.translate,
                        levels,
                        "labels",
                    )
                ],
                "image-label": image_label,
            },
            "napari_sam": {"name": prep.name, "format_version": PLAIN_FORMAT_VERSION},
        }
    )
    if session_json is not None:
        (root / SESSION_FILE).write_text(session_json, encoding="utf-8")


def _session_json(session) -> str | None:
    if session is None:
        return None
    from napari_sam.io.session import SessionRecord

    if not isinstance(session, SessionRecord):
        raise TypeError(f"session must be a SessionRecord, got {type(session).__name__}")
    return session.to_json()


def _write_image(group, image, axes, scale, translate, units, levels, chunks, name, max_bytes):
    """Write the image arrays ``0..levels-1`` into ``group`` and its multiscales metadata."""
    zarr = _zarr()  # noqa: F841
    shape = tuple(int(s) for s in image.shape)
    n_space = sum(AXIS_TYPES[a] == "space" for a in axes)
    image, chunks = A.plan_chunks(image, chunks, n_space)
    arr = group.create_array(
        "0",
        shape=shape,
        chunks=chunks,
        dtype=np.dtype(image.dtype),
        fill_value=0,
        compressors=_compressor(),
        dimension_names=tuple(axes),
    )
    for region in A.iter_input_regions(image, chunks, max_bytes):
        arr[region] = A.read_block(image, region)
    _write_pyramid(group, "0", shape, axes, chunks, levels, max_bytes)
    return _multiscale(name, axes, units, scale, translate, levels, "image")


def _image_axes(label_axes: tuple[str, ...], image, rgb: bool | None):
    """Image axes for an image that matches the labels, optionally with a channel axis."""
    A.check_array(image, "image")
    lshape = tuple(image.shape)
    if rgb is None:
        rgb = len(image.shape) == len(label_axes) + 1 and image.shape[-1] in (3, 4)
    if rgb:
        return label_axes, "rgb"
    if len(image.shape) == len(label_axes):
        return label_axes, None
    if len(image.shape) == len(label_axes) + 1 and "c" not in label_axes:
        # channel-first image (c, ...) as NGFF stores it
        n_lead = sum(a == "t" for a in label_axes)
        axes = label_axes[:n_lead] + ("c",) + label_axes[n_lead:]
        return axes, "channel"
    raise ValueError(
        f"image shape {lshape} does not match labels with axes {label_axes}: the image must "
        "have the labels' shape, optionally with one channel axis (or RGB last)"
    )


def write_ome_zarr_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    name: str = "labels",
    image: Any = None,
    image_name: str = "image",
    rgb: bool | None = None,
    image_scale: Sequence[float] | None = None,
    image_translate: Sequence[float] | None = None,
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    axes: str | Sequence[str] | None = None,
    units: str | Sequence[Any] | None = None,
    colors: dict | None = None,
    dtype: Any = None,
    chunks: Sequence[int] | None = None,
    levels: int | None = None,
    overwrite: bool = False,
    session: Any = None,
    max_bytes: int = A.DEFAULT_REGION_BYTES,
) -> Path:
    """Write ``labels`` as NGFF 0.5 OME-Zarr labels (see the module docstring for layouts).

    Parameters
    ----------
    labels : array (numpy, dask, zarr), 2-5D, axes ``axes`` (default ``yx``, ``zyx``,
        ``tzyx``, ``tczyx``); non-negative whole numbers (integral floats accepted).
    image : optional array with the labels' shape (or with a channel axis, or RGB last when
        ``rgb``); written as the parent image group. RGB ``(..., 3)`` is stored channel-first.
    image_scale, image_translate : the image's geometry (per labels axis); default the
        labels' ``scale`` / ``translate``.
    scale, translate : per axis, napari layer ``scale`` / ``translate`` (world =
        index * scale + translate); written as the level-0 coordinateTransformations.
    units : one unit per axis or one string for the space axes (``"um"`` -> ``micrometer``).
    colors : ``{id: (r, g, b, a)}`` (ints 0-255 or floats 0-1), or a function of the sorted
        list of ids present returning such a dict; default: a deterministic colour per id.
    dtype : storage dtype; default the smallest of uint8/16/32/64 holding the largest id.
    levels : number of resolution levels (1 = no pyramid). Default 1, or the existing
        image's number of levels when adding to an image (NGFF requires them to match).
    session : optional :class:`~napari_sam.io.session.SessionRecord`, saved as
        ``napari_sam_session.json`` inside the label group, in the same atomic write.

    Returns the path of the store. Raises FileExistsError for an existing path (except an
    OME-Zarr image group, to which labels are added) unless ``overwrite=True``.
    """
    dest = Path(path).expanduser().absolute()
    session_json = _session_json(session)
    existing_image = image is None and _is_ome_image_group(dest)
    if existing_image:
        return _add_labels_to_image(
            dest,
            labels,
            name=name,
            scale=scale,
            translate=translate,
            axes=axes,
            units=units,
            colors=colors,
            dtype=dtype,
            chunks=chunks,
            levels=levels,
            overwrite=overwrite,
            session_json=session_json,
            max_bytes=max_bytes,
        )
    check_destination(dest, overwrite)
    if levels is None:
        levels = 1
    prep = _prepare(
        labels,
        name=name,
        scale=scale,
        translate=translate,
        axes=axes,
        units=units,
        dtype=dtype,
        chunks=chunks,
        colors=colors,
        max_bytes=max_bytes,
    )
    levels = _check_levels(levels, prep.data.shape, prep.axes)
    if image is not None:
        img_axes, mode = _image_axes(prep.axes, image, rgb)
        n_lead = sum(a == "t" for a in prep.axes)
        if mode == "rgb":
            image = _channel_first(image, n_lead)
            img_axes = prep.axes[:n_lead] + ("c",) + prep.axes[n_lead:]
        if mode is None:
            spatial = tuple(image.shape)
        else:
            spatial = tuple(s for s, a in zip(image.shape, img_axes, strict=True) if a != "c")
        if spatial != tuple(prep.data.shape):
            raise ValueError(
                f"image shape {tuple(image.shape)} does not match labels shape "
                f"{tuple(prep.data.shape)} (image axes {''.join(img_axes)})"
            )

    with atomic_path(dest, overwrite=overwrite) as tmp:
        if image is None:
            _write_image_label_group(
                tmp, prep, levels=levels, source=None, session_json=session_json
            )
        else:
            zarr = _zarr()
            from zarr.storage import LocalStore

            root = zarr.create_group(store=LocalStore(tmp), zarr_format=3)
            iscale = tuple(
                _expand(
                    A.check_vector(image_scale, len(prep.axes), "image_scale", 1.0)
                    if image_scale is not None
                    else prep.scale,
                    prep.axes,
                    img_axes,
                    1.0,
                )
            )
            itrans = tuple(
                _expand(
                    A.check_vector(image_translate, len(prep.axes), "image_translate", 0.0)
                    if image_translate is not None
                    else prep.translate,
                    prep.axes,
                    img_axes,
                    0.0,
                )
            )
            iunits = tuple(_expand(prep.units, prep.axes, img_axes, None))
            ms = _write_image(
                root, image, img_axes, iscale, itrans, iunits, levels, None, image_name, max_bytes
            )
            key = _path_key(prep.name)
            root.attrs.update({"ome": {"version": NGFF_VERSION, "multiscales": [ms]}})
            labels_dir = tmp / "labels"
            zarr.create_group(
                store=LocalStore(labels_dir),
                zarr_format=3,
                attributes={"ome": {"version": NGFF_VERSION, "labels": [key]}},
            )
            _write_image_label_group(
                labels_dir / key, prep, levels=levels, source="../../", session_json=session_json
            )
    return dest


def _expand(values, label_axes, image_axes, fill):
    lookup = dict(zip(label_axes, values, strict=True))
    return [lookup.get(a, fill) for a in image_axes]


def _channel_first(image, n_lead: int):
    """(..., Y, X, C) -> (..., C, Y, X), a numpy view or a lazy dask array: the channel
    axis goes right after the ``n_lead`` time axes (NGFF order t, c, z, y, x)."""
    if hasattr(image, "compute"):
        import dask.array as da

        return da.moveaxis(image, -1, n_lead)
    if not isinstance(image, np.ndarray):
        image = np.asarray(image)
    return np.moveaxis(image, -1, n_lead)


def _add_labels_to_image(
    dest: Path,
    labels,
    *,
    name,
    scale,
    translate,
    axes,
    units,
    colors,
    dtype,
    chunks,
    levels,
    overwrite,
    session_json,
    max_bytes,
) -> Path:
    """Add ``labels/<name>`` to an existing OME-Zarr image group at ``dest``."""
    if not (dest / "zarr.json").exists():
        raise ValueError(
            f"{str(dest)!r} is an older OME-Zarr (NGFF 0.4, zarr v2); napari-sam adds labels "
            "only to NGFF 0.5 (zarr v3) stores. Write the labels to a new store instead."
        )
    contents = read_ome_zarr(dest, lazy=True, with_labels=False)
    img = contents.image
    assert img is not None
    img_shape = tuple(img.data[0].shape)
    A.check_array(labels, "labels")
    if len(labels.shape) == len(img_shape):  # same axes as the image (incl. any channel)
        keep = list(range(len(img.axes)))
    else:  # the image's axes without the channel axis
        keep = [i for i, a in enumerate(img.axes) if a != "c"]
    want = tuple(img_shape[i] for i in keep)
    if tuple(labels.shape) != want:
        raise ValueError(
            f"these labels (shape {tuple(labels.shape)}) do not belong to the image in "
            f"{str(dest)!r} (shape {img_shape}, axes {''.join(img.axes)}): the labels must "
            f"have shape {want}. Write them to a new store instead."
        )
    if axes is None:
        axes = tuple(img.axes[i] for i in keep)
    if scale is None:
        scale = [img.scale[i] for i in keep]
    if translate is None:
        translate = [img.translate[i] for i in keep]
    if units is None:
        units = [img.units[i] for i in keep] if img.units else None
    n_img_levels = len(img.data)
    if levels is None:
        levels = n_img_levels
    elif levels != n_img_levels:
        raise ValueError(
            f"the image in {str(dest)!r} has {n_img_levels} resolution level(s); its labels "
            f"must have the same number (NGFF 0.5), not levels={levels}"
        )
    prep = _prepare(
        labels,
        name=name,
        scale=scale,
        translate=translate,
        axes=axes,
        units=units,
        dtype=dtype,
        chunks=chunks,
        colors=colors,
        max_bytes=max_bytes,
    )
    levels = _check_levels(levels, prep.data.shape, prep.axes)
    key = _path_key(prep.name)
    labels_dir = dest / "labels"
    label_dest = labels_dir / key
    existing: list[str] = []
    if labels_dir.exists():
        existing = list(_ome_attrs(labels_dir).get("labels", []))
    if (label_dest.exists() or key in existing) and not overwrite:
        raise FileExistsError(
            errno.EEXIST,
            f"labels {key!r} already exist in {str(dest)!r}; refusing to overwrite them. "
            "Pass overwrite=True (--overwrite) to replace them, or choose another name.",
            str(label_dest),
        )
    if not labels_dir.exists():
        try:
            labels_dir.mkdir()
        except OSError as e:
            from napari_sam.io.atomic import explain_os_error

            raise explain_os_error(e, labels_dir) from e
    with atomic_path(label_dest, overwrite=overwrite) as tmp:
        _write_image_label_group(
            tmp, prep, levels=levels, source="../../", session_json=session_json
        )
    meta = {
        "attributes": {
            "ome": {
                "version": NGFF_VERSION,
                "labels": existing + [key] if key not in existing else existing,
            }
        },
        "zarr_format": 3,
        "node_type": "group",
    }
    if (labels_dir / "zarr.json").exists():
        old = json.loads((labels_dir / "zarr.json").read_text())
        old.setdefault("attributes", {}).setdefault("ome", {}).update(meta["attributes"]["ome"])
        old["attributes"]["ome"]["version"] = NGFF_VERSION
        meta = old
    atomic_write_text(labels_dir / "zarr.json", json.dumps(meta, indent=2), overwrite=True)
    return dest


def write_labels_zarr(
    path: str | os.PathLike,
    labels: Any,
    *,
    name: str = "labels",
    scale: Sequence[float] | None = None,
    translate: Sequence[float] | None = None,
    axes: str | Sequence[str] | None = None,
    units: str | Sequence[Any] | None = None,
    dtype: Any = None,
    chunks: Sequence[int] | None = None,
    overwrite: bool = False,
    session: Any = None,
    max_bytes: int = A.DEFAULT_REGION_BYTES,
) -> Path:
    """Write ``labels`` as one plain zarr v3 array with napari metadata in its attributes.

    Attributes: ``name``, ``scale``, ``translate``, ``axes``, ``units`` (one per axis, None
    for pixels) and ``napari_sam`` (format marker); ``dimension_names`` = axes. The
    session, if given, is saved as ``napari_sam_session.json`` inside the array folder.
    Same validation, dtype choice, chunked writing and atomicity as
    :func:`write_ome_zarr_labels`.
    """
    dest = check_destination(path, overwrite)
    session_json = _session_json(session)
    prep = _prepare(
        labels,
        name=name,
        scale=scale,
        translate=translate,
        axes=axes,
        units=units,
        dtype=dtype,
        chunks=chunks,
        colors={},  # no colours stored: skip collecting ids
        max_bytes=max_bytes,
    )
    attrs = {
        "name": prep.name,
        "scale": list(prep.scale),
        "translate": list(prep.translate),
        "axes": list(prep.axes),
        "units": list(prep.units),
        "napari_sam": {"format": PLAIN_FORMAT, "format_version": PLAIN_FORMAT_VERSION},
    }
    from zarr.storage import LocalStore

    with atomic_path(dest, overwrite=overwrite) as tmp:
        _write_label_array(prep, LocalStore(tmp), None, attributes=attrs)
        if session_json is not None:
            (tmp / SESSION_FILE).write_text(session_json, encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- reading


@dataclass
class OmeZarrContents:
    """What :func:`read_ome_zarr` found: the image (None for a labels-only store) and the
    labels by name, in the order the store lists them."""

    image: ImageData | None
    labels: list[LabelsData]


def _open(path: Path):
    zarr = _zarr()
    from zarr.storage import LocalStore

    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, f"{str(path)!r} does not exist", str(path))
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a zarr store (a zarr store is a folder)")
    try:
        return zarr.open(store=LocalStore(path, read_only=True), mode="r")
    except Exception as e:  # zarr raises several types for "not a store"
        raise ValueError(
            f"{str(path)!r} is not a readable zarr store ({type(e).__name__}: {e})"
        ) from e


def _ome_attrs(path: Path) -> dict[str, Any]:
    """OME metadata of a group folder: v0.5 (zarr v3, under "ome") or v0.4 (zarr v2,
    top level); {} when absent."""
    for meta_file in ("zarr.json", ".zattrs"):
        f = path / meta_file
        if f.exists():
            try:
                raw = json.loads(f.read_text())
            except (OSError, ValueError):
                return {}
            attrs = raw.get("attributes", {}) if meta_file == "zarr.json" else raw
            if "ome" in attrs:
                return dict(attrs["ome"])
            return {
                k: v for k, v in attrs.items() if k in ("multiscales", "image-label", "labels")
            }
    return {}


def _is_ome_image_group(path: Path) -> bool:
    ome = _ome_attrs(path) if path.is_dir() else {}
    return "multiscales" in ome and "image-label" not in ome


def is_ome_zarr(path: str | os.PathLike) -> bool:
    """True if ``path`` is an OME-Zarr image or image-label group (NGFF 0.4 or 0.5)."""
    path = Path(path)
    return path.is_dir() and "multiscales" in _ome_attrs(path)


def _transforms(ms: dict, level: int, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    scale = np.ones(ndim)
    trans = np.zeros(ndim)
    for tr in ms["datasets"][level].get("coordinateTransformations", []):
        if tr.get("type") == "scale":
            scale = scale * np.asarray(tr["scale"], dtype=float)
        elif tr.get("type") == "translation":
            trans = trans + np.asarray(tr["translation"], dtype=float)
    # multiscale-level transforms apply after the dataset's (NGFF 0.4/0.5)
    for tr in ms.get("coordinateTransformations", []) or []:
        if tr.get("type") == "scale":
            s = np.asarray(tr["scale"], dtype=float)
            scale, trans = scale * s, trans * s
        elif tr.get("type") == "translation":
            trans = trans + np.asarray(tr["translation"], dtype=float)
    return tuple(float(v) for v in scale), tuple(float(v) for v in trans)


def _read_multiscale(path: Path, lazy: bool, *, all_levels: bool):
    ome = _ome_attrs(path)
    if "multiscales" not in ome:
        raise ValueError(f"{str(path)!r} is not an OME-Zarr multiscale group (no 'multiscales')")
    ms = ome["multiscales"][0]
    node = _open(path)
    axes_meta = ms.get("axes") or [
        {"name": a} for a in "tczyx"[-len(node[ms["datasets"][0]["path"]].shape) :]
    ]
    axes = tuple(str(a["name"] if isinstance(a, dict) else a) for a in axes_meta)
    units = tuple((a.get("unit") if isinstance(a, dict) else None) for a in axes_meta)
    arrays = []
    for k, ds in enumerate(ms["datasets"]):
        if k > 0 and not all_levels:
            break
        arrays.append(node[ds["path"]])
    scale, trans = _transforms(ms, 0, len(axes))
    if not lazy:
        arrays = [np.asarray(arrays[0][...])]
    name = ms.get("name") or path.name
    return ome, ms, arrays, axes, units, scale, trans, str(name)


def _labels_from_group(path: Path, lazy: bool) -> LabelsData:
    ome, _ms, arrays, axes, units, scale, trans, name = _read_multiscale(
        path, lazy, all_levels=False
    )
    extra_attrs = {}
    f = path / "zarr.json"
    if f.exists():
        extra_attrs = json.loads(f.read_text()).get("attributes", {}).get("napari_sam", {})
    name = extra_attrs.get("name", name)
    colors = None
    il = ome.get("image-label") or {}
    if il.get("colors"):
        colors = {
            int(c["label-value"]): tuple(int(v) for v in c["rgba"])
            for c in il["colors"]
            if c.get("rgba") is not None
        }
    return LabelsData(
        data=arrays[0],
        name=str(name),
        scale=scale,
        translate=trans,
        axes=axes,
        units=units,
        colors=colors,
        path=str(path),
        extra={"image-label": il},
    )


def read_ome_zarr(
    path: str | os.PathLike, *, lazy: bool = False, with_labels: bool = True
) -> OmeZarrContents:
    """Read an OME-Zarr (NGFF 0.5, or 0.4 on zarr v2): the image (all levels, lazily read
    zarr arrays) and its labels (level 0; numpy unless ``lazy``).

    A labels-only store (root image-label group) gives ``image=None`` and one label.
    """
    path = Path(path).expanduser().absolute()
    _open(path)  # clear error if it is not a zarr store at all
    ome = _ome_attrs(path)
    if "multiscales" not in ome:
        raise ValueError(
            f"{str(path)!r} is a zarr store but not OME-Zarr (no 'multiscales' metadata); "
            "read it with read_labels_zarr or choose another file"
        )
    if "image-label" in ome:
        return OmeZarrContents(image=None, labels=[_labels_from_group(path, lazy)])
    _ome, _ms, arrays, axes, units, scale, trans, name = _read_multiscale(
        path, True, all_levels=True
    )
    image = ImageData(
        data=arrays,
        name=name if name != path.name else path.name.split(".")[0],
        scale=scale,
        translate=trans,
        axes=axes,
        units=units,
        path=str(path),
    )
    labels: list[LabelsData] = []
    if with_labels and (path / "labels").is_dir():
        for key in _ome_attrs(path / "labels").get("labels", []):
            labels.append(_labels_from_group(path / "labels" / key, lazy))
    return OmeZarrContents(image=image, labels=labels)


def read_labels_zarr(path: str | os.PathLike, *, lazy: bool = False) -> LabelsData:
    """Read a plain zarr labels array written by :func:`write_labels_zarr` (or any zarr
    array: without our attributes, scale 1, translate 0 and default axes are assumed)."""
    path = Path(path).expanduser().absolute()
    node = _open(path)
    zarr = _zarr()
    if not isinstance(node, zarr.Array):
        raise ValueError(
            f"{str(path)!r} is a zarr group, not an array; OME-Zarr stores are read with "
            "read_ome_zarr (or read_labels, which detects the format)"
        )
    attrs = dict(node.attrs)
    ndim = len(node.shape)
    A.check_array(node, "labels")
    axes = check_axes(attrs.get("axes"), ndim) if attrs.get("axes") else check_axes(None, ndim)
    scale, trans = layer_geometry(ndim, attrs.get("scale"), attrs.get("translate"))
    units = tuple(attrs.get("units") or (None,) * ndim)
    data = node if lazy else np.asarray(node[...])
    return LabelsData(
        data=data,
        name=str(attrs.get("name") or path.name.split(".")[0]),
        scale=scale,
        translate=trans,
        axes=axes,
        units=units,
        path=str(path),
    )


def session_file(path: str | os.PathLike, name: str | None = None) -> Path:
    """Where the session of the labels at ``path`` is stored (see ``session.py``)."""
    path = Path(path)
    if _is_ome_image_group(path):
        contents = (
            _ome_attrs(path / "labels").get("labels", []) if (path / "labels").is_dir() else []
        )
        key = _path_key(name) if name else (contents[0] if len(contents) == 1 else None)
        if key is None:
            raise ValueError(f"{str(path)!r} holds labels {contents}; say which one (name=...)")
        return path / "labels" / key / SESSION_FILE
    return path / SESSION_FILE

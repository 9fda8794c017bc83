"""One entry point for every label format: detect, read, write.

Formats: ``"ome-zarr"`` (NGFF 0.5 labels, :mod:`labels_zarr`), ``"zarr"`` (one plain zarr
array), ``"tif"`` (:mod:`tiff`). Used by the CLI (``napari-sam export``) and the napari
reader / writer contributions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from napari_sam.io._meta import LabelsData

__all__ = [
    "FORMATS",
    "detect_format",
    "format_for_output",
    "read_image",
    "read_labels",
    "write_labels",
]

FORMATS = ("ome-zarr", "zarr", "tif")
_TIF = (".tif", ".tiff")


def _zarr_node_kind(path: Path) -> str | None:
    """ "array", "group" or None, from the zarr metadata files (v3 or v2)."""
    if (path / "zarr.json").exists():
        try:
            return json.loads((path / "zarr.json").read_text()).get("node_type")
        except (OSError, ValueError):
            return None
    if (path / ".zarray").exists():
        return "array"
    if (path / ".zgroup").exists():
        return "group"
    return None


def detect_format(path: str | os.PathLike) -> str | None:
    """Format of an existing label file/folder, or None if it is none of ours."""
    from napari_sam.io.labels_zarr import is_ome_zarr

    p = Path(path)
    if p.is_file() and p.suffix.lower() in _TIF:
        return "tif"
    if p.is_dir():
        if is_ome_zarr(p):
            return "ome-zarr"
        if _zarr_node_kind(p) == "array":
            return "zarr"
    return None


def format_for_output(path: str | os.PathLike, fmt: str | None = None) -> str:
    """Output format from ``fmt`` or the name: ``.tif``/``.tiff`` -> tif,
    ``.ome.zarr`` -> ome-zarr, ``.zarr`` -> zarr (plain array)."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    name = Path(path).name.lower()
    if name.endswith(_TIF):
        return "tif"
    if name.endswith(".ome.zarr"):
        return "ome-zarr"
    if name.endswith(".zarr"):
        return "zarr"
    raise ValueError(
        f"cannot tell the format from the name {Path(path).name!r}: use a .tif, .zarr or "
        ".ome.zarr name, or give the format explicitly (" + ", ".join(FORMATS) + ")"
    )


def read_labels(
    path: str | os.PathLike, *, name: str | None = None, lazy: bool = False
) -> LabelsData:
    """Read labels from any supported format. ``name`` picks one label of an OME-Zarr
    holding several (by its name or folder); ``lazy`` returns a zarr array."""
    from napari_sam.io.labels_zarr import read_labels_zarr, read_ome_zarr
    from napari_sam.io.tiff import read_labels_tiff

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    fmt = detect_format(p)
    if fmt == "tif":
        return read_labels_tiff(p, lazy=lazy)
    if fmt == "zarr":
        return read_labels_zarr(p, lazy=lazy)
    if fmt == "ome-zarr":
        contents = read_ome_zarr(p, lazy=lazy)
        labels = contents.labels
        if not labels:
            raise ValueError(f"{str(p)!r} is an OME-Zarr image without labels")
        if name is not None:
            match = [lab for lab in labels if name in (lab.name, Path(lab.path).name)]
            if not match:
                raise ValueError(
                    f"{str(p)!r} has no labels named {name!r}; it has "
                    f"{[lab.name for lab in labels]}"
                )
            return match[0]
        if len(labels) > 1:
            raise ValueError(
                f"{str(p)!r} holds several labels {[lab.name for lab in labels]}; say which "
                "one (name=... / --label)"
            )
        return labels[0]
    raise ValueError(
        f"{str(p)!r} is not a label file napari-sam can read (TIFF, zarr array or OME-Zarr)"
    )


def read_image(path: str | os.PathLike):
    """An image array (lazy where possible) from a TIFF, a zarr array or an OME-Zarr
    image (its finest level). Returns ``(array, scale or None, translate or None)``."""
    import numpy as np

    from napari_sam.io.labels_zarr import _open, read_ome_zarr

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    fmt = detect_format(p)
    if fmt == "tif":
        import tifffile
        import zarr

        with tifffile.TiffFile(p) as tif:
            store = tif.series[0].aszarr()
        return zarr.open(store, mode="r"), None, None
    if fmt == "ome-zarr":
        c = read_ome_zarr(p, lazy=True, with_labels=False)
        if c.image is None:
            raise ValueError(f"{str(p)!r} holds labels only, not an image")
        return c.image.data[0], c.image.scale, c.image.translate
    if fmt == "zarr":
        return _open(p), None, None
    if p.suffix.lower() == ".npy":
        return np.load(p, mmap_mode="r"), None, None
    raise ValueError(f"{str(p)!r} is not an image napari-sam can read (TIFF, zarr, OME-Zarr)")


def write_labels(
    path: str | os.PathLike, labels: Any, *, format: str | None = None, **kwargs: Any
) -> Path:
    """Write labels in ``format`` (default: from the name, see :func:`format_for_output`).

    Keyword arguments are those of the format's writer (name, scale, translate, axes,
    units, dtype, overwrite, session; OME-Zarr also image, colors, levels, chunks).
    """
    from napari_sam.io.labels_zarr import write_labels_zarr, write_ome_zarr_labels
    from napari_sam.io.tiff import write_labels_tiff

    fmt = format_for_output(path, format)
    ome_only = {"image", "image_name", "rgb", "colors", "levels", "image_scale", "image_translate"}
    if fmt != "ome-zarr":
        given = sorted(k for k in ome_only if kwargs.get(k) is not None)
        if given:
            raise ValueError(f"option(s) {given} only apply to the ome-zarr format, not {fmt}")
        kwargs = {k: v for k, v in kwargs.items() if k not in ome_only}
    if fmt == "tif":
        kwargs.pop("chunks", None)
        return write_labels_tiff(path, labels, **kwargs)
    if fmt == "zarr":
        return write_labels_zarr(path, labels, **kwargs)
    return write_ome_zarr_labels(path, labels, **kwargs)

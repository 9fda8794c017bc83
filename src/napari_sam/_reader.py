"""npe2 reader: OME-Zarr (image + labels), napari-sam zarr labels and label TIFFs.

``get_reader`` claims a path only when it can read it as labels (or an OME-Zarr image):
an OME-Zarr (NGFF 0.4/0.5) folder, a zarr array written by napari-sam, or a TIFF carrying
napari-sam metadata. Other zarr arrays and TIFFs are left to napari's built-in reader
(which opens them as images). No napari, Qt or torch import happens here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _single(path: Any) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        return Path(path)
    except TypeError:
        return None


def _ours_zarr_array(p: Path) -> bool:
    f = p / "zarr.json"
    if not f.exists():
        return False
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("node_type") == "array" and "napari_sam" in meta.get("attributes", {})


def _ours_tiff(p: Path) -> bool:
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            ij = tif.imagej_metadata or {}
            if "napari_sam" in ij:
                return True
            shaped = tif.shaped_metadata
            return bool(shaped) and "napari_sam" in shaped[0]
    except Exception:
        return False


def get_reader(path: str | list[str]):
    """Return a reader function for ``path``, or None if napari-sam does not read it."""
    p = _single(path)
    if p is None or not p.exists():
        return None
    from napari_sam.io.formats import detect_format

    fmt = detect_format(p)
    if fmt == "ome-zarr":
        return read_ome_zarr_layers
    if fmt == "zarr" and _ours_zarr_array(p):
        return read_labels_layers
    if fmt == "tif" and _ours_tiff(p):
        return read_labels_layers
    return None


def _session_meta(path: Path, name: str | None = None) -> dict[str, Any]:
    from napari_sam.io.session import session_path

    try:
        sp = session_path(path, name)
    except ValueError:
        return {}
    return {"session_path": str(sp)} if sp.exists() else {}


def _with_source(layer: tuple, source: Path, extra: dict[str, Any]) -> tuple:
    data, meta, kind = layer
    meta = dict(meta)
    meta["metadata"] = {"napari_sam": {"source_path": str(source), **extra}}
    return (data, meta, kind)


def read_labels_layers(path: str | list[str]) -> list[tuple]:
    """Labels from a napari-sam zarr array or TIFF, as one Labels layer (data in memory,
    so it can be edited)."""
    from napari_sam.io.formats import read_labels

    p = _single(path)
    lab = read_labels(p)
    return [_with_source(lab.to_layer_data(), p, _session_meta(p))]


def read_ome_zarr_layers(path: str | list[str]) -> list[tuple]:
    """An OME-Zarr: the image (lazy, multiscale when it has levels) and every label
    (in memory, editable). A labels-only store gives one Labels layer."""
    from napari_sam.io.labels_zarr import read_ome_zarr

    p = _single(path)
    contents = read_ome_zarr(p, lazy=False)
    layers = []
    if contents.image is not None:
        layers.append(_with_source(contents.image.to_layer_data(), p, {}))
    for lab in contents.labels:
        key = Path(lab.path).name if contents.image is not None else None
        layers.append(_with_source(lab.to_layer_data(), p, _session_meta(p, key)))
    return layers

"""npe2 writers: a Labels layer to OME-Zarr labels or TIFF; image + labels to OME-Zarr.

Overwriting: napari's save dialog has already asked the user before replacing an
existing *file*, so the TIFF writer replaces an existing file - atomically (the new file
is complete on disk before it takes the old one's name, so a failure leaves the old file
untouched). For ``.zarr`` folders the rules are stricter, because a folder may hold much
more than one layer:

* an existing OME-Zarr *image* (e.g. the one the image was opened from): the labels are
  added to it as ``labels/<layer name>``, replacing only labels of the same name;
* an existing zarr store of any other kind: replaced atomically (the new store is
  written beside it, then swapped in);
* an existing folder that is not a zarr store: refused (FileExistsError), never deleted.

Each writer returns the list of paths written. No napari, Qt or torch import here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _geometry(meta: dict[str, Any], ndim: int):
    scale = meta.get("scale")
    translate = meta.get("translate")
    scale = list(scale)[-ndim:] if scale is not None else None
    translate = list(translate)[-ndim:] if translate is not None else None
    return scale, translate


def _axes(meta: dict[str, Any], ndim: int):
    from napari_sam.io._meta import axes_from_napari

    return axes_from_napari(meta.get("axis_labels"), ndim)


def _units(meta: dict[str, Any], ndim: int):
    units = meta.get("units")
    if units is None:
        return None
    if isinstance(units, (str, bytes)):
        return str(units)
    units = [str(u) for u in units]
    return units[-ndim:] if len(units) >= ndim else None


def _color_fn(meta: dict[str, Any]):
    """Colours of the ids present, from the layer's colormap (if it can map values)."""
    cmap = meta.get("colormap")
    if cmap is None or not hasattr(cmap, "map"):
        return None

    def colors(ids):
        import numpy as np

        if not ids:
            return {}
        rgba = np.asarray(cmap.map(np.asarray(ids)), dtype=float).reshape(len(ids), -1)
        return {int(i): tuple(float(v) for v in c[:4]) for i, c in zip(ids, rgba, strict=True)}

    return colors


def _labels_data(data: Any):
    # multiscale labels: write the finest level
    if isinstance(data, (list, tuple)):
        return data[0]
    return data


def _check_zarr_destination(path: Path) -> bool:
    """True if ``path`` exists (and may be replaced or added to); raise if it must not be."""
    if not path.exists():
        return False
    from napari_sam.io.formats import _zarr_node_kind

    if path.is_dir() and _zarr_node_kind(path) is None:
        raise FileExistsError(
            f"{str(path)!r} is an existing folder that is not a zarr store; napari-sam will "
            "not replace it. Choose another name."
        )
    return True


def write_labels_ome_zarr(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Labels layer -> OME-Zarr labels (NGFF 0.5) at ``path`` (see module docstring)."""
    from napari_sam.io.labels_zarr import write_ome_zarr_labels

    p = Path(path)
    exists = _check_zarr_destination(p)
    data = _labels_data(data)
    ndim = len(data.shape)
    scale, translate = _geometry(meta, ndim)
    out = write_ome_zarr_labels(
        p,
        data,
        name=meta.get("name") or "labels",
        scale=scale,
        translate=translate,
        axes=_axes(meta, ndim),
        units=_units(meta, ndim),
        colors=_color_fn(meta),
        overwrite=exists,
    )
    return [str(out)]


def write_labels_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Labels layer -> compressed ImageJ-compatible TIFF at ``path``."""
    from napari_sam.io.tiff import write_labels_tiff as _write

    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{str(p)!r} is a folder; choose a file name ending in .tif")
    data = _labels_data(data)
    ndim = len(data.shape)
    scale, translate = _geometry(meta, ndim)
    out = _write(
        p,
        data,
        name=meta.get("name") or "labels",
        scale=scale,
        translate=translate,
        axes=_axes(meta, ndim),
        units=_units(meta, ndim),
        overwrite=p.exists(),
    )
    return [str(out)]


def write_ome_zarr(path: str, layer_data: list[tuple]) -> list[str]:
    """One Image layer and one or more Labels layers -> an OME-Zarr image with
    ``labels/<name>`` for each (written to a temporary store, then moved into place)."""
    from napari_sam.io.atomic import atomic_path
    from napari_sam.io.labels_zarr import write_ome_zarr_labels

    images = [ld for ld in layer_data if ld[2] == "image"]
    labels = [ld for ld in layer_data if ld[2] == "labels"]
    if len(images) != 1 or not labels:
        raise ValueError("select exactly one image layer and at least one labels layer")
    p = Path(path)
    exists = _check_zarr_destination(p)
    img_data, img_meta, _ = images[0]
    img_data = _labels_data(img_data)
    rgb = bool(img_meta.get("rgb", False))
    names = [m.get("name") or "labels" for _, m, _ in labels]
    if len(set(names)) != len(names):
        raise ValueError(f"labels layers need distinct names to be stored together: {names}")
    with atomic_path(p, overwrite=exists) as tmp:
        for k, (data, meta, _) in enumerate(labels):
            data = _labels_data(data)
            ndim = len(data.shape)
            scale, translate = _geometry(meta, ndim)
            kwargs: dict[str, Any] = {}
            if k == 0:
                iscale, itrans = _geometry(img_meta, ndim)
                kwargs = {
                    "image": img_data,
                    "image_name": img_meta.get("name") or "image",
                    "rgb": rgb,
                    "image_scale": iscale,
                    "image_translate": itrans,
                }
            write_ome_zarr_labels(
                tmp,
                data,
                name=meta.get("name") or "labels",
                scale=scale,
                translate=translate,
                axes=_axes(meta, ndim),
                units=_units(meta, ndim),
                colors=_color_fn(meta),
                **kwargs,
            )
    return [str(p)]

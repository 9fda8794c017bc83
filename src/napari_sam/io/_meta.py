"""Axes, units and layer metadata shared by the zarr, OME-Zarr and TIFF formats."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_sam.io._arrays import check_vector

# Default axis names by number of dimensions (NGFF order: t, c, z, y, x).
DEFAULT_AXES = {
    2: ("y", "x"),
    3: ("z", "y", "x"),
    4: ("t", "z", "y", "x"),
    5: ("t", "c", "z", "y", "x"),
}
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
_ORDER = "tczyx"

# Unit spellings users and napari use -> NGFF 0.5 (UDUNITS-2) names.
_UNIT_ALIASES = {
    "um": "micrometer",
    "µm": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "nm": "nanometer",
    "mm": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "pm": "picometer",
    "a": "angstrom",
    "å": "angstrom",
    "s": "second",
    "sec": "second",
    "ms": "millisecond",
    "min": "minute",
    "h": "hour",
}
_NO_UNIT = {"", "pixel", "pixels", "px", "none", "dimensionless"}
# NGFF -> ImageJ unit strings.
_IMAGEJ_UNITS = {"micrometer": "micron", "nanometer": "nm", "millimeter": "mm", "meter": "m"}


def check_axes(axes: str | Sequence[str] | None, ndim: int) -> tuple[str, ...]:
    """Validate axis names: a subset of ``t, c, z, y, x`` in that order, ending in y, x."""
    if axes is None:
        return DEFAULT_AXES[ndim]
    names = tuple(str(a).lower() for a in axes)
    problem = None
    if len(names) != ndim:
        problem = f"{len(names)} axis names for {ndim} dimensions"
    elif any(n not in _ORDER for n in names) or len(set(names)) != ndim:
        problem = "names must be distinct letters from t, c, z, y, x"
    elif list(names) != sorted(names, key=_ORDER.index):
        problem = "axes must be in the order t, c, z, y, x"
    elif names[-2:] != ("y", "x"):
        problem = "the last two axes must be y, x"
    if problem:
        raise ValueError(
            f"invalid axes {''.join(names) if all(len(n) == 1 for n in names) else names!r}: "
            f"{problem} (e.g. {''.join(DEFAULT_AXES[ndim])!r} for {ndim}D data)"
        )
    return names


def axes_from_napari(axis_labels: Sequence[str] | None, ndim: int) -> tuple[str, ...]:
    """napari axis_labels (e.g. ('axis -3', ...) or ('z', 'y', 'x')) -> our axis names."""
    if axis_labels is not None:
        try:
            return check_axes(axis_labels, ndim)
        except ValueError:
            pass
    return DEFAULT_AXES[ndim]


def normalize_unit(unit: Any) -> str | None:
    """Map a unit (str, pint unit or None) to an NGFF unit name, or None for pixels."""
    if unit is None:
        return None
    text = str(unit).strip()
    if text.lower() in _NO_UNIT:
        return None
    return _UNIT_ALIASES.get(text.lower(), _UNIT_ALIASES.get(text, text))


def check_units(units: str | Sequence[Any] | None, axes: Sequence[str]) -> tuple[str | None, ...]:
    """One unit (or None) per axis; a single string applies to the space axes."""
    if units is None:
        return (None,) * len(axes)
    if isinstance(units, str):
        u = normalize_unit(units)
        return tuple(u if AXIS_TYPES[a] == "space" else None for a in axes)
    units = tuple(units)
    if len(units) != len(axes):
        raise ValueError(
            f"units has {len(units)} entries but there are {len(axes)} axes {tuple(axes)}; "
            "give one unit per axis or a single unit for the space axes"
        )
    return tuple(normalize_unit(u) for u in units)


def imagej_unit(unit: str | None) -> str | None:
    return None if unit is None else _IMAGEJ_UNITS.get(unit, unit)


def unit_from_imagej(unit: Any) -> str | None:
    if unit is None:
        return None
    text = str(unit).replace("\\u00B5", "µ")
    return normalize_unit(text)


@dataclass
class LabelsData:
    """A labels array read from disk with its world-coordinate metadata.

    ``data`` is a numpy array (or a lazily read zarr array when ``lazy=True``), axes in
    ``axes`` order (napari order: slowest first, last two are row (y), column (x)).
    World coordinate of index ``i`` along an axis: ``i * scale + translate``.
    """

    data: Any
    name: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    axes: tuple[str, ...]
    units: tuple[str | None, ...] = ()
    colors: dict[int, tuple[int, int, int, int]] | None = None
    path: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def layer_meta(self) -> dict[str, Any]:
        """Keyword arguments for ``napari.layers.Labels`` (napari is not imported)."""
        meta: dict[str, Any] = {
            "name": self.name,
            "scale": list(self.scale),
            "translate": list(self.translate),
            "axis_labels": list(self.axes),
        }
        if self.units and any(u is not None for u in self.units):
            meta["units"] = [u if u is not None else "pixel" for u in self.units]
        if self.colors and len(self.colors) <= 4096:
            cmap: dict[Any, tuple[float, ...]] = {None: (0.0, 0.0, 0.0, 0.0)}
            cmap.update({k: tuple(c / 255 for c in v) for k, v in self.colors.items()})
            meta["colormap"] = cmap
        return meta

    def to_layer_data(self) -> tuple[Any, dict[str, Any], str]:
        """napari LayerDataTuple ``(data, kwargs, "labels")``."""
        return (self.data, self.layer_meta(), "labels")


@dataclass
class ImageData:
    """An image read from an OME-Zarr: ``data`` is a list of pyramid levels, finest first."""

    data: list[Any]
    name: str
    scale: tuple[float, ...]
    translate: tuple[float, ...]
    axes: tuple[str, ...]
    units: tuple[str | None, ...] = ()
    path: str = ""

    def to_layer_data(self) -> tuple[Any, dict[str, Any], str]:
        meta: dict[str, Any] = {"name": self.name}
        data: Any = self.data if len(self.data) > 1 else self.data[0]
        if "c" in self.axes:
            c = self.axes.index("c")
            meta["channel_axis"] = c
            keep = [i for i in range(len(self.axes)) if i != c]
            meta["scale"] = [self.scale[i] for i in keep]
            meta["translate"] = [self.translate[i] for i in keep]
        else:
            meta["scale"] = list(self.scale)
            meta["translate"] = list(self.translate)
            meta["axis_labels"] = list(self.axes)
        if len(self.data) > 1:
            meta["multiscale"] = True
        return (data, meta, "image")


def layer_geometry(
    ndim: int, scale: Sequence[float] | None, translate: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return check_vector(scale, ndim, "scale", 1.0), check_vector(translate, ndim, "translate", 0.0)


def check_name(name: Any) -> str:
    if name is None:
        return "labels"
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, got {type(name).__name__}")
    if not name.strip():
        raise ValueError("name must not be empty")
    return name


def check_colors(
    colors: Any,
) -> dict[int, tuple[int, int, int, int]] | None:
    """``{label_id: (r, g, b, a)}``: ints are 0-255, floats 0-1 (napari style); -> 0-255."""
    if colors is None:
        return None
    out = {}
    for key, rgba in dict(colors).items():
        if key is None:
            continue
        try:
            label = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"colour keys must be label ids (int), got {key!r}") from None
        arr = np.asarray(rgba)
        is_int = arr.dtype.kind in "iu"
        vals = arr.astype(float).ravel()
        if vals.size == 3:
            vals = np.append(vals, 255.0 if is_int else 1.0)
        if vals.size != 4 or not np.isfinite(vals).all() or vals.min() < 0:
            raise ValueError(f"colour for label {label} must be RGB(A), got {rgba!r}")
        top = 255 if is_int else 1.0
        if vals.max() > top:
            raise ValueError(
                f"colour for label {label} out of range: {rgba!r} (ints 0-255 or floats 0-1)"
            )
        if not is_int:
            vals = vals * 255
        out[label] = tuple(int(round(v)) for v in vals)
    return out

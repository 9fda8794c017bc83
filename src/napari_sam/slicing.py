"""2D slices of N-D images: which plane is annotated, and how to get in and out of it.

A **slice key** names one 2D plane of an image with ``S`` spatial axes (``S`` = 2 or 3):
a tuple of length ``S`` holding ``None`` for the two in-plane axes and an integer index
for every other axis. ``(None, None)`` is a 2D image, ``(5, None, None)`` plane ``z = 5``
of a ``(Z, Y, X)`` stack, ``(None, 12, None)`` the ``(z, x)`` plane at ``y = 12``. The plane
keeps the data order of its two axes: its rows are the first ``None`` axis, its columns
the second.

World coordinates never appear here: a napari layer's ``world_to_data`` gives the data
point from which :func:`key_from_point` makes a key, and helper layers that share the
image layer's scale/translate/affine use the same data coordinates as the image (see
:func:`plane_translate` for the layers that hold a single plane).

Pure numpy; no Qt, napari or torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SliceKey = tuple  # tuple[int | None, ...], see module docstring

#: Spatial dimensionalities the annotator accepts.
SUPPORTED_NDIM = (2, 3)


def spatial_shape(shape: Sequence[int], rgb: bool = False) -> tuple[int, ...]:
    """Shape of the spatial axes: ``shape`` without a trailing RGB(A) channel axis."""
    shape = tuple(int(s) for s in shape)
    return shape[:-1] if rgb else shape


def check_image_shape(shape: Sequence[int], rgb: bool = False) -> tuple[int, ...]:
    """Validate an image shape for annotation; returns the spatial shape.

    Raises ``ValueError`` naming the problem and the fix for images with other than 2 or 3
    spatial axes, an RGB axis that is not of length 3 or 4, or an empty axis.
    """
    shape = tuple(int(s) for s in shape)
    if rgb and (len(shape) < 1 or shape[-1] not in (3, 4)):
        raise ValueError(
            f"an RGB image needs a last axis of length 3 or 4; got shape {shape}. "
            "Open it as a grayscale image instead."
        )
    spatial = spatial_shape(shape, rgb)
    if len(spatial) not in SUPPORTED_NDIM:
        kind = "RGB " if rgb else ""
        raise ValueError(
            f"{len(spatial)}D {kind}images are not supported (shape {shape}): the annotator "
            "works on 2D images and 3D stacks. Split channels or time points into separate "
            "layers first (e.g. layer context menu > Split Stack)."
        )
    if min(spatial) < 1:
        raise ValueError(f"the image is empty (shape {shape}); load an image with pixels.")
    return spatial


def check_key(key: SliceKey, shape: Sequence[int]) -> SliceKey:
    """Validate a key against a spatial ``shape``; returns it as a tuple."""
    key = tuple(None if k is None else int(k) for k in key)
    if len(key) != len(shape):
        raise ValueError(f"slice key {key} does not match an image with {len(shape)} axes")
    if sum(k is None for k in key) != 2:
        raise ValueError(f"slice key {key} must leave exactly two axes free (None)")
    for axis, (k, n) in enumerate(zip(key, shape, strict=True)):
        if k is not None and not 0 <= k < n:
            raise ValueError(f"slice index {k} on axis {axis} is outside the image (0..{n - 1})")
    return key


def plane_axes(key: SliceKey) -> tuple[int, int]:
    """The two in-plane axes (rows, cols) of a key."""
    axes = tuple(i for i, k in enumerate(key) if k is None)
    if len(axes) != 2:
        raise ValueError(f"slice key {key} must leave exactly two axes free (None)")
    return axes  # type: ignore[return-value]


def default_key(shape: Sequence[int]) -> SliceKey:
    """The first plane of the last two axes: ``(0, ..., 0, None, None)``."""
    return (0,) * (len(shape) - 2) + (None, None)


def key_from_point(
    point: Sequence[float], displayed: Sequence[int], shape: Sequence[int]
) -> SliceKey | None:
    """The plane through a data ``point`` with the ``displayed`` axes in-plane.

    ``point``: data coordinates, one per spatial axis (pixel centres at integers);
    ``displayed``: the two displayed data axes. Returns ``None`` when the point lies
    outside the image on a sliced axis (nothing to annotate there).
    """
    displayed = tuple(sorted(int(a) for a in displayed))
    if len(displayed) != 2:
        raise ValueError(f"need exactly two displayed axes, got {displayed}")
    key = []
    for axis, n in enumerate(shape):
        if axis in displayed:
            key.append(None)
            continue
        index = int(np.floor(float(point[axis]) + 0.5))
        if not 0 <= index < n:
            return None
        key.append(index)
    return tuple(key)


def plane_index(key: SliceKey) -> tuple:
    """Basic (view-making) numpy index of the plane over the spatial axes."""
    return tuple(slice(None) if k is None else k for k in key)


def plane_shape(shape: Sequence[int], key: SliceKey) -> tuple[int, int]:
    """``(H, W)`` of the plane."""
    r, c = plane_axes(key)
    return int(shape[r]), int(shape[c])


def take_plane(image, key: SliceKey, rgb: bool = False) -> np.ndarray:
    """The plane of ``image`` as a numpy array ``(H, W)`` or ``(H, W, C)`` (RGB).

    Works on anything with numpy-style indexing (numpy, dask, zarr): only the plane is
    read.
    """
    plane = image[plane_index(key)]
    if hasattr(plane, "compute"):  # dask
        plane = plane.compute()
    return np.asarray(plane)


def lift_points(points_rc, key: SliceKey) -> np.ndarray:
    """In-plane ``(N, 2) (row, col)`` -> ``(N, S)`` data coordinates on the plane."""
    pts = np.asarray(points_rc, dtype=np.float64).reshape(-1, 2)
    out = np.empty((len(pts), len(key)), dtype=np.float64)
    r, c = plane_axes(key)
    for axis, k in enumerate(key):
        if k is not None:
            out[:, axis] = k
    out[:, r] = pts[:, 0]
    out[:, c] = pts[:, 1]
    return out


def on_plane(points_nd, key: SliceKey) -> np.ndarray:
    """``(N,) bool``: which ``(N, S)`` data points lie on the plane (rounded)."""
    pts = np.asarray(points_nd, dtype=np.float64).reshape(-1, len(key))
    keep = np.ones(len(pts), dtype=bool)
    for axis, k in enumerate(key):
        if k is not None:
            keep &= np.floor(pts[:, axis] + 0.5) == k
    return keep


def drop_to_plane(points_nd, key: SliceKey) -> np.ndarray:
    """``(N, S)`` data coordinates -> in-plane ``(N, 2) (row, col)`` (no filtering)."""
    pts = np.asarray(points_nd, dtype=np.float64).reshape(-1, len(key))
    r, c = plane_axes(key)
    return pts[:, [r, c]].copy()


def display_size(size: Sequence[int], max_side: int | None) -> tuple[int, int]:
    """``(h, w)`` of a plane of ``size`` ``(H, W)`` shown with at most ``max_side`` pixels
    per side: blocks of ``k x k`` plane pixels, ``k = ceil(max(H, W) / max_side)``, become
    one display pixel (``h = round(H / k)``; exactly ``H / k`` when ``k`` divides ``H``).
    ``(H, W)`` itself when the plane fits or ``max_side`` is None or 0."""
    H, W = (int(v) for v in size)
    if not max_side or max(H, W) <= max_side:
        return H, W
    k = -(-max(H, W) // int(max_side))
    return max(1, int(H / k + 0.5)), max(1, int(W / k + 0.5))


def plane_translate(
    key: SliceKey,
    scale: Sequence[float],
    translate: Sequence[float],
    linear=None,
    block: Sequence[float] | None = None,
):
    """Translate for a layer holding only this plane (size 1 on the sliced axes).

    Such a layer, given the image layer's ``scale`` (and rotate/shear/affine) and the
    returned ``translate``, lands exactly on the plane: its data index 0 on a sliced axis
    maps to where the image's index ``key[axis]`` is. ``linear``: the ``(S, S)`` linear
    part of the image's data-to-physical transform (rotate @ shear @ diag(scale)); by
    default ``diag(scale)``.

    ``block``: ``(rows, cols)`` plane pixels per layer pixel, for a layer holding the plane
    at a reduced size (:func:`display_size`; its scale is the image's times ``block`` on
    the in-plane axes). With pixel centres at integers, layer pixel ``i`` covers plane
    pixels ``i * b - 0.5 .. (i + 1) * b - 0.5`` and its centre is plane position
    ``i * b + (b - 1) / 2``: the offset added here.
    """
    offset = np.array([0.0 if k is None else float(k) for k in key])
    if block is not None:
        for axis, b in zip(plane_axes(key), block, strict=True):
            offset[axis] = (float(b) - 1.0) / 2.0
    lin = np.diag(np.asarray(scale, dtype=np.float64)) if linear is None else np.asarray(linear)
    return np.asarray(translate, dtype=np.float64) + lin @ offset


def plane_layer_shape(
    shape: Sequence[int], key: SliceKey, size: Sequence[int] | None = None
) -> tuple[int, ...]:
    """Shape of a layer holding only this plane: 1 on sliced axes, full in-plane (or
    ``size`` ``(h, w)``, the plane at a reduced size)."""
    out = [1 if k is not None else int(n) for k, n in zip(key, shape, strict=True)]
    if size is not None:
        r, c = plane_axes(key)
        out[r], out[c] = int(size[0]), int(size[1])
    return tuple(out)


def describe_key(key: SliceKey, axis_labels: Sequence[str] | None = None) -> str:
    """Human-readable plane name, e.g. ``"z=5"`` or ``"2D"``."""
    parts = []
    for axis, k in enumerate(key):
        if k is None:
            continue
        name = axis_labels[axis] if axis_labels else f"axis {axis}"
        parts.append(f"{name}={k}")
    return ", ".join(parts) if parts else "2D"

"""napari (row, col) <-> SAM (x, y): the one place where prompt coordinates change axes.

napari stores a 2D point as ``(row, col)`` = ``(y, x)`` (more leading axes, e.g. ``z``, on
an nD layer) and a rectangle as four ``(row, col)`` vertices. SAM takes points as
``(x, y)`` and boxes as ``XYXY = (x_min, y_min, x_max, y_max)``, in pixels of the slice.
Both put pixel centres at integer coordinates, so the conversion is an axis swap (no half
pixel shift). Layer ``scale``/``translate`` are a napari matter: convert world coordinates
to the image layer's data coordinates (``layer.world_to_data``) before calling these.

Validation helpers (:func:`check_points`, :func:`check_boxes`) turn bad prompts into a
``ValueError`` naming the problem and warn (``PromptWarning``) about prompts that are
legal but probably mistakes, such as a point outside the slice.
"""

from __future__ import annotations

import warnings

import numpy as np


class PromptWarning(UserWarning):
    """A prompt that SAM accepts but that is probably a mistake (e.g. outside the image)."""


def _as_float_array(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def rc_to_xy(points_rc) -> np.ndarray:
    """napari points -> SAM points.

    Args:
        points_rc: (N, D) with D >= 2, napari order; the last two axes are (row, col).
            Leading axes (e.g. z of a 3D layer) are dropped: select the current slice's
            points first (:func:`points_on_slice`). A single point (D,) is accepted.

    Returns:
        (N, 2) float64, (x, y) = (col, row).
    """
    pts = _as_float_array(points_rc, "points")
    if pts.ndim == 1:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise ValueError(f"points must be (N, D) with D >= 2 (..., row, col), got {pts.shape}")
    return pts[:, [-1, -2]].copy()


def xy_to_rc(points_xy) -> np.ndarray:
    """SAM points (N, 2) (x, y) -> napari points (N, 2) (row, col), float64."""
    pts = _as_float_array(points_xy, "points")
    if pts.ndim == 1:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be (N, 2) (x, y), got shape {pts.shape}")
    return pts[:, ::-1].copy()


def box_rc_to_xyxy(corners_rc) -> np.ndarray:
    """napari rectangle(s) -> SAM XYXY box(es).

    Args:
        corners_rc: vertices of one rectangle, (K, D) with K >= 2 (four napari rectangle
            vertices in any order, or two opposite corners), or a batch (B, K, D). The last
            two axes are (row, col); leading axes are dropped.

    Returns:
        (4,) float64 ``[x_min, y_min, x_max, y_max]`` for one rectangle, (B, 4) for a batch.
        The bounding box of the vertices, so a rotated napari rectangle gives its
        axis-aligned hull.
    """
    c = _as_float_array(corners_rc, "box corners")
    if c.ndim not in (2, 3) or c.shape[-2] < 2 or c.shape[-1] < 2:
        raise ValueError(
            "box corners must be (K, D) rectangle vertices with K >= 2, D >= 2 (..., row, "
            f"col), or a batch (B, K, D); got shape {c.shape}"
        )
    rows, cols = c[..., -2], c[..., -1]
    box = np.stack([cols.min(-1), rows.min(-1), cols.max(-1), rows.max(-1)], axis=-1)
    return box


def xyxy_to_box_rc(box_xyxy) -> np.ndarray:
    """SAM XYXY box(es) -> napari rectangle vertices (row, col).

    Args:
        box_xyxy: (4,) or (B, 4) ``[x_min, y_min, x_max, y_max]``.

    Returns:
        (4, 2) or (B, 4, 2) float64 vertices (r0, c0), (r0, c1), (r1, c1), (r1, c0): a
        closed rectangle as napari's Shapes layer draws it.
    """
    b = _as_float_array(box_xyxy, "box")
    if b.shape[-1:] != (4,) or b.ndim not in (1, 2):
        raise ValueError(f"box must be (4,) or (B, 4) XYXY, got shape {b.shape}")
    x0, y0, x1, y1 = np.moveaxis(b, -1, 0)
    verts = np.stack(
        [
            np.stack([y0, x0], -1),
            np.stack([y0, x1], -1),
            np.stack([y1, x1], -1),
            np.stack([y1, x0], -1),
        ],
        axis=-2,
    )
    return verts


def points_on_slice(points_nd, index, tol: float = 0.5) -> np.ndarray:
    """Boolean mask of the nD napari points that lie on one 2D slice.

    Args:
        points_nd: (N, D) napari points; the first D - 2 axes are the slice position.
        index: the slice position, a scalar (D = 3) or a sequence of D - 2 numbers.
        tol: a point belongs to the slice when every leading coordinate is within ``tol``
            of ``index`` (0.5 = rounds to it).

    Returns:
        (N,) bool.
    """
    pts = _as_float_array(points_nd, "points")
    if pts.ndim != 2 or pts.shape[1] < 2:
        raise ValueError(f"points must be (N, D) with D >= 2, got shape {pts.shape}")
    lead = pts[:, :-2]
    idx = np.atleast_1d(np.asarray(index, dtype=np.float64))
    if idx.shape != (lead.shape[1],):
        raise ValueError(
            f"index needs {lead.shape[1]} leading coordinate(s) for {pts.shape[1]}D points, "
            f"got {idx.tolist()}"
        )
    return np.all(np.abs(lead - idx) <= tol, axis=1)


def _outside(xy: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    h, w = image_size
    x, y = xy[..., 0], xy[..., 1]
    return (x < -0.5) | (x > w - 0.5) | (y < -0.5) | (y > h - 0.5)


def check_points(
    point_coords, point_labels, image_size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validate SAM point prompts.

    Args:
        point_coords: (N, 2) (x, y) pixels, or a batch (B, N, 2).
        point_labels: (N,) or (B, N): 1 = foreground, 0 = background (-1 = padding, ignored).
        image_size: (H, W) of the slice; points outside it give a :class:`PromptWarning`.

    Returns:
        coords float64 with the input's shape, labels int64 with the matching shape.
    """
    if point_labels is None:
        raise ValueError("point_labels must be given with point_coords (1 = fg, 0 = bg)")
    coords = _as_float_array(point_coords, "point_coords")
    labels = np.asarray(point_labels)
    if coords.ndim not in (2, 3) or coords.shape[-1] != 2:
        raise ValueError(
            f"point_coords must be (N, 2) (x, y) or batched (B, N, 2), got shape {coords.shape}"
        )
    if coords.shape[-2] == 0:
        raise ValueError("point_coords is empty; pass None for no points")
    if labels.shape != coords.shape[:-1]:
        raise ValueError(
            f"point_labels shape {labels.shape} does not match point_coords {coords.shape}: "
            "one label per point"
        )
    if not np.all(np.isfinite(coords)):
        raise ValueError("point_coords contain NaN or inf")
    if not np.all(np.isin(labels, (-1, 0, 1))):
        raise ValueError(
            f"point_labels must be 1 (foreground) or 0 (background), got {np.unique(labels)}"
        )
    if image_size is not None:
        out = _outside(coords, image_size) & (labels >= 0)
        if out.any():
            bad = coords[out][:3].tolist()
            warnings.warn(
                f"{int(out.sum())} point(s) lie outside the {image_size[1]} x {image_size[0]} "
                f"(W x H) image, e.g. (x, y) = {bad}; check the (row, col) -> (x, y) order",
                PromptWarning,
                stacklevel=3,
            )
    return coords, labels.astype(np.int64)


def check_boxes(box, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Validate XYXY box prompts.

    Args:
        box: (4,) or (B, 4) ``[x_min, y_min, x_max, y_max]`` pixels.
        image_size: (H, W); a box entirely outside the slice gives a :class:`PromptWarning`.

    Returns:
        float64 array with the input's shape.

    Raises:
        ValueError for a wrong shape, NaN/inf, x_max < x_min or y_max < y_min, or a
        zero-area box (a single click should be a point prompt).
    """
    b = _as_float_array(box, "box")
    if b.ndim not in (1, 2) or b.shape[-1] != 4:
        raise ValueError(f"box must be (4,) XYXY or batched (B, 4), got shape {b.shape}")
    if b.ndim == 2 and b.shape[0] == 0:
        raise ValueError("box batch is empty; pass None for no box")
    if not np.all(np.isfinite(b)):
        raise ValueError("box contains NaN or inf")
    bb = b.reshape(-1, 4)
    if np.any(bb[:, 2] < bb[:, 0]) or np.any(bb[:, 3] < bb[:, 1]):
        raise ValueError(
            f"box must be XYXY with x_min <= x_max and y_min <= y_max, got {bb.tolist()[:3]}; "
            "napari rectangles convert with prompts.box_rc_to_xyxy"
        )
    area = (bb[:, 2] - bb[:, 0]) * (bb[:, 3] - bb[:, 1])
    if np.any(area <= 0):
        raise ValueError(
            f"box has zero area: {bb[area <= 0].tolist()[:3]}; draw a larger box or use a point"
        )
    if image_size is not None:
        h, w = image_size
        gone = (bb[:, 2] < -0.5) | (bb[:, 0] > w - 0.5) | (bb[:, 3] < -0.5) | (bb[:, 1] > h - 0.5)
        if gone.any():
            warnings.warn(
                f"{int(gone.sum())} box(es) lie entirely outside the {w} x {h} (W x H) image: "
                f"{bb[gone].tolist()[:3]}",
                PromptWarning,
                stacklevel=3,
            )
    return b

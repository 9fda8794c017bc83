"""The one place that converts napari's (row, col) coordinates to SAM's (x, y).

napari addresses pixels as ``(row, col)`` in data coordinates, with the centre of pixel
``[r, c]`` at ``(r, c)``. SAM takes points as ``(x, y)`` pixels of the image given to
``set_image`` and boxes as ``XYXY``; its examples put the point of pixel ``[r, c]`` at
``(x, y) = (c, r)``. The conversion is therefore an axis swap, written here once and
tested both ways.
"""

from __future__ import annotations

import numpy as np


def rc_to_xy(points_rc) -> np.ndarray:
    """``points_rc: (N, 2) (row, col)`` -> ``(N, 2) float64 (x, y)``."""
    pts = np.asarray(points_rc, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) in (row, col); got {pts.shape}")
    return pts[:, ::-1].copy()


def xy_to_rc(points_xy) -> np.ndarray:
    """``points_xy: (N, 2) (x, y)`` -> ``(N, 2) float64 (row, col)``."""
    pts = np.asarray(points_xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) in (x, y); got {pts.shape}")
    return pts[:, ::-1].copy()


def box_rc_to_xyxy(corners_rc) -> np.ndarray:
    """Rectangle vertices ``(K, 2) (row, col)`` (two opposite corners or napari's four, any
    order) -> ``(4,) XYXY``, the bounding box of the vertices."""
    c = np.asarray(corners_rc, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] < 2 or c.shape[1] != 2:
        raise ValueError(f"box corners must be (K, 2) (row, col) with K >= 2; got {c.shape}")
    return np.array([c[:, 1].min(), c[:, 0].min(), c[:, 1].max(), c[:, 0].max()])

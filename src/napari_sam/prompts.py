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


def box_rc_to_xyxy(box_rc) -> np.ndarray:
    """A box given by two opposite corners ``(r0, c0, r1, c1)`` -> ``(4,) XYXY``.

    The corners may come in any order (a rectangle drawn from bottom-right to top-left);
    the result always has ``x0 <= x1`` and ``y0 <= y1``.
    """
    b = np.asarray(box_rc, dtype=np.float64).reshape(-1)
    if b.shape != (4,):
        raise ValueError(f"box must be (r0, c0, r1, c1); got shape {np.shape(box_rc)}")
    r0, c0, r1, c1 = b
    return np.array([min(c0, c1), min(r0, r1), max(c0, c1), max(r0, r1)])


def xyxy_to_box_rc(box_xyxy) -> np.ndarray:
    """``(4,) XYXY`` -> ``(r0, c0, r1, c1)`` with ``r0 <= r1`` and ``c0 <= c1``."""
    b = np.asarray(box_xyxy, dtype=np.float64).reshape(-1)
    if b.shape != (4,):
        raise ValueError(f"box must be XYXY (x0, y0, x1, y1); got shape {np.shape(box_xyxy)}")
    x0, y0, x1, y1 = b
    return np.array([min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)])

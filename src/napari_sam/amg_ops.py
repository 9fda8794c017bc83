"""Building blocks of automatic mask generation (numpy/torch, no Qt).

Conventions: images and masks are row-major ``(H, W)`` (row = y, col = x); points are
``(N, 2)`` float ``(x, y)``; boxes are ``(N, 4)`` XYXY with *inclusive* pixel bounds
(``x1, y1`` = last column/row of the mask), so a single pixel at (x=3, y=5) has the box
``[3, 5, 3, 5]`` and area 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported inside the functions that need it
    import torch

__all__ = [
    "point_grid",
    "crop_boxes",
    "stability_score",
    "boxes_from_masks",
    "box_iou",
    "box_nms",
    "mask_nms",
    "interp_matrix",
    "remove_small_regions",
    "paint_labels",
]


def point_grid(n_per_side: int) -> np.ndarray:
    """Regular grid of ``n_per_side**2`` points in the unit square, cell centres.

    Returns (n*n, 2) float64 (x, y) in [0, 1], x varying fastest (row-major order).
    """
    if int(n_per_side) != n_per_side or n_per_side < 1:
        raise ValueError(f"points per side must be a positive integer, got {n_per_side!r}")
    n = int(n_per_side)
    c = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(c, c)  # (n, n), xx varies along columns
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def grid_levels(n_per_side: int) -> np.ndarray:
    """Coarse-to-fine level of each grid point (same order as :func:`point_grid`).

    Level 0 holds the points whose row and column indices are multiples of 4, level 1 the
    remaining multiples of 2, level 2 the rest (levels that would hold fewer than 2x2
    points are merged into the next). Processing by level lets later points be skipped
    where earlier masks already cover the image.
    """
    n = int(n_per_side)
    idx = np.arange(n)
    iy, ix = np.meshgrid(idx, idx, indexing="ij")
    level = np.full((n, n), 2)
    for lv, stride in ((1, 2), (0, 4)):
        if n // stride >= 2:
            level[(iy % stride == 0) & (ix % stride == 0)] = lv
    return level.ravel()


def crop_boxes(
    shape: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[tuple[int, int, int, int]], list[int]]:
    """Crops for multi-scale automatic segmentation.

    Layer 0 is the whole image; layer k tiles the image with ``2**k`` x ``2**k`` crops that
    overlap by ``overlap_ratio`` of the shorter side scaled down by ``2**k``. Returns the
    crop boxes XYXY with *exclusive* ends ``(x0, y0, x1, y1)`` and their layer indices.
    """
    h, w = shape
    boxes = [(0, 0, w, h)]
    layers = [0]
    short = min(h, w)
    for k in range(1, n_layers + 1):
        n = 2**k
        overlap = int(overlap_ratio * short * (2 / n))
        cw = int(np.ceil((overlap * (n - 1) + w) / n))
        ch = int(np.ceil((overlap * (n - 1) + h) / n))
        xs = [int((cw - overlap) * i) for i in range(n)]
        ys = [int((ch - overlap) * i) for i in range(n)]
        for y0 in ys:
            for x0 in xs:
                boxes.append((x0, y0, min(x0 + cw, w), min(y0 + ch, h)))
                layers.append(k)
    return boxes, layers


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks ``logits > threshold + offset`` and ``logits > threshold - offset``.

    The first mask is contained in the second, so the IoU is a ratio of pixel counts and no
    mask is materialised in float. logits: (N, H, W); returns (N,) float32, 0 for masks
    that are empty even at the lower threshold.
    """
    import torch

    if offset < 0:
        raise ValueError(f"stability offset must be >= 0, got {offset}")
    hi = (logits > threshold + offset).sum(dim=(-1, -2), dtype=torch.int64)
    lo = (logits > threshold - offset).sum(dim=(-1, -2), dtype=torch.int64)
    return torch.where(lo > 0, hi.double() / lo.clamp(min=1).double(), 0.0).float()


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """masks (N, H, W) bool -> (N, 4) int64 XYXY inclusive; empty masks get [0, 0, -1, -1]."""
    import torch

    n, h, w = masks.shape
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], 1)
    empty = ~rows.any(1)
    boxes[empty] = torch.tensor([0, 0, -1, -1], device=masks.device)
    return boxes


def _as_float_boxes(boxes) -> torch.Tensor:
    import torch

    boxes = torch.as_tensor(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4) XYXY, got shape {tuple(boxes.shape)}")
    return boxes.double()


def box_iou(a, b) -> torch.Tensor:
    """IoU of inclusive-pixel XYXY boxes a (N, 4) and b (M, 4) -> (N, M) float64."""
    import torch

    a, b = _as_float_boxes(a), _as_float_boxes(b)
    inter = _box_inter(a, b)
    area_a = (a[:, 2] - a[:, 0] + 1).clamp(min=0) * (a[:, 3] - a[:, 1] + 1).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0] + 1).clamp(min=0) * (b[:, 3] - b[:, 1] + 1).clamp(min=0)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), 0.0)


def _box_inter(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch

    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _score_order(scores) -> np.ndarray:
    import torch

    scores = np.asarray(torch.as_tensor(scores).double().cpu())
    if scores.ndim != 1:
        raise ValueError(f"scores must be (N,), got shape {scores.shape}")
    # stable: equal scores keep their input order
    return np.argsort(-scores, kind="stable")


def box_nms(boxes, scores, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression on boxes.

    Visits boxes by decreasing score (ties: input order); a box is kept unless its IoU with
    an already kept box is > ``iou_threshold``. boxes (N, 4) XYXY inclusive, scores (N,).
    Returns kept indices (K,) int64 in decreasing score order.
    """
    import torch

    boxes = _as_float_boxes(boxes)
    order = _score_order(scores)
    if len(order) != len(boxes):
        raise ValueError("boxes and scores must have the same length")
    iou = box_iou(boxes, boxes).numpy()
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return torch.as_tensor(keep, dtype=torch.int64)


def mask_nms(
    masks: torch.Tensor, scores, iou_threshold: float, boxes=None, areas=None
) -> torch.Tensor:
    """Greedy non-maximum suppression on mask IoU (exact, pixel counts).

    A mask is dropped when its mask IoU with a higher-scored kept mask is > ``iou_threshold``
    - this catches duplicates whose boxes differ (a stray pixel stretches one box) and keeps
    distinct objects whose boxes coincide (a ring and its centre), where box NMS misleads.
    Boxes only prune the pairs to test: IoU > t needs ``inter >= t * max(area_i, area_j)``,
    and ``inter`` is at most the box intersection.

    masks (N, H, W) bool; scores (N,); boxes (N, 4) XYXY inclusive and areas (N,) pixel
    counts (computed if None; callers that run NMS repeatedly over growing sets pass them).
    Returns kept indices (K,) int64 in decreasing score order.
    """
    import torch

    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {tuple(masks.shape)}")
    n = masks.shape[0]
    order = _score_order(scores)
    if len(order) != n:
        raise ValueError("masks and scores must have the same length")
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    if boxes is None:
        boxes = boxes_from_masks(masks)
    flat = masks.reshape(n, -1)
    area = flat.sum(1).double() if areas is None else torch.as_tensor(areas).double()
    b = _as_float_boxes(boxes)
    cand = _box_inter(b, b) >= iou_threshold * torch.maximum(area[:, None], area[None, :])
    cand = cand.numpy()
    area_np = area.numpy()
    suppressed = np.zeros(n, dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        js = np.flatnonzero(cand[i] & ~suppressed)
        js = js[js != i]
        if len(js) == 0:
            continue
        inter = (flat[js] & flat[i]).sum(1).double().numpy()
        union = area_np[js] + area_np[i] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
        suppressed[js[iou > iou_threshold]] = True
    return torch.as_tensor(keep, dtype=torch.int64)


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D bilinear resizing as done by
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (no antialias):
    resizing a (n_in,) signal is ``M @ x``; a 2-D resize is ``My @ X @ Mx.T``."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in))
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill holes and drop islands smaller than ``min_area`` pixels (8-connected objects,
    4-connected holes). A hole is a background component that does not touch the border.
    If every island is small the largest one is kept. mask (H, W) bool -> (H, W) bool."""
    from scipy import ndimage

    if min_area <= 0 or not mask.any():
        return mask
    out = mask.copy()
    bg, n_bg = ndimage.label(~out)  # 4-connectivity
    if n_bg:
        sizes = np.bincount(bg.ravel())
        border = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
        small = sizes < min_area
        small[0] = False
        small[border] = False
        out[small[bg]] = True
    fg, n_fg = ndimage.label(out, structure=np.ones((3, 3)))
    if n_fg > 1 or (n_fg == 1 and out.sum() < min_area):
        sizes = np.bincount(fg.ravel())
        sizes[0] = 0
        keep = sizes >= min_area
        if not keep.any():
            keep[np.argmax(sizes)] = True
        keep[0] = False
        out = keep[fg]
    return out


def paint_labels(
    shape: tuple[int, int],
    windows: list[tuple[int, int, np.ndarray]],
    scores,
    min_area: int = 0,
) -> np.ndarray:
    """Instance label image from possibly overlapping masks; higher scores win.

    windows: one ``(row0, col0, mask)`` per object, ``mask`` a bool window placed with its
    top-left corner at (row0, col0). Pixels claimed by several masks go to the highest
    score (ties: earlier in the list). Objects with fewer than ``min_area`` visible pixels
    are dropped (their pixels become background). Ids are 1..K, numbered by the raster
    position (row, then column) of each object's first pixel, so they do not depend on
    the order of the input. Returns (H, W) int32.
    """
    labels = np.zeros(shape, dtype=np.int32)
    order = _score_order(scores) if len(windows) else []
    for k, i in enumerate(order, start=1):
        r0, c0, m = windows[i]
        view = labels[r0 : r0 + m.shape[0], c0 : c0 + m.shape[1]]
        view[m & (view == 0)] = k
    return relabel_raster(labels, min_area)


def relabel_raster(labels: np.ndarray, min_area: int = 0) -> np.ndarray:
    """Renumber ids 1..K by the raster position of each object's first voxel, dropping
    objects smaller than ``min_area``. Works for any dimensionality; returns int32."""
    flat = labels.ravel()
    ids, first, counts = np.unique(flat, return_index=True, return_counts=True)
    good = (ids != 0) & (counts >= max(min_area, 1))
    ids, first = ids[good], first[good]
    lut = np.zeros(int(flat.max(initial=0)) + 1, dtype=np.int32)
    lut[ids[np.argsort(first, kind="stable")]] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]

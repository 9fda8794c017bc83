"""Link per-slice 2-D instance labels into 3-D objects (numpy/scipy, no torch, no Qt).

Rule (applied slice by slice, z = 0, 1, ...):

1. For every 2-D instance ``b`` of slice z and every 3-D object ``a`` present in slice
   z - 1, measure their overlap ``|a & b| / min(|a|, |b|)`` (the fraction of the smaller
   one covered by the other) and their ``IoU = |a & b| / |a | b|``.
2. Pairs with overlap >= ``overlap_threshold`` are candidates. A one-to-one assignment of
   candidates maximising the summed IoU (Hungarian algorithm) links each matched ``b`` to
   its ``a``: an object continues into the instance that fits it best, and two touching
   objects - two instances in every slice - keep two ids. The overlap (not the IoU)
   decides whether a link is possible, so that the small caps at the ends of a round object
   still join it.
3. With ``max_gap`` > 1, instances still unmatched are compared the same way with the
   objects last seen in slice z - 2, ..., z - max_gap: an object missed by the 2-D
   segmentation in a slice is bridged.
4. Unmatched instances start new objects.

At the end, objects present in fewer than ``min_z_extent`` slices are removed, and ids are
renumbered 1..K in raster (z, y, x) order of each object's first voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from napari_sam.amg_ops import relabel_raster

__all__ = ["StitchParams", "Stitcher", "stitch_slices", "overlap_iou"]


@dataclass(frozen=True)
class StitchParams:
    """overlap_threshold: minimal ``|a & b| / min(|a|, |b|)`` between an object in a
    previous slice and an instance in the current slice to link them. max_gap: how many
    slices back to look for an object to continue (1 = only the previous slice).
    min_z_extent: objects present in fewer slices are dropped (1 keeps all)."""

    overlap_threshold: float = 0.5
    max_gap: int = 2
    min_z_extent: int = 2

    def __post_init__(self):
        if not 0 < self.overlap_threshold <= 1:
            raise ValueError(
                f"overlap_threshold must be in (0, 1], got {self.overlap_threshold!r}"
            )
        if self.max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {self.max_gap!r}")
        if self.min_z_extent < 1:
            raise ValueError(f"min_z_extent must be >= 1, got {self.min_z_extent!r}")


def overlap_iou(a: np.ndarray, b: np.ndarray):
    """Overlap and IoU between the instances of two label images of the same shape.

    Returns (ids_a (N,), ids_b (M,), overlap (N, M), iou (N, M)) for the nonzero ids present
    in each; overlap = intersection / smaller area.
    """
    if a.shape != b.shape:
        raise ValueError(f"label images differ in shape: {a.shape} vs {b.shape}")
    ids_a, inv_a, area_a = np.unique(a.ravel(), return_inverse=True, return_counts=True)
    ids_b, inv_b, area_b = np.unique(b.ravel(), return_inverse=True, return_counts=True)
    inter = np.zeros((len(ids_a), len(ids_b)), dtype=np.int64)
    np.add.at(inter, (inv_a, inv_b), 1)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / np.maximum(union, 1)
    overlap = inter / np.maximum(np.minimum(area_a[:, None], area_b[None, :]), 1)
    sa, sb = ids_a != 0, ids_b != 0
    sel = np.ix_(sa, sb)
    return ids_a[sa], ids_b[sb], overlap[sel], iou[sel]


def _match(overlap: np.ndarray, iou: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """One-to-one pairs (row, col) maximising summed IoU among pairs with overlap >= t."""
    from scipy.optimize import linear_sum_assignment

    if iou.size == 0:
        return []
    w = np.where(overlap >= threshold, iou, 0.0)
    rows, cols = linear_sum_assignment(w, maximize=True)
    return [(r, c) for r, c in zip(rows, cols, strict=True) if w[r, c] > 0]


class Stitcher:
    """Incremental stitching: ``add`` one 2-D label slice at a time, then ``result()``.

    shape: (H, W) of each slice.
    """

    def __init__(self, shape: tuple[int, int], params: StitchParams | None = None):
        self.shape = tuple(shape)
        self.p = params or StitchParams()
        self.slices: list[np.ndarray] = []  # 3-D ids per slice
        self.next_id = 1
        self.last_seen: dict[int, int] = {}  # object id -> last z

    def add(self, labels: np.ndarray) -> np.ndarray:
        """labels: (H, W) integer 2-D instances of the next slice. Returns its 3-D ids."""
        labels = np.asarray(labels)
        if labels.shape != self.shape:
            raise ValueError(f"slice has shape {labels.shape}, expected {self.shape}")
        z = len(self.slices)
        ids_b = np.unique(labels)
        ids_b = ids_b[ids_b != 0]
        assigned: dict[int, int] = {}
        for gap in range(1, self.p.max_gap + 1):
            if z - gap < 0 or len(assigned) == len(ids_b):
                break
            prev = self.slices[z - gap]
            if gap > 1:  # only objects not seen since that slice
                stale = [o for o, zl in self.last_seen.items() if zl == z - gap]
                prev = np.where(np.isin(prev, stale), prev, 0)
                prev[np.isin(prev, list(assigned.values()))] = 0
            cur = np.where(np.isin(labels, list(assigned)), 0, labels)
            ia, ib, overlap, iou = overlap_iou(prev, cur)
            for r, c in _match(overlap, iou, self.p.overlap_threshold):
                assigned[int(ib[c])] = int(ia[r])
        uniq, inv = np.unique(labels.ravel(), return_inverse=True)
        lut = np.zeros(len(uniq), dtype=np.int64)
        for k, b in enumerate(uniq):
            if b == 0:
                continue
            oid = assigned.get(int(b))
            if oid is None:
                oid = self.next_id
                self.next_id += 1
            lut[k] = oid
            self.last_seen[oid] = z
        out = lut[inv].reshape(self.shape)
        self.slices.append(out)
        return out

    def result(self) -> np.ndarray:
        """(Z, H, W) int32 3-D labels, short objects removed, ids renumbered."""
        if not self.slices:
            return np.zeros((0, *self.shape), dtype=np.int32)
        vol = np.stack(self.slices)
        if self.p.min_z_extent > 1:
            present = np.zeros(self.next_id, dtype=np.int64)
            for s in self.slices:
                present[np.unique(s)] += 1
            present[0] = 0
            short = present < self.p.min_z_extent
            short[0] = False
            vol[short[vol]] = 0
        return relabel_raster(vol)


def stitch_slices(labels: np.ndarray, params: StitchParams | None = None) -> np.ndarray:
    """Stitch a stack of independent 2-D label images (Z, H, W) into 3-D instances.

    See the module docstring for the rule. Returns (Z, H, W) int32.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected (Z, H, W) per-slice labels, got shape {labels.shape}")
    st = Stitcher(labels.shape[1:], params)
    for s in labels:
        st.add(s)
    return st.result()

"""Propagate object masks through a stack, slice by slice, from annotated anchor slices.

Model: an object is known on one or more *anchor* slices (masks the user annotated or
corrected). From each anchor a *front* walks up (+1) and down (-1) the slice axis. Each
step prompts slice ``z`` with what the front found on the previous slice:

- the previous low-res logits as the dense ``mask_input`` prompt (for an anchor, logits
  derived from its mask, or the annotator's own logits when given);
- the previous mask's bounding box, enlarged by a margin (XYXY, pixels of the slice);
- optionally positive points inside the previous mask (its most interior pixels) and
  negative points inside the box from other objects' previous masks.

All objects active on a slice are decoded in one batched call against that slice's
embedding. The next slice's embedding is computed in a background thread while the
current one is decoded (``prefetch=True``), so with cold embeddings propagation costs
about one encoder run per slice.

A front stops (see :class:`StopCriteria`; reason in :class:`StopReason`; each step carries
its :class:`StepMetrics`) when

- ``EMPTY``: the mask has fewer than ``min_area`` pixels;
- ``LOW_SCORE``: the predicted IoU is below ``min_score`` (off by default: SAM keeps
  following the mask prompt past the object's end with hardly lower predicted IoU, and a
  fixed threshold stops early inside the object, the pitfall noted in issue 4);
- ``LOW_OVERLAP``: the IoU with the previous slice's mask is below ``min_iou_prev``;
- ``AREA_GROWTH`` / ``AREA_SHRINK``: the area changes by more than a factor from the
  previous slice (growth is the usual sign of leaking into a neighbour or background);
- ``LOW_CONTRAST``: the image no longer shows the object: the contrast between the mask
  and a ring around it (mean intensity for objects that stand out in brightness, else the
  mean image embedding) falls below ``min_contrast`` times the same contrast on the anchor;
- ``RANGE``: the next slice is outside ``z_range`` or the stack;
- ``ANCHOR``: the next slice is another anchor of the same object (never overwritten).

The defaults come from ``benchmarks/bench_stop_rules.py`` (volumes with known extent;
results in docs/volumes.md): image-evidence rules end fronts near the true object end,
where the geometric rules let masks run on past it.

A slice that triggers a stop is not kept. Between two anchors both fronts fill the gap
and each slice keeps the result with the higher predicted IoU. Per-volume state lives in
:class:`PropagationState` (a dataclass), so corrections are incremental: add an anchor on
a corrected slice and propagate again; only fronts from new anchors are recomputed.

Axis order: masks are ``(rows, cols)`` slices of the stack along the store's axis; boxes
and points given to SAM are ``(x, y)`` = ``(col, row)`` pixel coordinates of the slice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

__all__ = [
    "Anchor",
    "ObjectTrack",
    "PromptOptions",
    "PropagationState",
    "PropagationStep",
    "SliceResult",
    "StepMetrics",
    "StopCriteria",
    "StopReason",
    "describe_stops",
    "mask_to_box",
    "mask_to_logits",
    "propagate",
]

UP, DOWN = 1, -1


class StopReason(str, Enum):
    """Why a front stopped (``str`` values are stable, for display and logs)."""

    EMPTY = "empty mask"
    LOW_SCORE = "predicted IoU below threshold"
    LOW_OVERLAP = "IoU with previous slice below threshold"
    AREA_GROWTH = "area grew beyond factor"
    AREA_SHRINK = "area shrank beyond factor"
    SMALL_VS_ANCHOR = "area fell below a fraction of the anchor's"
    LOW_CONTRAST = "object no longer stands out from its surroundings"
    RANGE = "end of slice range"
    ANCHOR = "reached another anchor"


@dataclass(frozen=True)
class StepMetrics:
    """What a step measured, for the stop rules and for display.

    area, prev_area: pixels of this and of the previous slice's mask; iou_prev: their IoU;
    anchor_area: pixels of the front's anchor mask (0: unknown); score: SAM's predicted IoU. Contrast of the mask with a ring around it, as a fraction
    of the same contrast on the front's anchor (1: as on the anchor, 0: the object does
    not stand out any more; nan: not measured): intensity_contrast from mean intensities
    of the slice, feature_contrast from the image embedding (projected on the anchor's
    contrast vector); contrast: the one the stop rule used.
    """

    area: int
    prev_area: int
    iou_prev: float
    score: float
    feature_contrast: float = float("nan")
    intensity_contrast: float = float("nan")
    contrast: float = float("nan")
    anchor_area: int = 0


CONTRAST_MODES = ("auto", "intensity", "embedding", "both")


@dataclass(frozen=True)
class StopCriteria:
    """When a front stops. ``None`` disables a criterion; the first that fires is reported.

    min_area: pixels; a mask with fewer is empty (EMPTY). Values below 1 act as 1.
    min_score: predicted IoU threshold (LOW_SCORE). Off by default: SAM's predicted IoU
        hardly drops when the object ends (the model keeps following the mask prompt),
        and a fixed threshold stops early inside the object (issue 4's pitfall).
    min_iou_prev: IoU between this and the previous slice's mask (LOW_OVERLAP).
    max_area_growth / max_area_shrink: area above factor * previous area / below previous
        area / factor (AREA_GROWTH / AREA_SHRINK); growth is how leaks look.
    min_anchor_area: stop when the area falls below this fraction of the anchor's area
        (SMALL_VS_ANCHOR). In packed tissue a front that does not end with its object
        shrinks and runs on into the nucleus above or below; a cross-section this much
        smaller than the annotated one is where the object ends.
    min_contrast: stop when the image no longer shows the object (LOW_CONTRAST): the
        contrast between the mask and a ring around it falls below this fraction of the
        same contrast on the anchor slice.
    contrast: how that contrast is measured. ``"intensity"``: mean intensity inside minus
        in a 3-pixel ring; only objects that stand out in brightness on their anchor
        (difference of means at least half the pooled standard deviation) are judged,
        others never stop on it. ``"embedding"``: the same difference of the image
        embedding (mean feature vectors on the encoder's grid, ring of 2 cells), projected
        on the anchor's; needs the anchor slice's embedding. ``"auto"``: intensity for
        objects that stand out in brightness, embedding for the others. ``"both"``
        (default): stop when either falls below (objects that do not stand out in
        brightness are judged by the embedding alone).

    Defaults were chosen with ``benchmarks/bench_stop_rules.py`` on volumes with known
    extent (see docs/volumes.md).
    """

    min_area: int = 1
    min_score: float | None = None
    min_iou_prev: float | None = 0.5
    max_area_growth: float | None = 2.5
    max_area_shrink: float | None = None
    min_anchor_area: float | None = None
    min_contrast: float | None = 0.4
    contrast: str = "both"

    def __post_init__(self):
        if self.contrast not in CONTRAST_MODES:
            raise ValueError(f"contrast must be one of {CONTRAST_MODES}, not {self.contrast!r}")

    def check(self, m: StepMetrics) -> StopReason | None:
        """The first criterion that fires for metrics ``m``, or None."""
        if m.area < max(self.min_area, 1):
            return StopReason.EMPTY
        if self.min_score is not None and not m.score >= self.min_score:
            return StopReason.LOW_SCORE
        if self.min_iou_prev is not None and m.iou_prev < self.min_iou_prev:
            return StopReason.LOW_OVERLAP
        if self.max_area_growth is not None and m.area > self.max_area_growth * m.prev_area:
            return StopReason.AREA_GROWTH
        if self.max_area_shrink is not None and m.area * self.max_area_shrink < m.prev_area:
            return StopReason.AREA_SHRINK
        if self.min_anchor_area is not None and m.area < self.min_anchor_area * m.anchor_area:
            return StopReason.SMALL_VS_ANCHOR
        # nan (not measurable for this object) never stops a front.
        if self.min_contrast is not None and m.contrast < self.min_contrast:
            return StopReason.LOW_CONTRAST
        return None

    def combine(self, intensity: float, feature: float) -> float:
        """The contrast the rule uses, from the two measures (nan: not measured)."""
        if self.contrast == "intensity":
            return intensity
        if self.contrast == "embedding":
            return feature
        if self.contrast == "auto":
            return intensity if np.isfinite(intensity) else feature
        finite = [v for v in (intensity, feature) if np.isfinite(v)]
        return min(finite) if finite else float("nan")

    @property
    def needs_intensity(self) -> bool:
        return self.min_contrast is not None and self.contrast != "embedding"

    @property
    def needs_features(self) -> bool:
        return self.min_contrast is not None and self.contrast != "intensity"


@dataclass(frozen=True)
class PromptOptions:
    """Prompts derived from the previous slice.

    mask_prompt: feed the previous low-res logits as mask_input (the dense prompt).
    box: also prompt with the previous mask's bounding box, grown by ``box_margin``
    (fraction of its side, on each side) plus ``box_margin_px`` pixels.
    n_positive: positive points at the most interior pixels of the previous mask.
    negatives_from_others: negative points at the interior of other objects' previous
    masks that fall inside this object's box (makes batched objects depend on each other).
    multimask: ask SAM for 3 masks and keep the one with the highest predicted IoU (else
    SAM's single-mask output).
    anchor_logit_scale: logit magnitude for a binary anchor mask turned into mask_input.
    mask_prompt_scale: factor on the previous logits before they become mask_input (< 1
    weakens the pull of the previous slice's mask against the image evidence).

    Defaults (mask prompt only, best of 3) were measured against box + mask prompt with
    ``benchmarks/bench_stop_rules.py`` (docs/volumes.md): with the default model they give
    a higher 3D Dice and, without stop rules, far less run-away growth (a box grown by a
    margin on every slice lets masks fill the box and widen slice after slice).
    """

    box: bool = False
    box_margin: float = 0.1
    box_margin_px: float = 2.0
    mask_prompt: bool = True
    n_positive: int = 0
    negatives_from_others: bool = False
    multimask: bool = True
    anchor_logit_scale: float = 8.0
    mask_prompt_scale: float = 1.0

    def __post_init__(self):
        if not (self.box or self.mask_prompt or self.n_positive > 0):
            raise ValueError(
                "PromptOptions gives SAM no prompt: enable box, mask_prompt or n_positive > 0"
            )


@dataclass
class Anchor:
    """A slice where the object's mask is given. mask: ``(rows, cols)`` bool.

    logits: optional low-res logits ``(h, w)`` for that mask (from the 2D annotator); when
    None they are derived from the mask.
    """

    z: int
    mask: np.ndarray
    logits: np.ndarray | None = None

    #: Anchors always win over propagated results.
    score = float("inf")


@dataclass
class SliceResult:
    """A propagated mask, kept cropped to its bounding box (memory grows with the objects'
    size, not with the slice size). score: predicted IoU; ``mask``: full ``(rows, cols)``
    bool, built on access."""

    z: int
    score: float
    anchor_z: int
    direction: int
    crop: np.ndarray  # (r1 - r0, c1 - c0) bool
    offset: tuple[int, int]  # (r0, c0)
    shape: tuple[int, int]

    @classmethod
    def from_mask(cls, z, mask, score, anchor_z, direction) -> SliceResult:
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if rows.size:
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        else:
            r0 = r1 = c0 = c1 = 0
        crop = np.array(mask[r0:r1, c0:c1], dtype=bool)
        return cls(z, float(score), anchor_z, direction, crop, (int(r0), int(c0)), mask.shape)

    @property
    def mask(self) -> np.ndarray:
        out = np.zeros(self.shape, bool)
        r0, c0 = self.offset
        out[r0 : r0 + self.crop.shape[0], c0 : c0 + self.crop.shape[1]] = self.crop
        return out


@dataclass(frozen=True)
class PropagationStep:
    """One yielded step of :func:`propagate`.

    z: slice; obj_id: object; mask ``(rows, cols)`` bool or None (RANGE/ANCHOR stops);
    score: predicted IoU (nan without a mask); reason: None while the front goes on, else
    why it stopped at z (then the mask, if any, was rejected); direction: +1 up, -1 down;
    anchor_z: the anchor the front started from; chosen: True when this mask is now the
    object's result on z (the better of the two directions between anchors); metrics:
    what the stop rules looked at (None for RANGE/ANCHOR stops).
    """

    z: int
    obj_id: int
    mask: np.ndarray | None
    score: float
    reason: StopReason | None
    direction: int
    anchor_z: int
    chosen: bool = False
    metrics: StepMetrics | None = None

    @property
    def accepted(self) -> bool:
        return self.reason is None


@dataclass
class ObjectTrack:
    """Per-object state: anchors, results from both directions, and where fronts stopped."""

    obj_id: int
    anchors: dict[int, Anchor] = field(default_factory=dict)
    up: dict[int, SliceResult] = field(default_factory=dict)
    down: dict[int, SliceResult] = field(default_factory=dict)
    # (anchor_z, direction) -> (z, reason) for completed fronts.
    stops: dict[tuple[int, int], tuple[int, StopReason]] = field(default_factory=dict)

    def results(self, direction: int) -> dict[int, SliceResult]:
        return self.up if direction == UP else self.down

    def neighbours(self, z: int) -> tuple[int | None, int | None]:
        """Nearest anchors strictly below and above z."""
        below = [a for a in self.anchors if a < z]
        above = [a for a in self.anchors if a > z]
        return (max(below) if below else None, min(above) if above else None)

    def best(self, z: int) -> Anchor | SliceResult | None:
        """What the object is on z: its anchor, else the better-scored propagated result
        (higher predicted IoU; on a tie the one nearer its anchor), or None."""
        if z in self.anchors:
            return self.anchors[z]
        cands = [r for r in (self.up.get(z), self.down.get(z)) if r is not None]
        if not cands:
            return None
        return max(cands, key=lambda r: (r.score, -abs(r.z - r.anchor_z)))

    def _drop_front(self, anchor_z: int, direction: int) -> None:
        res = self.results(direction)
        for z in [z for z, r in res.items() if r.anchor_z == anchor_z]:
            del res[z]
        self.stops.pop((anchor_z, direction), None)


@dataclass
class PropagationState:
    """Everything propagation knows about one stack: ``n_slices`` slices of ``slice_shape``."""

    n_slices: int
    slice_shape: tuple[int, int]
    objects: dict[int, ObjectTrack] = field(default_factory=dict)

    def add_anchor(
        self, obj_id: int, z: int, mask: np.ndarray, logits: np.ndarray | None = None
    ) -> None:
        """Set (or replace) object ``obj_id``'s mask on slice ``z`` as an anchor.

        Results that came through z from farther anchors are dropped; fronts that had
        passed z now end there (``StopReason.ANCHOR``). Propagate again to fill from z.
        """
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise IndexError(f"anchor slice {z} outside the stack (0..{self.n_slices - 1})")
        mask = np.asarray(mask)
        if mask.shape != tuple(self.slice_shape):
            raise ValueError(
                f"anchor mask has shape {mask.shape}, slices are {tuple(self.slice_shape)}"
            )
        mask = mask.astype(bool, copy=True)
        if not mask.any():
            raise ValueError(
                f"anchor mask for object {obj_id} on slice {z} is empty; draw the object first "
                "(or remove_anchor to forget the slice)"
            )
        track = self.objects.setdefault(obj_id, ObjectTrack(obj_id))
        if z in track.anchors:
            track._drop_front(z, UP)
            track._drop_front(z, DOWN)
        below, above = track.neighbours(z)
        if below is not None:
            self._truncate(track, below, UP, z)
        if above is not None:
            self._truncate(track, above, DOWN, z)
        track.up.pop(z, None)
        track.down.pop(z, None)
        track.anchors[z] = Anchor(z, mask, None if logits is None else np.asarray(logits))

    @staticmethod
    def _truncate(track: ObjectTrack, anchor_z: int, direction: int, z: int) -> None:
        res = track.results(direction)
        beyond = [k for k, r in res.items() if r.anchor_z == anchor_z and (k - z) * direction >= 0]
        for k in beyond:
            del res[k]
        stop = track.stops.get((anchor_z, direction))
        if stop is not None and (stop[0] - z) * direction >= 0:
            track.stops[(anchor_z, direction)] = (z, StopReason.ANCHOR)

    def remove_anchor(self, obj_id: int, z: int) -> None:
        """Forget an anchor; neighbouring fronts must run again (they ended there)."""
        track = self.objects[obj_id]
        if z not in track.anchors:
            raise KeyError(f"object {obj_id} has no anchor on slice {z}")
        del track.anchors[z]
        track._drop_front(z, UP)
        track._drop_front(z, DOWN)
        below, above = track.neighbours(z)
        if below is not None:
            track.stops.pop((below, UP), None)
        if above is not None:
            track.stops.pop((above, DOWN), None)
        if not track.anchors:
            del self.objects[obj_id]

    def mask(self, obj_id: int, z: int) -> np.ndarray | None:
        """Object's mask on slice z (anchor or best propagated), or None."""
        best = self.objects[obj_id].best(z)
        return None if best is None else best.mask

    def object_slices(self, obj_id: int) -> list[int]:
        track = self.objects[obj_id]
        return sorted(set(track.anchors) | set(track.up) | set(track.down))

    def object_volume(self, obj_id: int) -> np.ndarray:
        """``(n_slices, rows, cols)`` bool volume of one object (allocates the full volume)."""
        vol = np.zeros((self.n_slices, *self.slice_shape), bool)
        for z in self.object_slices(obj_id):
            vol[z] = self.mask(obj_id, z)
        return vol

    def stop_reasons(self, obj_id: int) -> dict[tuple[int, int], tuple[int, StopReason]]:
        """(anchor_z, direction) -> (z, reason) for each completed front of the object."""
        return dict(self.objects[obj_id].stops)


def describe_stops(state: PropagationState, obj_id: int) -> str:
    """One line for the user: the object's slice extent and why each front stopped."""
    zs = state.object_slices(obj_id)
    parts = [f"object {obj_id}: slices {zs[0]}-{zs[-1]}" if zs else f"object {obj_id}: empty"]
    for (a, d), (z, reason) in sorted(state.stop_reasons(obj_id).items()):
        where = "up" if d == UP else "down"
        parts.append(f"{where} from {a} stopped at {z} ({reason.value})")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- prompts


def mask_to_box(mask: np.ndarray, margin: float = 0.1, margin_px: float = 2.0) -> np.ndarray:
    """XYXY box ``(4,)`` float around a ``(rows, cols)`` mask, enlarged and clipped."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("cannot derive a box from an empty mask")
    x0, x1, y0, y1 = cols[0], cols[-1], rows[0], rows[-1]
    mx = margin * (x1 - x0 + 1) + margin_px
    my = margin * (y1 - y0 + 1) + margin_px
    h, w = mask.shape
    return np.array(
        [max(x0 - mx, 0), max(y0 - my, 0), min(x1 + mx, w - 1), min(y1 + my, h - 1)],
        dtype=np.float64,
    )


def interior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """``(k, 2)`` (x, y) points, k <= n: the most interior pixels, spread apart."""
    if n <= 0 or not mask.any():
        return np.zeros((0, 2))
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    pts = []
    score = dist.copy()
    yy, xx = np.indices(mask.shape)
    for _ in range(n):
        idx = int(np.argmax(score))
        if score.flat[idx] <= 0:
            break
        y, x = divmod(idx, mask.shape[1])
        pts.append((x, y))
        # Favour interior pixels far from the points already chosen.
        score = np.minimum(score, np.hypot(yy - y, xx - x) * (dist > 0))
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)


def mask_to_logits(
    mask: np.ndarray,
    input_size: tuple[int, int],
    img_size: int,
    low_res_size: tuple[int, int],
    scale: float = 8.0,
):
    """A binary ``(rows, cols)`` mask as SAM low-res logits ``(h, w)`` float32 torch.

    The mask goes through the same geometry as the image: resize to ``input_size``
    (longest side = encoder size), pad bottom/right to ``img_size``, downsample to the
    mask-prompt size; values map from [0, 1] to [-scale, +scale].
    """
    import torch
    import torch.nn.functional as F

    m = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    m = F.interpolate(m, size=tuple(input_size), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, img_size - input_size[1], 0, img_size - input_size[0]))
    m = F.interpolate(m, size=tuple(low_res_size), mode="area")
    return ((m[0, 0] * 2 - 1) * scale).float()


# ------------------------------------------------------------------------- engine


@dataclass
class _Front:
    track: ObjectTrack
    anchor_z: int
    direction: int
    prev_mask: np.ndarray
    prev_logits: object  # torch (h, w) or None until derived from the anchor's mask
    z: int  # slice handled next
    active: bool = True
    ref_feature: object = None  # anchor's embedding contrast (C,), False: not measurable
    ref_intensity: float | None = None  # anchor's intensity contrast, nan: not measurable
    anchor_area: int = 0

    @property
    def prev_area(self) -> int:
        return int(self.prev_mask.sum())


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


class _Prefetcher:
    """Computes store embeddings in one background thread, one slice ahead."""

    def __init__(self, store, enabled: bool):
        self.store = store
        self._pool = (
            ThreadPoolExecutor(1, thread_name_prefix="napari-sam-prefetch") if (enabled) else None
        )
        self._pending: dict[int, Future] = {}

    def request(self, z: int | None) -> None:
        if self._pool is None or z is None or z in self._pending or self.store.is_done(z):
            return
        self._pending[z] = self._pool.submit(self.store.get, z)

    def get(self, z: int):
        fut = self._pending.pop(z, None)
        if fut is not None:
            fut.result()  # re-raises encoder errors here, in the caller's thread
        return self.store.get(z)

    def close(self) -> None:
        if self._pool is not None:
            for fut in self._pending.values():
                fut.cancel()
            self._pool.shutdown(wait=True)
            self._pending.clear()


def propagate(
    store,
    predictor,
    state: PropagationState,
    *,
    objects: Iterable[int] | None = None,
    start: int | Iterable[int] | None = None,
    z_range: tuple[int, int] | None = None,
    criteria: StopCriteria | None = None,
    prompts: PromptOptions | None = None,
    prefetch: bool = True,
    redo: bool = False,
    should_cancel: Callable[[], bool] | None = None,
) -> Iterator[PropagationStep]:
    """Propagate the objects of ``state`` from their anchors; yields one step per object/slice.

    store: an :class:`~napari_sam.embeddings.EmbeddingStore` of the stack (slices along its
        axis). predictor: decodes (``set_embedding``, ``predict_torch``, ``transform``); when
        it is the store's own predictor, encoding and decoding take turns instead of
        overlapping. objects: ids to propagate (default all). start: only fronts from these
        anchor slices (default: every front not yet completed; ``redo=True``: all fronts).
        z_range: inclusive ``(first, last)`` slices fronts may enter. should_cancel: polled
        before each slice; when true the generator returns, leaving ``state`` consistent
        (every kept result is a complete, yielded step; unfinished fronts are not marked
        complete and run again next time).

    Yields :class:`PropagationStep` in processing order: first the upward sweep (z
    increasing), then the downward sweep. ``state`` is updated before each yield.
    """
    criteria = criteria or StopCriteria()
    prompts = prompts or PromptOptions()
    if tuple(state.slice_shape) != tuple(store.slice_shape):
        raise ValueError(
            f"state slices are {tuple(state.slice_shape)} but the store's are "
            f"{tuple(store.slice_shape)}; use a PropagationState made for this stack"
        )
    if state.n_slices != store.n_slices:
        raise ValueError(
            f"state has {state.n_slices} slices but the store's stack has {store.n_slices} "
            f"along axis {store.axis}; use a PropagationState made for this stack"
        )
    lo, hi = (0, state.n_slices - 1) if z_range is None else (int(z_range[0]), int(z_range[1]))
    lo, hi = max(lo, 0), min(hi, state.n_slices - 1)
    if lo > hi:
        raise ValueError(f"z_range {z_range} is empty for a stack of {state.n_slices} slices")
    ids = list(state.objects) if objects is None else list(objects)
    for i in ids:
        if i not in state.objects:
            raise KeyError(f"object {i} has no anchor; add one with state.add_anchor()")
    starts = None if start is None else {int(start)} if np.isscalar(start) else set(start)

    sweeps: dict[int, list[_Front]] = {UP: [], DOWN: []}
    for i in ids:
        track = state.objects[i]
        for a, anchor in sorted(track.anchors.items()):
            for d in (UP, DOWN):
                if starts is not None and a not in starts:
                    continue
                if not redo and starts is None and (a, d) in track.stops:
                    continue
                track._drop_front(a, d)
                sweeps[d].append(
                    _Front(
                        track,
                        a,
                        d,
                        anchor.mask,
                        anchor.logits,
                        a + d,
                        anchor_area=int(anchor.mask.sum()),
                    )  # fmt: skip
                )

    shared = predictor is store.predictor
    lock = store._encode_lock if shared else contextlib.nullcontext()
    fetch = _Prefetcher(store, prefetch and not shared)
    ctx = _SweepContext(state, store, predictor, fetch, lock, lo, hi, criteria, prompts)
    try:
        for d, after in ((UP, sweeps[DOWN]), (DOWN, [])):
            cancelled = yield from _sweep(ctx, d, sweeps[d], after, should_cancel)
            if cancelled:
                return
    finally:
        fetch.close()


@dataclass
class _SweepContext:
    state: PropagationState
    store: object
    predictor: object
    fetch: _Prefetcher
    lock: object
    lo: int
    hi: int
    criteria: StopCriteria
    prompts: PromptOptions


def _nearest(zs: Iterable[int], d: int) -> int | None:
    zs = list(zs)
    if not zs:
        return None
    return min(zs) if d == UP else max(zs)


def _sweep(ctx: _SweepContext, d: int, fronts: list[_Front], after: list[_Front],
           should_cancel):  # fmt: skip
    """Run all fronts of direction d, nearest slice first. Returns True if cancelled."""
    lo, hi = ctx.lo, ctx.hi
    active = list(fronts)
    while True:
        # Fronts that end without predicting: outside the range, or at another anchor.
        for f in list(active):
            if not lo <= f.z <= hi:
                reason = StopReason.RANGE
            elif f.z in f.track.anchors:
                reason = StopReason.ANCHOR
            else:
                continue
            active.remove(f)
            f.track.stops[(f.anchor_z, d)] = (f.z, reason)
            yield PropagationStep(f.z, f.track.obj_id, None, float("nan"), reason, d, f.anchor_z)
        if not active:
            return False
        z = _nearest((f.z for f in active), d)
        batch = [f for f in active if f.z == z]
        if should_cancel is not None and should_cancel():
            return True
        # Speculative prefetch of the slice needed next (assuming the batch goes on).
        later = [f.z for f in active if f.z != z]
        if lo <= z + d <= hi and any(z + d not in f.track.anchors for f in batch):
            later.append(z + d)
        nxt = _nearest(later, d)
        if nxt is None:
            nxt = _nearest((f.z for f in after if lo <= f.z <= hi), -d)
        _prepare_references(ctx, batch)
        emb = ctx.fetch.get(z)
        ctx.fetch.request(nxt)
        with ctx.lock:
            results = _decode(ctx.predictor, emb, batch, ctx.prompts)
        features = _feature_contrasts(ctx, emb, batch, [r[2] for r in results])
        need_image = any(f.ref_intensity is not None and np.isfinite(f.ref_intensity)
                         for f in batch)  # fmt: skip
        image = ctx.store.read_slice(z) if need_image else None
        for k, (f, (mask, score, logits)) in enumerate(zip(batch, results, strict=True)):
            track = f.track
            intensity = _relative_intensity(image, mask, f.ref_intensity)
            metrics = StepMetrics(
                area=int(mask.sum()),
                prev_area=f.prev_area,
                iou_prev=_iou(mask, f.prev_mask),
                score=score,
                feature_contrast=features[k],
                intensity_contrast=intensity,
                contrast=ctx.criteria.combine(intensity, features[k]),
                anchor_area=f.anchor_area,
            )
            reason = ctx.criteria.check(metrics)
            if reason is not None:
                active.remove(f)
                track.stops[(f.anchor_z, d)] = (z, reason)
                yield PropagationStep(z, track.obj_id, mask, score, reason, d, f.anchor_z,
                                      metrics=metrics)  # fmt: skip
                continue
            res = SliceResult.from_mask(z, mask, score, f.anchor_z, d)
            track.results(d)[z] = res
            chosen = track.best(z) is res
            f.prev_mask, f.prev_logits, f.z = mask, logits, z + d
            yield PropagationStep(z, track.obj_id, mask, score, None, d, f.anchor_z, chosen,
                                  metrics)  # fmt: skip


def _anchor_logits(f: _Front, emb, predictor, prompts: PromptOptions):
    """The front's starting logits (given with the anchor, or made from its mask)."""
    if f.prev_logits is None:
        model = predictor.model
        f.prev_logits = mask_to_logits(
            f.prev_mask,
            tuple(int(s) for s in emb.input_size),
            int(model.image_encoder.img_size),
            tuple(int(s) for s in model.prompt_encoder.mask_input_size),
            prompts.anchor_logit_scale,
        )
    return f.prev_logits


def _prepare_references(ctx: _SweepContext, batch: list[_Front]) -> None:
    """Measure each new front's anchor once: intensity and/or embedding contrast."""
    crit = ctx.criteria
    for f in batch:
        if crit.needs_intensity and f.ref_intensity is None:
            ref, spread = _intensity_contrast(ctx.store.read_slice(f.anchor_z), f.prev_mask)
            # Objects that do not stand out in brightness on their anchor (effect size below
            # 0.5) are not judged by intensity at all.
            f.ref_intensity = ref if abs(ref) >= 0.5 * spread and ref != 0 else float("nan")
        auto_uses_intensity = crit.contrast == "auto" and np.isfinite(f.ref_intensity or np.nan)
        if crit.needs_features and f.ref_feature is None and not auto_uses_intensity:
            emb = ctx.fetch.get(f.anchor_z)
            logits = _anchor_logits(f, emb, ctx.predictor, ctx.prompts)
            vec, inside = _contrast_vectors(emb, [logits], ctx.predictor.model)
            ok = inside[0] >= 0.5 and vec[0].norm() > 1e-6
            f.ref_feature = vec[0] if ok else False


def _contrast_vectors(emb, logits: list, model, ring: int = 5):
    """Embedding contrast of masks: mean feature inside minus in a ring around each.

    emb.features ``(1, C, h, w)``; logits: low-res ``(h', w')`` per mask (input frame).
    Returns ``(B, C)`` torch and the masks' areas in embedding cells ``(B,)``.
    """
    import torch
    import torch.nn.functional as F

    feats = emb.features[0].float()  # (C, h, w)
    h, w = feats.shape[-2:]
    lg = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in logits]).to(feats.device)
    m = F.adaptive_avg_pool2d((lg > 0).float()[:, None], (h, w))  # (B, 1, h, w) coverage
    # Only cells over the image count (the input frame is padded bottom/right).
    img = float(model.image_encoder.img_size)
    valid = torch.zeros((h, w), device=feats.device)
    vh = int(np.ceil(emb.input_size[0] / img * h))
    vw = int(np.ceil(emb.input_size[1] / img * w))
    valid[:vh, :vw] = 1
    around = (F.max_pool2d(m, ring, 1, ring // 2) - m).clamp(min=0) * valid
    m, around = m[:, 0], around[:, 0]
    inside = m.sum(dim=(1, 2))
    f_in = torch.einsum("bhw,chw->bc", m, feats) / inside.clamp(min=1e-6)[:, None]
    f_out = (
        torch.einsum("bhw,chw->bc", around, feats)
        / around.sum(dim=(1, 2)).clamp(min=1e-6)[:, None]
    )
    return f_in - f_out, inside.cpu().numpy()


def _feature_contrasts(ctx: _SweepContext, emb, batch: list[_Front], logits: list) -> list:
    """Per front: this slice's embedding contrast projected on the anchor's (nan if off)."""
    out = [float("nan")] * len(batch)
    if not any(f.ref_feature is not None and f.ref_feature is not False for f in batch):
        return out
    vec, _ = _contrast_vectors(emb, logits, ctx.predictor.model)
    for k, f in enumerate(batch):
        ref = f.ref_feature
        if ref is not False and ref is not None:
            out[k] = float(vec[k] @ ref / (ref @ ref))
    return out


def _intensity_contrast(image: np.ndarray, mask: np.ndarray, ring: int = 3):
    """(mean intensity inside ``mask`` minus in a ``ring``-pixel band around it, pooled
    standard deviation of the two); nan when either region is empty."""
    from scipy.ndimage import binary_dilation

    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:  # RGB(A): mean over channels
        img = img[..., :3].mean(axis=-1)
    band = binary_dilation(mask, iterations=ring) & ~mask
    if not mask.any() or not band.any():
        return float("nan"), float("nan")
    inside, around = img[mask], img[band]
    spread = np.sqrt((np.nanvar(inside) + np.nanvar(around)) / 2)
    return float(np.nanmean(inside) - np.nanmean(around)), float(spread)


def _relative_intensity(image, mask: np.ndarray, ref: float | None) -> float:
    if image is None or ref is None or not np.isfinite(ref):
        return float("nan")
    return _intensity_contrast(image, mask)[0] / ref


def _decode(predictor, emb, fronts: list[_Front], prompts: PromptOptions):
    """Batched decode of all fronts on one slice: [(mask (H, W) bool, score, logits (h, w))]."""
    import torch

    predictor.set_embedding(emb)
    original_size = tuple(int(s) for s in emb.original_size)
    device = emb.features.device

    boxes = np.stack(
        [mask_to_box(f.prev_mask, prompts.box_margin, prompts.box_margin_px) for f in fronts]
    )
    points, labels = [], []
    for f, box in zip(fronts, boxes, strict=True):
        pos = interior_points(f.prev_mask, prompts.n_positive)
        neg = np.zeros((0, 2))
        if prompts.negatives_from_others:
            others = [
                interior_points(g.prev_mask, 1) for g in fronts if g is not f
            ]  # fmt: skip
            others = [p for p in others if p.size]
            if others:
                cand = np.concatenate(others)
                inside = (
                    (cand[:, 0] >= box[0]) & (cand[:, 0] <= box[2])
                    & (cand[:, 1] >= box[1]) & (cand[:, 1] <= box[3])
                )  # fmt: skip
                neg = cand[inside]
        points.append(np.concatenate([pos, neg]))
        labels.append(np.r_[np.ones(len(pos)), np.zeros(len(neg))])
    n_pts = max(len(p) for p in points)

    with torch.inference_mode():
        boxes_t = None
        if prompts.box:
            boxes_t = torch.as_tensor(
                predictor.transform.apply_boxes(boxes, original_size), dtype=torch.float32,
                device=device,
            )  # fmt: skip
        coords_t = labels_t = None
        if n_pts:
            coords = np.zeros((len(fronts), n_pts, 2))
            lab = -np.ones((len(fronts), n_pts))  # -1: padding ("not a point")
            for i, (p, q) in enumerate(zip(points, labels, strict=True)):
                coords[i, : len(p)], lab[i, : len(q)] = p, q
            coords = predictor.transform.apply_coords(coords, original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float32, device=device)
            labels_t = torch.as_tensor(lab, dtype=torch.int64, device=device)
        mask_in = None
        if prompts.mask_prompt:
            logits = []
            for f in fronts:
                _anchor_logits(f, emb, predictor, prompts)
                logits.append(torch.as_tensor(f.prev_logits, dtype=torch.float32))
            mask_in = torch.stack(logits)[:, None].to(device)  # (B, 1, h, w)
            if prompts.mask_prompt_scale != 1.0:
                mask_in = mask_in * prompts.mask_prompt_scale
        masks, iou, low = predictor.predict_torch(
            coords_t, labels_t, boxes=boxes_t, mask_input=mask_in,
            multimask_output=prompts.multimask,
        )  # fmt: skip
        # masks (B, C, H, W) bool; iou (B, C); low (B, C, h, w)
        pick = iou.argmax(dim=1) if prompts.multimask else torch.zeros(len(fronts), dtype=int)
        out = []
        for i, k in enumerate(pick.tolist()):
            out.append(
                (
                    masks[i, k].cpu().numpy().astype(bool),
                    float(iou[i, k]),
                    low[i, k].detach().cpu(),
                )
            )
    return out

"""Interactive annotation session: prompts -> three candidate masks -> committed objects.

An :class:`Annotator` owns everything the interactive 2D workflow needs and nothing of the
GUI (no Qt, no napari): a predictor (see ``docs/architecture.md``: ``set_image``,
``get_embedding``, ``set_embedding``, ``predict``), a per-slice embedding cache, the
current object's prompts on every slice, SAM's three candidates for the current slice, the
selected candidate, and the committed label array with undo/redo.

Coordinates: prompts are napari data coordinates of the current plane, ``(row, col)`` with
pixel centres at integers (see :mod:`napari_sam.slicing` for planes of 3D stacks and
:mod:`napari_sam.prompts`, the only place where they become SAM's ``(x, y)``).

Rules (also in docs/usage.md):

- **Candidates.** Every prompt change asks the decoder for SAM's three candidates (part /
  sub-part / whole) with their predicted IoU. The selected one is the highest predicted
  IoU, unless the user picked one (:meth:`Annotator.select`); a pick sticks until the
  object is committed or cleared, or the slice changes.
- **Refinement.** When a prompt change only *adds* points to the prompts whose candidates
  are on screen (same box, earlier points unchanged), the selected candidate's low-res
  logits go with the new prompts as SAM's dense ``mask_input``, the way SAM's demo
  refines with extra clicks. Moving or deleting a point, or changing the box, predicts
  from the prompts alone.
- **Display size.** On a plane larger than ``display_max_side`` on a side the three
  candidates are computed at a reduced size (blocks of ``k x k`` pixels, see
  :func:`napari_sam.slicing.display_size`): a preview that is cheap to compute and show.
  The commit writes the selected candidate at full resolution, recomputed from its
  low-res logits: exactly the mask an uncapped session commits.
- **Commit** writes the selected candidate into the labels plane of the current slice
  with a new id (``max id + 1``) or a chosen one. Overlap with committed objects follows
  ``overlap``: ``"keep"`` (default) leaves pixels of other objects untouched, the new
  object only takes background pixels; ``"overwrite"`` gives every pixel of the mask to
  the new object. Committing with the id of an existing object adds the mask to it. The
  prompts of the slice are cleared.
- **Undo/redo** covers prompt edits and commits in one history (newest first). A commit
  stores only the pixels it changed (their indices and old values); undoing it restores
  them and brings back the object's prompts. Any new edit clears the redo history.
  Edits made outside the annotator (a propagation run written into the labels) join the
  same history through :meth:`Annotator.push_edit`.
- **Embeddings** are cached per plane in the session; for a 3D stack an attached
  :class:`~napari_sam.embeddings.EmbeddingStore` (:meth:`Annotator.attach_store`) serves
  the planes along its axis instead, so that propagation, a precompute and the session
  share them.

Threads: :meth:`Annotator.compute_embedding` and :meth:`Annotator.run` may run in worker
threads (the encoder and the decoder each sit behind a lock); everything else belongs to
the caller's (GUI) thread. :meth:`Annotator.update` does request, decoding and apply in
one synchronous call for scripts and tests.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial

import numpy as np

from napari_sam.prompts import box_rc_to_xyxy, rc_to_xy
from napari_sam.slicing import (
    SliceKey,
    check_image_shape,
    check_key,
    default_key,
    display_size,
    plane_index,
    plane_shape,
    take_plane,
)

OVERLAP_RULES = ("keep", "overwrite")

#: Default :attr:`Annotator.display_max_side`: candidates of larger planes are computed and
#: shown at a reduced size (docs/performance.md, "Interaction").
DISPLAY_MAX_SIDE = 1024

#: Names of SAM's three multimask outputs, in output order (SAM paper, Sec. 3).
CANDIDATE_NAMES = ("sub-part", "part", "whole")


@dataclass(frozen=True, eq=False)
class Refinement:
    """The dense prompt of a prompt state: a candidate of an earlier prediction."""

    parent: Prompts  # the prompts whose prediction gave the logits
    candidate: int  # which of its three candidates
    logits: np.ndarray  # (1, h, w) float32 low-res logits, SAM's ``mask_input``


@dataclass(eq=False)
class Prompts:
    """The prompts of one object on one slice (immutable by convention).

    points: ``(N, 2) float64 (row, col)``; labels: ``(N,) int32``, 1 positive, 0 negative;
    box: ``(4,) float64 (r0, c0, r1, c1)`` with ``r0 <= r1``, ``c0 <= c1``, or ``None``.
    ``refine`` is the dense prompt, resolved on the first prediction (see module doc).
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None = None
    refine: Refinement | None = None
    refine_pending: bool = False

    @classmethod
    def empty(cls) -> Prompts:
        return cls(np.zeros((0, 2)), np.zeros((0,), dtype=np.int32), None)

    @property
    def is_empty(self) -> bool:
        return len(self.points) == 0 and self.box is None

    def same_prompts(self, other: Prompts) -> bool:
        """Same points, labels and box (ignores the dense prompt)."""
        return (
            self.points.shape == other.points.shape
            and np.array_equal(self.points, other.points)
            and np.array_equal(self.labels, other.labels)
            and _same_box(self.box, other.box)
        )

    def extends(self, other: Prompts) -> bool:
        """True if these prompts are ``other`` plus extra points (same box)."""
        n = len(other.points)
        return (
            not other.is_empty
            and len(self.points) > n
            and _same_box(self.box, other.box)
            and np.array_equal(self.points[:n], other.points)
            and np.array_equal(self.labels[:n], other.labels)
        )


def _same_box(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.array_equal(a, b))


@dataclass(frozen=True, eq=False)
class Candidates:
    """SAM's three candidates for one prompt state on one slice.

    masks: ``(3, H, W) bool``, or ``(3, h, w)`` at the plane's display size (see
    ``scale``); ious: ``(3,) float32`` predicted IoU; logits: ``(3, 4h', 4w') float32``
    low-res logits (``256 x 256`` for SAM). ``scale``: plane pixels per mask pixel
    ``(H / h, W / w)``, ``(1.0, 1.0)`` at full resolution.
    """

    key: SliceKey
    version: int
    prompts: Prompts
    masks: np.ndarray
    ious: np.ndarray
    logits: np.ndarray
    scale: tuple[float, float] = (1.0, 1.0)

    @property
    def reduced(self) -> bool:
        """The masks are smaller than the plane (see :attr:`Annotator.display_max_side`)."""
        return self.scale != (1.0, 1.0)


@dataclass(frozen=True, eq=False)
class PredictionRequest:
    """Everything one decoder call needs, frozen so that it can go to a worker thread.

    points_xy: ``(N, 2) (x, y)`` or None; point_labels ``(N,)``; box_xyxy ``(4,)`` or None;
    mask_input ``(1, h, w)`` or None; mask_size: ``(h, w)`` of the masks, None for the
    plane's size; clicked_parts_only: see :attr:`Annotator.clicked_parts_only`.
    """

    key: SliceKey
    version: int
    prompts: Prompts
    embedding: object
    points_xy: np.ndarray | None
    point_labels: np.ndarray | None
    box_xyxy: np.ndarray | None
    mask_input: np.ndarray | None
    mask_size: tuple[int, int] | None = None
    clicked_parts_only: bool = False


@dataclass(frozen=True)
class PromptStep:
    """One prediction of a refinement chain, for replay.

    ``uses_previous``: the previous step's ``candidate`` logits were the dense prompt.
    points ``(N, 2) (row, col)``; box ``(r0, c0, r1, c1)`` or None.
    """

    points: np.ndarray
    labels: np.ndarray
    box: np.ndarray | None
    candidate: int
    uses_previous: bool


@dataclass
class ObjectRecord:
    """What produced a committed object: enough to save, show and replay it.

    ``slice_key``: the plane (see :mod:`napari_sam.slicing`); ``points`` ``(N, 2)
    (row, col)`` in-plane data coordinates, ``labels`` 1/0, ``box`` ``(r0, c0, r1, c1)``;
    ``steps``: the refinement chain, oldest first, the last one being the final prompts.
    """

    label_id: int
    slice_key: tuple
    points: np.ndarray
    point_labels: np.ndarray
    box: np.ndarray | None
    candidate: int
    predicted_iou: float
    model: str
    overlap: str
    n_pixels: int
    steps: list[PromptStep] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    uid: str = field(default_factory=lambda: uuid.uuid4().hex)  # identity across processes


@dataclass(frozen=True, eq=False)
class LabelChange:
    """One change of the committed labels: a commit, or the undo / redo of one.

    ``box``: one slice per labels axis around every pixel that changed (on one plane);
    ``values``: a copy of ``labels[box]`` after the change; ``added`` / ``removed``: the
    object records the change made or took away. What autosave writes (see
    :func:`autosave_change`).
    """

    kind: str  # "commit", "undo" or "redo"
    box: tuple[slice, ...]
    values: np.ndarray
    added: tuple[ObjectRecord, ...] = ()
    removed: tuple[ObjectRecord, ...] = ()

    @property
    def offset(self) -> tuple[int, ...]:
        return tuple(s.start for s in self.box)


@dataclass(eq=False)
class _PromptEdit:
    key: SliceKey
    before: Prompts
    after: Prompts
    text: str


@dataclass(eq=False)
class _External:
    """An edit made outside the annotator (e.g. propagation into the labels), kept in the
    same undo history: ``undo()``/``redo()`` revert/re-apply it as a whole."""

    key: SliceKey | None
    undo: object  # callable
    redo: object  # callable
    text: str
    box: tuple[slice, ...] | None = None  # the labels it changes (for autosave)


@dataclass(eq=False)
class _Commit:
    key: SliceKey
    rows: np.ndarray
    cols: np.ndarray
    old: np.ndarray
    label_id: int
    prompts: Prompts
    choice: int | None
    next_id_before: int
    next_id_after: int
    record: ObjectRecord
    text: str = ""


def _nbytes(obj) -> int:
    """Rough size of an embedding object: the arrays/tensors it holds."""
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return int(obj.element_size() * obj.numel())
    values = []
    if is_dataclass(obj):
        values = [getattr(obj, f.name) for f in fields(obj)]
    elif hasattr(obj, "__dict__"):
        values = list(vars(obj).values())
    elif isinstance(obj, tuple | list):
        values = list(obj)
    total = 0
    for v in values:
        if hasattr(v, "nbytes") or hasattr(v, "element_size") or isinstance(v, tuple | list):
            total += _nbytes(v)
    return total


class Annotator:
    """An annotation session on one image (see the module docstring for the rules).

    Parameters
    ----------
    predictor
        Decodes prompts (``set_embedding``, ``predict``); also encodes unless ``encoder``
        is given.
    image
        Array-like (numpy, dask, zarr), spatial shape ``(H, W)`` or ``(Z, Y, X)``, plus a
        trailing channel axis of 3 or 4 if ``rgb``. Only the annotated plane is read.
    rgb
        The last axis holds RGB(A) channels (alpha is dropped).
    encoder
        A second predictor on the same model for computing embeddings in a worker thread
        while ``predictor`` decodes on another. Defaults to ``predictor``.
    labels
        Committed labels, integer array of the spatial shape, written in place (share it
        with a napari Labels layer). A ``uint32`` array of zeros by default.
    model_name
        Stored in each :class:`ObjectRecord`.
    cache_bytes
        Budget of the in-memory embedding cache (least recently used slices go first).
    overlap
        Default overlap rule for :meth:`commit`: ``"keep"`` or ``"overwrite"``.
    refine
        Use the previous candidate's logits as a dense prompt when points are added.
    display_max_side
        Candidates of planes larger than this on a side are computed at a reduced size
        (:func:`napari_sam.slicing.display_size`); commits stay at full resolution. None
        or 0: always full resolution. Needs a predictor with ``masks_from_logits``
        (:class:`napari_sam.predictor.SamPredictor`); ignored otherwise.
    clicked_parts_only
        Candidates keep only the parts that a positive click touches (SAM often adds blobs
        on look-alike objects elsewhere); see ``SamPredictor.predict``. Box-only and
        mask prompts are not affected.
    """

    def __init__(
        self,
        predictor,
        image,
        *,
        rgb: bool = False,
        encoder=None,
        labels: np.ndarray | None = None,
        model_name: str = "",
        cache_bytes: int = 512 * 2**20,
        overlap: str = "keep",
        refine: bool = True,
        display_max_side: int | None = DISPLAY_MAX_SIDE,
        clicked_parts_only: bool = True,
    ):
        self.shape = check_image_shape(np.shape(image), rgb)
        self.image = image
        self.rgb = rgb
        self.predictor = predictor
        self.encoder = predictor if encoder is None else encoder
        self.model_name = model_name
        self.cache_bytes = int(cache_bytes)
        self.refine = refine
        self.overlap = _check_overlap(overlap)
        if display_max_side is not None and (
            isinstance(display_max_side, bool)
            or not isinstance(display_max_side, int | np.integer)
            or display_max_side < 0
        ):
            raise ValueError(
                f"display_max_side must be a positive number of pixels, 0 or None (no "
                f"limit); got {display_max_side!r}"
            )
        #: longest side of the candidate masks (see the module docstring); None: no limit
        self.display_max_side = display_max_side
        if labels is None:
            labels = np.zeros(self.shape, dtype=np.uint32)
        else:
            if tuple(labels.shape) != self.shape:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} does not match the image's spatial "
                    f"shape {self.shape}; give a labels array of the image's shape"
                )
            if not np.issubdtype(labels.dtype, np.integer):
                raise TypeError(f"labels must have an integer dtype, not {labels.dtype}")
        self.labels = labels
        self._next_id = int(labels.max()) + 1 if labels.size else 1
        self._key: SliceKey = default_key(self.shape)
        self._prompts: dict[SliceKey, Prompts] = {}
        self._candidates: Candidates | None = None
        self._choice: int | None = None
        self._version = 0
        self._clicked_parts_only = bool(clicked_parts_only)
        self._undo: list = []
        self._redo: list = []
        self.records: list[ObjectRecord] = []
        self._cache: OrderedDict[SliceKey, tuple[object, int]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._decode_lock = threading.Lock()
        self._decoder_key: SliceKey | None = None
        self._stores: dict[int, object] = {}
        #: number of encoder runs (embeddings computed) by this session
        self.encoder_runs = 0
        #: the labels change of the latest commit / undo / redo (None after a prompt edit)
        self.last_change: LabelChange | None = None

    # ------------------------------------------------------------------ slices
    @property
    def key(self) -> SliceKey:
        """The current plane (see :mod:`napari_sam.slicing`)."""
        return self._key

    @property
    def plane_shape(self) -> tuple[int, int]:
        return plane_shape(self.shape, self._key)

    def display_size(self, key: SliceKey | None = None) -> tuple[int, int]:
        """``(h, w)`` of the candidate masks of plane ``key`` (default: the current one):
        the plane's size, or less under :attr:`display_max_side`."""
        size = plane_shape(self.shape, self._key if key is None else key)
        if not hasattr(self.predictor, "masks_from_logits"):
            return size
        return display_size(size, self.display_max_side)

    def set_slice(self, key: SliceKey) -> bool:
        """Make ``key`` the current plane; returns True if it changed."""
        key = check_key(key, self.shape)
        if key == self._key:
            return False
        self._key = key
        self._candidates = None
        self._choice = None
        self._version += 1
        return True

    # -------------------------------------------------------------- embeddings
    def attach_store(self, store) -> None:
        """Serve the embeddings of planes along ``store.axis`` from an EmbeddingStore.

        The store (:class:`napari_sam.embeddings.EmbeddingStore` of this image, its
        predictor on the same model) then replaces this session's own cache for those
        planes, so that a slice embedded by propagation or a precompute is ready here
        and vice versa. Only for 3D stacks; one store per slice axis.
        """
        if len(self.shape) != 3:
            raise ValueError("embedding stores serve 3D stacks; this image is 2D")
        if tuple(store.shape[:3]) != self.shape:
            raise ValueError(
                f"the store's stack has shape {tuple(store.shape[:3])}, the image "
                f"{self.shape}; make the store from this image"
            )
        self._stores[int(store.axis)] = store

    def close_stores(self) -> None:
        """Close the attached stores (``EmbeddingStore.close``) when the session ends: the
        disk cache may then delete them to stay under its size cap. Do not use them after."""
        for store in list(self._stores.values()):
            close = getattr(store, "close", None)
            if callable(close):
                close()

    def store_for(self, key: SliceKey | None = None):
        """``(store, z)`` serving plane ``key`` (default: current), or ``(None, None)``."""
        key = self._key if key is None else key
        if not self._stores or len(key) != 3:
            return None, None
        sliced = [i for i, k in enumerate(key) if k is not None]
        store = self._stores.get(sliced[0]) if len(sliced) == 1 else None
        return (store, int(key[sliced[0]])) if store is not None else (None, None)

    def has_embedding(self, key: SliceKey | None = None) -> bool:
        key = self._key if key is None else key
        store, z = self.store_for(key)
        if store is not None:
            return store.is_done(z)
        with self._cache_lock:
            return key in self._cache

    def cached_slices(self) -> list[SliceKey]:
        with self._cache_lock:
            return list(self._cache)

    def _cached(self, key):
        store, z = self.store_for(key)
        if store is not None:
            return store.get(z) if store.is_done(z) else None
        with self._cache_lock:
            item = self._cache.get(key)
            if item is None:
                return None
            self._cache.move_to_end(key)
            return item[0]

    def compute_embedding(self, key: SliceKey | None = None):
        """Compute (or fetch from the cache) the embedding of a plane. Thread-safe.

        Reads only that plane of the image; the encoder runs at most once per plane while
        the plane stays in the cache (or in an attached store, see :meth:`attach_store`).
        """
        key = check_key(self._key if key is None else key, self.shape)
        store, z = self.store_for(key)
        if store is not None:
            shared = store.predictor is self.predictor
            with self._decode_lock if shared else contextlib.nullcontext():
                runs = store.encoder_runs
                emb = store.get(z)
                if store.encoder_runs != runs:
                    self.encoder_runs += 1
                    if shared:  # the store's encoder replaced the decoder's embedding
                        self._decoder_key = None
            return emb
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self._encode_lock:
            cached = self._cached(key)  # computed by another thread meanwhile
            if cached is not None:
                return cached
            plane = take_plane(self.image, key, self.rgb)
            if self.rgb and plane.shape[-1] == 4:
                plane = plane[..., :3]
            if self.encoder is self.predictor:
                with self._decode_lock:
                    self.encoder.set_image(plane)
                    emb = self.encoder.get_embedding()
                    self._decoder_key = key
            else:
                self.encoder.set_image(plane)
                emb = self.encoder.get_embedding()
            self.encoder_runs += 1
        self._store(key, emb)
        return emb

    def _store(self, key, emb):
        size = _nbytes(emb)
        with self._cache_lock:
            self._cache[key] = (emb, size)
            self._cache.move_to_end(key)
            total = sum(s for _, s in self._cache.values())
            while total > self.cache_bytes and len(self._cache) > 1:
                _, (_, s) = self._cache.popitem(last=False)
                total -= s

    def clear_cache(self) -> None:
        """Forget all embeddings (e.g. after the image data changed)."""
        with self._cache_lock:
            self._cache.clear()
        for store in self._stores.values():
            store.clear_memory()
        with self._decode_lock:
            self._decoder_key = None
        self._candidates = None
        self._version += 1

    # ----------------------------------------------------------------- prompts
    @property
    def prompts(self) -> Prompts:
        """Prompts of the current object on the current plane."""
        return self._prompts.get(self._key) or Prompts.empty()

    def prompts_on(self, key: SliceKey) -> Prompts:
        return self._prompts.get(tuple(key)) or Prompts.empty()

    def all_prompts(self) -> dict[SliceKey, Prompts]:
        """Non-empty prompts of every plane."""
        return {k: p for k, p in self._prompts.items() if not p.is_empty}

    def _validate(self, points, labels, box, key=None) -> Prompts:
        h, w = plane_shape(self.shape, self._key if key is None else key)
        pts = np.asarray(points if points is not None else np.zeros((0, 2)), dtype=np.float64)
        pts = pts.reshape(-1, 2) if pts.size == 0 else pts
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"points must have shape (N, 2) in (row, col); got {pts.shape}")
        if not np.all(np.isfinite(pts)):
            raise ValueError("points contain NaN or infinite coordinates")
        lab = np.ones(len(pts), dtype=np.int32) if labels is None else np.asarray(labels)
        lab = lab.astype(np.int32).reshape(-1)
        if len(lab) != len(pts):
            raise ValueError(f"got {len(pts)} points but {len(lab)} point labels")
        if not np.isin(lab, (0, 1)).all():
            raise ValueError("point labels must be 1 (positive) or 0 (negative)")
        outside = (
            (pts[:, 0] < -0.5) | (pts[:, 0] > h - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > w - 0.5)
        )
        if outside.any():
            r, c = pts[np.argmax(outside)]
            raise ValueError(
                f"point (row {r:.1f}, col {c:.1f}) is outside the image plane ({h} x {w}); "
                "place points on the image"
            )
        bx = None
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(-1)
            if b.shape != (4,) or not np.all(np.isfinite(b)):
                raise ValueError(f"box must be 4 finite numbers (r0, c0, r1, c1); got {box!r}")
            r0, r1 = sorted(b[[0, 2]])
            c0, c1 = sorted(b[[1, 3]])
            if r1 <= -0.5 or r0 >= h - 0.5 or c1 <= -0.5 or c0 >= w - 0.5:
                raise ValueError(
                    f"box ({r0:.1f}, {c0:.1f})-({r1:.1f}, {c1:.1f}) lies outside the image "
                    f"plane ({h} x {w}); draw the box on the image"
                )
            r0, r1 = np.clip([r0, r1], -0.5, h - 0.5)
            c0, c1 = np.clip([c0, c1], -0.5, w - 0.5)
            if r1 - r0 < 1e-6 or c1 - c0 < 1e-6:
                raise ValueError("the box has zero area; drag a rectangle around the object")
            bx = np.array([r0, c0, r1, c1])
        return Prompts(pts.copy(), lab, bx)

    def set_prompts(self, points=None, labels=None, box=None, *, text="edit prompts") -> bool:
        """Replace the current plane's prompts; returns True if they changed.

        points ``(N, 2) (row, col)``, labels ``(N,)`` 1/0 (default all positive), box
        ``(r0, c0, r1, c1)`` or None. Raises ``ValueError`` for points outside the plane,
        a box of zero area or outside the plane (partly outside is clipped).
        """
        new = self._validate(points, labels, box)
        old = self.prompts
        if new.same_prompts(old):
            return False
        new.refine_pending = self.refine and new.extends(old)
        self._apply_prompts(self._key, new)
        self._push(_PromptEdit(self._key, old, new, text))
        return True

    def restore_prompts(self, key: SliceKey, points, labels=None, box=None) -> None:
        """Set a plane's prompts without an undo entry (e.g. carried over to a new model)."""
        key = check_key(key, self.shape)
        self._apply_prompts(key, self._validate(points, labels, box, key))

    def add_point(self, rc, positive: bool = True) -> None:
        """Add one point ``(row, col)``; positive (1) or negative (0)."""
        p = self.prompts
        pts = np.vstack([p.points, np.asarray(rc, dtype=np.float64).reshape(1, 2)])
        labels = np.append(p.labels, 1 if positive else 0)
        self.set_prompts(pts, labels, p.box, text="add point")

    def set_box(self, box) -> None:
        """Set (or with None remove) the box ``(r0, c0, r1, c1)``."""
        p = self.prompts
        self.set_prompts(p.points, p.labels, box, text="set box")

    def clear(self) -> bool:
        """Remove the current plane's prompts (undoable); returns True if any."""
        if self.prompts.is_empty:
            return False
        old = self.prompts
        new = Prompts.empty()
        self._apply_prompts(self._key, new)
        self._push(_PromptEdit(self._key, old, new, "clear prompts"))
        return True

    def _apply_prompts(self, key, prompts: Prompts):
        self._prompts[key] = prompts
        if key == self._key:
            self._version += 1
            if prompts.is_empty:
                self._candidates = None
                self._choice = None

    # -------------------------------------------------------------- candidates
    @property
    def clicked_parts_only(self) -> bool:
        """Candidates keep only the mask parts a positive click touches (default True)."""
        return self._clicked_parts_only

    @clicked_parts_only.setter
    def clicked_parts_only(self, value: bool) -> None:
        if bool(value) != self._clicked_parts_only:
            self._clicked_parts_only = bool(value)
            self._version += 1  # the candidates are stale

    @property
    def version(self) -> int:
        """Increases with every change that makes the candidates stale."""
        return self._version

    @property
    def candidates(self) -> Candidates | None:
        """The latest candidates of the current plane (possibly for older prompts)."""
        c = self._candidates
        return c if c is not None and c.key == self._key else None

    @property
    def up_to_date(self) -> bool:
        """True if the candidates match the current prompts (or there are no prompts)."""
        if self.prompts.is_empty:
            return True
        c = self.candidates
        return c is not None and c.version == self._version

    @property
    def selected(self) -> int | None:
        """Index of the selected candidate (user pick, else highest predicted IoU)."""
        c = self.candidates
        if c is None:
            return None
        if self._choice is not None:
            return self._choice
        return int(np.argmax(c.ious))

    @property
    def user_choice(self) -> int | None:
        return self._choice

    def select(self, index: int | None) -> None:
        """Pick candidate 0, 1 or 2 (None: back to the highest predicted IoU)."""
        if index is not None and index not in (0, 1, 2):
            raise ValueError(f"candidate index must be 0, 1 or 2, not {index!r}")
        self._choice = index

    def prediction_request(self) -> PredictionRequest | None:
        """The decoder call for the current prompts, or None if nothing is to be done.

        None when the candidates are up to date, there are no prompts (the candidates are
        then cleared), or the plane's embedding is not computed yet (see
        :attr:`waiting_for_embedding`).
        """
        prompts = self.prompts
        if prompts.is_empty:
            self._candidates = None
            return None
        if self.up_to_date:
            return None
        emb = self._cached(self._key)
        if emb is None:
            return None
        self._resolve_refinement(prompts)
        pts = lab = None
        if len(prompts.points):
            pts = rc_to_xy(prompts.points)
            lab = prompts.labels.copy()
        box = box_rc_to_xyxy(prompts.box.reshape(2, 2)) if prompts.box is not None else None
        mask = prompts.refine.logits if prompts.refine is not None else None
        size = self.display_size()
        size = None if size == self.plane_shape else size
        return PredictionRequest(
            self._key,
            self._version,
            prompts,
            emb,
            pts,
            lab,
            box,
            mask,
            size,
            self._clicked_parts_only,
        )

    @property
    def waiting_for_embedding(self) -> bool:
        """Prompts wait for the current plane's embedding."""
        return not self.prompts.is_empty and not self.has_embedding()

    def _resolve_refinement(self, prompts: Prompts):
        if not prompts.refine_pending:
            return
        prompts.refine_pending = False
        c = self.candidates
        if c is None or not (prompts.extends(c.prompts)):
            return
        sel = self.selected
        prompts.refine = Refinement(c.prompts, sel, c.logits[sel][None].copy())

    def run(self, request: PredictionRequest) -> Candidates:
        """Run the decoder for a request. Thread-safe; does not change the session."""
        with self._decode_lock:
            if self._decoder_key != request.key or self.predictor is self.encoder:
                # with a shared predictor the encoder may have replaced the embedding
                self.predictor.set_embedding(request.embedding)
                self._decoder_key = request.key
            reduced = {} if request.mask_size is None else {"mask_size": request.mask_size}
            labels = request.point_labels
            if request.clicked_parts_only and labels is not None and (labels == 1).any():
                reduced["clicked_parts_only"] = True
            masks, ious, logits = self.predictor.predict(
                point_coords=request.points_xy,
                point_labels=request.point_labels,
                box=request.box_xyxy,
                mask_input=request.mask_input,
                multimask_output=True,
                **reduced,
            )
        masks = np.asarray(masks).astype(bool, copy=False)
        (H, W), (h, w) = plane_shape(self.shape, request.key), masks.shape[-2:]
        return Candidates(
            request.key,
            request.version,
            request.prompts,
            masks,
            np.asarray(ious, dtype=np.float32),
            np.asarray(logits, dtype=np.float32),
            (H / h, W / w),
        )

    def apply(self, candidates: Candidates) -> bool:
        """Show decoder results if they belong to the current plane; True if applied.

        Results for older prompts of the current plane are shown too (the newest request
        replaces them), results for another plane or image are dropped.
        """
        if candidates.key != self._key or self.prompts.is_empty:
            return False
        cur = self.candidates
        if cur is not None and cur.version > candidates.version:
            return False
        self._candidates = candidates
        return True

    def update(self) -> Candidates | None:
        """Synchronous: compute the embedding if needed, decode, apply; the candidates."""
        if self.prompts.is_empty:
            self._candidates = None
            return None
        if not self.up_to_date:
            self.compute_embedding()
            req = self.prediction_request()
            if req is not None:
                self.apply(self.run(req))
        return self.candidates

    # ------------------------------------------------------------------ commit
    @property
    def next_id(self) -> int:
        return self._next_id

    def candidate_mask(self, index: int | None = None) -> np.ndarray | None:
        """``(H, W) bool``: candidate ``index`` (default: the selected one) of the current
        candidates at full resolution (recomputed from its low-res logits when the
        candidates are at a reduced size); None without candidates."""
        cands = self.candidates
        if cands is None:
            return None
        index = self.selected if index is None else int(index)
        if not cands.reduced:
            return cands.masks[index]
        return np.asarray(
            self.predictor.masks_from_logits(
                cands.logits[index], original_size=plane_shape(self.shape, cands.key)
            ),
            dtype=bool,
        )

    def full_mask_job(self):
        """For committing reduced candidates off the UI thread: ``(token, work)``.

        ``work()`` (torch, no state change; may run in a worker thread) returns the
        selected candidate at full resolution; pass it to :meth:`commit` as ``mask`` with
        ``token``, which refuses it if the candidates or the selection changed meanwhile.
        None when the candidates are missing, out of date or already at full resolution.
        """
        cands = self.candidates
        if cands is None or not cands.reduced or not self.up_to_date:
            return None
        sel = self.selected
        token = (cands, sel)
        return token, partial(self.candidate_mask, sel)

    def commit(
        self,
        label_id: int | None = None,
        overlap: str | None = None,
        *,
        mask: np.ndarray | None = None,
        token=None,
    ) -> ObjectRecord:
        """Write the selected candidate into :attr:`labels`; see the module docstring.

        Brings the candidates up to date first (a synchronous decoder call if a worker has
        not delivered yet). Raises ``ValueError`` when there is nothing to commit.
        ``mask``/``token``: the full-resolution mask from :meth:`full_mask_job` (computed
        elsewhere); ``ValueError`` if it no longer belongs to the selected candidate.
        """
        overlap = _check_overlap(overlap or self.overlap)
        if self.prompts.is_empty:
            raise ValueError("nothing to commit: add a point or draw a box first")
        if self.waiting_for_embedding:
            raise ValueError(
                "the embedding of this slice is still being computed; commit when it is ready"
            )
        if mask is not None and (
            token is None or token[0] is not self._candidates or token[1] != self.selected
        ):
            raise ValueError(
                "the candidates or the selection changed while the mask was computed; commit again"
            )
        cands = self.update()
        sel = self.selected
        new_id = self._next_id if label_id is None else _check_id(label_id, self.labels.dtype)
        if label_id is None:
            _check_id(new_id, self.labels.dtype)
        if mask is None:
            mask = self.candidate_mask(sel)
        else:
            mask = np.asarray(mask, dtype=bool)
            want = plane_shape(self.shape, self._key)
            if mask.shape != tuple(want):
                raise ValueError(f"mask has shape {mask.shape}, the plane is {tuple(want)}")
        view = self.labels[plane_index(self._key)]
        target = mask & (view != new_id)
        if overlap == "keep":
            target &= view == 0
        rows, cols = np.nonzero(target)
        if len(rows) == 0 and not (mask & (view == new_id)).any():
            raise ValueError(
                "the selected candidate is empty, or lies entirely on committed objects "
                "(overlap rule 'keep'): nothing committed. Pick another candidate, or "
                "commit with overlap 'overwrite'."
            )
        old = view[rows, cols].copy()
        view[rows, cols] = new_id
        prompts = self.prompts
        record = ObjectRecord(
            label_id=int(new_id),
            slice_key=self._key,
            points=prompts.points.copy(),
            point_labels=prompts.labels.copy(),
            box=None if prompts.box is None else prompts.box.copy(),
            candidate=int(sel),
            predicted_iou=float(cands.ious[sel]),
            model=self.model_name,
            overlap=overlap,
            n_pixels=int(mask.sum()),
            steps=_chain(prompts, sel),
        )
        before = self._next_id
        self._next_id = max(self._next_id, int(new_id) + 1)
        action = _Commit(
            self._key,
            rows.astype(np.int32),
            cols.astype(np.int32),
            old,
            int(new_id),
            prompts,
            self._choice,
            before,
            self._next_id,
            record,
            f"commit object {new_id}",
        )
        self.records.append(record)
        self._prompts[self._key] = Prompts.empty()
        self._candidates = None
        self._choice = None
        self._version += 1
        self._push(action)
        self.last_change = self._change("commit", action, added=(record,))
        return record

    def replay(self, record: ObjectRecord) -> np.ndarray:
        """Re-run a record's prompt chain on its slice; the ``(H, W) bool`` mask it gives.

        With the same model and :attr:`clicked_parts_only` setting this reproduces the
        committed candidate.
        """
        logits = None
        masks = None
        for step in record.steps:
            embedding = self.compute_embedding(record.slice_key)
            req = PredictionRequest(
                tuple(record.slice_key),
                -1,
                Prompts(step.points, step.labels, step.box),
                embedding,
                rc_to_xy(step.points) if len(step.points) else None,
                step.labels if len(step.points) else None,
                box_rc_to_xyxy(step.box.reshape(2, 2)) if step.box is not None else None,
                logits if step.uses_previous else None,
                clicked_parts_only=self._clicked_parts_only,
            )
            out = self.run(req)
            masks = out.masks
            logits = out.logits[step.candidate][None]
        if masks is None:
            raise ValueError("the record has no prompts to replay")
        return masks[record.steps[-1].candidate]

    def last_commit_on(self, key: SliceKey | None = None) -> ObjectRecord | None:
        """The newest (not undone) commit on plane ``key`` (default: the current one)."""
        key = tuple(self._key if key is None else key)
        return next((r for r in reversed(self.records) if tuple(r.slice_key) == key), None)

    def committed_slices(self, label_id: int, axis: int) -> list[int]:
        """Indices along ``axis`` of the planes where object ``label_id`` was committed
        (not undone), sorted: the user's anchor slices for propagating that object."""
        out = set()
        for r in self.records:
            key = tuple(r.slice_key)
            on_axis = len(key) > axis and key[axis] is not None
            if r.label_id == label_id and on_axis and sum(k is not None for k in key) == 1:
                out.add(int(key[axis]))
        return sorted(out)

    # ------------------------------------------------------------- undo / redo
    def push_edit(
        self, undo, redo, text: str, key: SliceKey | None = None, box: tuple | None = None
    ) -> None:
        """Record an edit made outside the annotator (e.g. a propagation run written into
        :attr:`labels`) so that :meth:`undo`/:meth:`redo` revert and re-apply it in
        order with prompt edits and commits. ``undo()``/``redo()`` act on the whole edit.
        ``box`` (one slice per labels axis around what the edit changes) makes the edit,
        its undo and its redo a :attr:`last_change`, so autosave records them."""
        if box is not None:
            self.external_change(box)
        self._push(_External(key, undo, redo, text, box))

    def external_change(self, box: tuple, kind: str = "edit") -> LabelChange:
        """Set :attr:`last_change` to the labels in ``box`` as they are now (after an edit
        made outside the annotator); returns it."""
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, self.labels.shape, strict=True))
        self.last_change = LabelChange(kind, box, np.array(self.labels[box]))
        return self.last_change

    def _push(self, action):
        self._undo.append(action)
        self._redo.clear()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> str | None:
        """Undo the latest prompt edit or commit; its description, or None if none."""
        if not self._undo:
            return None
        action = self._undo.pop()
        self.last_change = None
        if isinstance(action, _External):
            action.undo()
            if action.box is not None:
                self.external_change(action.box, "undo")
        elif isinstance(action, _PromptEdit):
            self._apply_prompts(action.key, action.before)
        else:
            view = self.labels[plane_index(action.key)]
            view[action.rows, action.cols] = action.old
            self._next_id = action.next_id_before
            self.records.remove(action.record)
            self._apply_prompts(action.key, action.prompts)
            if action.key == self._key:
                self._choice = action.choice
            self.last_change = self._change("undo", action, removed=(action.record,))
        self._redo.append(action)
        return action.text

    def redo(self) -> str | None:
        """Redo the latest undone action; its description, or None if none."""
        if not self._redo:
            return None
        action = self._redo.pop()
        self.last_change = None
        if isinstance(action, _External):
            action.redo()
            if action.box is not None:
                self.external_change(action.box, "redo")
        elif isinstance(action, _PromptEdit):
            self._apply_prompts(action.key, action.after)
        else:
            view = self.labels[plane_index(action.key)]
            view[action.rows, action.cols] = action.label_id
            self._next_id = action.next_id_after
            self.records.append(action.record)
            self._apply_prompts(action.key, Prompts.empty())
            self.last_change = self._change("redo", action, added=(action.record,))
        self._undo.append(action)
        return action.text

    def _change(self, kind, action: _Commit, added=(), removed=()) -> LabelChange:
        box = []
        in_plane = iter((action.rows, action.cols))
        for k in action.key:
            if k is not None:
                box.append(slice(k, k + 1))
                continue
            idx = next(in_plane)
            lo, hi = (int(idx.min()), int(idx.max()) + 1) if len(idx) else (0, 0)
            box.append(slice(lo, hi))
        box = tuple(box)
        return LabelChange(kind, box, np.array(self.labels[box]), tuple(added), tuple(removed))

    def restore_objects(self, labels, records: list[ObjectRecord]) -> None:
        """Replace the committed labels and records (e.g. restored after a crash).

        ``labels``: ids of the spatial shape, written into :attr:`labels` in place;
        ``records``: their :class:`ObjectRecord` (see :func:`from_session_object`). Not
        undoable; the undo history of commits is cleared (prompt edits stay).
        """
        labels = np.asarray(labels)
        if labels.shape != self.shape:
            raise ValueError(
                f"restored labels have shape {labels.shape}, the image {self.shape}: they "
                "belong to another image"
            )
        top = int(labels.max()) if labels.size else 0
        if top:
            _check_id(top, self.labels.dtype)
        self.labels[...] = labels
        self.records = list(records)
        self._next_id = top + 1
        self._undo = [a for a in self._undo if isinstance(a, _PromptEdit)]
        self._redo = [a for a in self._redo if isinstance(a, _PromptEdit)]
        self.last_change = None

    def changed_slices(self) -> set:
        """Planes touched by the undo/redo history (for a GUI to refresh)."""
        return {a.key for a in (*self._undo, *self._redo) if a.key is not None}


def to_session_object(record: ObjectRecord):
    """The :class:`napari_sam.io.session.ObjectRecord` of a commit: one ``PromptRecord``
    per step of its refinement chain (same order, candidate and ``use_previous_mask``),
    so that ``io.session.replay`` reproduces the committed mask with the same model."""
    from napari_sam.io.session import ObjectRecord as SessionObject
    from napari_sam.io.session import PromptRecord

    sliced = [(axis, k) for axis, k in enumerate(record.slice_key) if k is not None]
    axis, index = sliced[0] if sliced else (0, None)
    prompts = [
        PromptRecord(
            points=[tuple(p) for p in s.points],
            point_labels=list(s.labels),
            box=None if s.box is None else tuple(s.box),
            slice_index=index,
            axis=axis,
            candidate=s.candidate,
            multimask=True,
            use_previous_mask=s.uses_previous,
        )
        for s in record.steps
    ]
    return SessionObject(
        record.label_id,
        prompts,
        model=record.model or None,
        extra={
            "overlap": record.overlap,
            "predicted_iou": record.predicted_iou,
            "n_pixels": record.n_pixels,
            "uid": record.uid,
            "created_time": record.created,
        },
    )


def from_session_object(obj, shape: tuple[int, ...]) -> ObjectRecord:
    """The :class:`ObjectRecord` of a session object made by :func:`to_session_object`
    (e.g. restored from the recovery store); ``shape``: the labels' spatial shape."""
    if not obj.prompts:
        raise ValueError(f"object {obj.object_id} has no prompts to rebuild its record from")
    key = [None] * len(shape)
    where = obj.prompts[-1]
    if where.slice_index is not None:
        key[where.axis] = where.slice_index
    steps = [
        PromptStep(
            np.asarray(p.points, dtype=np.float64).reshape(-1, 2),
            np.asarray(p.point_labels, dtype=np.int32),
            None if p.box is None else np.asarray(p.box, dtype=np.float64),
            int(p.candidate or 0),
            bool(p.use_previous_mask),
        )
        for p in obj.prompts
    ]
    last = steps[-1]
    extra = obj.extra or {}
    kw = {"uid": extra["uid"]} if extra.get("uid") else {}
    if "created_time" in extra:
        kw["created"] = float(extra["created_time"])
    return ObjectRecord(
        label_id=int(obj.object_id),
        slice_key=check_key(tuple(key), tuple(shape)),
        points=last.points.copy(),
        point_labels=last.labels.copy(),
        box=None if last.box is None else last.box.copy(),
        candidate=last.candidate,
        predicted_iou=float(extra.get("predicted_iou", float("nan"))),
        model=obj.model or "",
        overlap=str(extra.get("overlap", "keep")),
        n_pixels=int(extra.get("n_pixels", 0)),
        steps=steps,
        **kw,
    )


def autosave_change(autosave, annotator: Annotator, change: LabelChange | None = None):
    """Queue the write of a labels change to an :class:`napari_sam.io.recovery.Autosave`.

    ``change`` defaults to ``annotator.last_change``. Writes the whole labels and records
    instead while ``autosave.needs_snapshot`` (labels not in the store yet, or an earlier
    write failed). Returns the write's ``Future`` (None if there is no change). Used by the
    dock widget and by scripts alike.
    """
    change = annotator.last_change if change is None else change
    if change is None:
        return None
    if autosave.needs_snapshot:
        objects = [to_session_object(r) for r in annotator.records]
        return autosave.snapshot(np.array(annotator.labels), objects)
    return autosave.patch(
        change.offset,
        change.values,
        add=[to_session_object(r) for r in change.added],
        remove=[r.uid for r in change.removed],
    )


def _chain(prompts: Prompts, candidate: int) -> list[PromptStep]:
    steps = []
    p, cand = prompts, candidate
    while p is not None:
        uses = p.refine is not None
        box = None if p.box is None else p.box.copy()
        steps.append(PromptStep(p.points.copy(), p.labels.copy(), box, int(cand), uses))
        if not uses:
            break
        p, cand = p.refine.parent, p.refine.candidate
    return steps[::-1]


def _check_overlap(overlap: str) -> str:
    if overlap not in OVERLAP_RULES:
        raise ValueError(f"overlap must be one of {OVERLAP_RULES}, not {overlap!r}")
    return overlap


def _check_id(label_id, dtype) -> int:
    if isinstance(label_id, bool) or not isinstance(label_id, int | np.integer):
        raise TypeError(f"label id must be an integer, not {label_id!r}")
    label_id = int(label_id)
    hi = int(np.iinfo(dtype).max)
    if not 1 <= label_id <= hi:
        raise ValueError(
            f"label id {label_id} is out of range for labels of dtype {np.dtype(dtype)} "
            f"(1..{hi}); choose a smaller id or a wider labels dtype"
        )
    return label_id

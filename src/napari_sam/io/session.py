"""Annotation sessions: the prompts behind every committed object, saved as JSON.

A :class:`SessionRecord` lists one :class:`ObjectRecord` per committed object (label id),
each with the sequence of :class:`PromptRecord` (one predictor call each) that produced
it, the model (name + weights sha256) and the contrast settings. It is saved beside the
labels (``napari_sam_session.json`` inside a zarr / OME-Zarr label group, or
``<file>.session.json`` next to a TIFF) and can be loaded, edited and replayed:
:func:`replay` re-runs the prompts through any predictor that follows the contract in
docs/architecture.md (``set_image``, ``predict``) and rebuilds the labels.

Coordinates are napari's: points ``(row, col)`` and boxes ``(row_min, col_min, row_max,
col_max)`` in pixel indices of the 2D slice (data coordinates, not world coordinates).
The format is versioned by ``format_version``; files from a newer version are refused
with a clear message, files from older versions are upgraded on load.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.io.atomic import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "ObjectRecord",
    "PromptRecord",
    "SessionRecord",
    "load_session",
    "replay",
    "save_session",
    "session_path",
]

FORMAT_VERSION = 1
KIND = "napari-sam-session"
PAINT_MODES = ("overwrite", "keep")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class PromptRecord:
    """One predictor call.

    points: (N, 2) (row, col) pixel coordinates in the slice; point_labels: (N,) 1 =
    foreground, 0 = background; box: (row_min, col_min, row_max, col_max) or None;
    slice_index / axis: which 2D slice of an nD image (None for a 2D image);
    candidate: the chosen multimask output (None = highest predicted IoU);
    use_previous_mask: pass the previous call's low-resolution logits for the same object
    and slice as ``mask_input`` (iterative refinement).
    """

    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    slice_index: int | None = None
    axis: int = 0
    candidate: int | None = None
    multimask: bool = True
    use_previous_mask: bool = False

    def __post_init__(self) -> None:
        self.points = [(float(r), float(c)) for r, c in (tuple(p) for p in self.points)]
        self.point_labels = [int(v) for v in self.point_labels]
        if len(self.points) != len(self.point_labels):
            raise ValueError(
                f"{len(self.points)} points but {len(self.point_labels)} point labels; give "
                "one label (1 = foreground, 0 = background) per point"
            )
        if any(v not in (0, 1) for v in self.point_labels):
            raise ValueError(f"point labels must be 0 or 1, got {self.point_labels}")
        if self.box is not None:
            box = tuple(float(v) for v in self.box)
            if len(box) != 4 or not all(np.isfinite(box)):
                raise ValueError(f"box must be 4 finite numbers (r0, c0, r1, c1), got {self.box}")
            self.box = box
        if not self.points and self.box is None:
            raise ValueError("a prompt needs at least one point or a box")
        if self.slice_index is not None:
            self.slice_index = int(self.slice_index)
        self.axis = int(self.axis)
        if self.candidate is not None:
            self.candidate = int(self.candidate)


@dataclass
class ObjectRecord:
    """How one committed object (label ``object_id``) was made.

    ``prompts`` run in order; per slice, the last call's mask is the object there.
    ``edited`` marks manual edits after the commit (those are not replayable);
    ``propagation`` records propagation settings (replay re-runs prompted slices only).
    """

    object_id: int
    prompts: list[PromptRecord] = field(default_factory=list)
    model: str | None = None
    weights_sha256: str | None = None
    contrast: dict[str, Any] | None = None
    name: str = ""
    created: str = field(default_factory=_now)
    edited: bool = False
    propagation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.object_id, bool) or int(self.object_id) != self.object_id:
            raise ValueError(f"object_id must be an integer, got {self.object_id!r}")
        self.object_id = int(self.object_id)
        if self.object_id <= 0:
            raise ValueError(f"object_id must be >= 1 (0 is background), got {self.object_id}")
        self.prompts = [
            p if isinstance(p, PromptRecord) else PromptRecord(**p) for p in self.prompts
        ]


@dataclass
class SessionRecord:
    """Everything needed to rebuild a labels layer from prompts.

    ``image_shape`` is the labels' shape (the image without an RGB axis); ``image_key`` an
    optional content signature of the image (see :func:`napari_sam.io.recovery.image_key`).
    ``paint``: "overwrite" (a later object replaces earlier ones where they overlap) or
    "keep" (a later object only fills unlabelled pixels).
    """

    objects: list[ObjectRecord] = field(default_factory=list)
    image_name: str = ""
    image_shape: tuple[int, ...] | None = None
    image_key: str | None = None
    model: str | None = None
    weights_sha256: str | None = None
    contrast: dict[str, Any] | None = None
    paint: str = "overwrite"
    created: str = field(default_factory=_now)
    modified: str = field(default_factory=_now)
    napari_sam_version: str = ""
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.paint not in PAINT_MODES:
            raise ValueError(f"paint must be one of {PAINT_MODES}, got {self.paint!r}")
        if self.image_shape is not None:
            self.image_shape = tuple(int(s) for s in self.image_shape)
        self.objects = [
            o if isinstance(o, ObjectRecord) else ObjectRecord(**o) for o in self.objects
        ]
        if not self.napari_sam_version:
            from napari_sam import __version__

            self.napari_sam_version = __version__

    # -- editing
    def add(self, obj: ObjectRecord) -> None:
        """Add (or replace, same ``object_id``) an object; it becomes the latest painted."""
        self.remove(obj.object_id)
        self.objects.append(obj)
        self.modified = _now()

    def remove(self, object_id: int) -> bool:
        n = len(self.objects)
        self.objects = [o for o in self.objects if o.object_id != int(object_id)]
        self.modified = _now()
        return len(self.objects) != n

    def get(self, object_id: int) -> ObjectRecord | None:
        return next((o for o in self.objects if o.object_id == int(object_id)), None)

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = KIND
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "session") -> SessionRecord:
        if not isinstance(d, dict) or d.get("kind") != KIND:
            raise ValueError(f"{source} is not a napari-sam session (no kind={KIND!r})")
        version = d.get("format_version")
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"{source} has an invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source} was written by a newer napari-sam (session format {version}, this "
                f"version reads up to {FORMAT_VERSION}); upgrade napari-sam to open it"
            )
        d = _upgrade(dict(d), version)
        d.pop("kind", None)
        known = set(cls.__dataclass_fields__)
        unknown = {k: v for k, v in d.items() if k not in known}
        d = {k: v for k, v in d.items() if k in known}
        d.setdefault("extra", {}).update({f"unknown:{k}": v for k, v in unknown.items()})
        try:
            objects = [_object_from_dict(o) for o in d.pop("objects", [])]
            return cls(objects=objects, **d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source} is not a valid napari-sam session: {e}") from e

    @classmethod
    def from_json(cls, text: str, source: str = "session") -> SessionRecord:
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{source} is not valid JSON ({e}); the file is damaged") from e
        return cls.from_dict(d, source)


def _object_from_dict(o: dict[str, Any]) -> ObjectRecord:
    o = dict(o)
    prompts = [
        PromptRecord(**{k: v for k, v in p.items() if k in PromptRecord.__dataclass_fields__})
        for p in o.pop("prompts", [])
    ]
    known = {k: v for k, v in o.items() if k in ObjectRecord.__dataclass_fields__}
    return ObjectRecord(prompts=prompts, **known)


def _upgrade(d: dict[str, Any], version: int) -> dict[str, Any]:
    """Bring an older session dict to FORMAT_VERSION (one step per version; none yet)."""
    d["format_version"] = FORMAT_VERSION
    return d


def session_path(labels_path: str | os.PathLike, name: str | None = None) -> Path:
    """Where the session of the labels at ``labels_path`` lives.

    zarr / OME-Zarr folder: inside the label group (``napari_sam_session.json``); a file
    (TIFF): ``<file>.session.json`` beside it.
    """
    p = Path(labels_path)
    if p.is_dir() or p.suffix.lower() == ".zarr":
        from napari_sam.io.labels_zarr import session_file

        return session_file(p, name)
    return p.with_name(p.name + ".session.json")


def save_session(
    session: SessionRecord, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Save ``session`` as JSON at ``path`` (a .json file) atomically."""
    if not isinstance(session, SessionRecord):
        raise TypeError(f"session must be a SessionRecord, got {type(session).__name__}")
    return atomic_write_text(path, session.to_json(), overwrite=overwrite)


def load_session(path: str | os.PathLike) -> SessionRecord:
    """Load a session from a .json file, or from the labels it belongs to (a zarr store or
    a TIFF whose session sits beside it)."""
    p = Path(path)
    if p.suffix.lower() != ".json":
        p = session_path(p)
    if not p.exists():
        raise FileNotFoundError(f"no napari-sam session at {str(p)!r}")
    return SessionRecord.from_json(p.read_text(encoding="utf-8"), source=repr(str(p)))


# --------------------------------------------------------------------------- replay


def _slice_image(image: np.ndarray | Any, prompt: PromptRecord, spatial_ndim: int):
    if spatial_ndim == 2:
        if prompt.slice_index is not None:
            raise ValueError(
                f"prompt has slice_index={prompt.slice_index} but the image is 2D; "
                "slice_index must be None for 2D images"
            )
        return image
    if prompt.slice_index is None:
        raise ValueError(f"the image is {spatial_ndim}D: every prompt needs a slice_index")
    if not 0 <= prompt.axis < spatial_ndim:
        raise ValueError(f"prompt axis {prompt.axis} is out of range for a {spatial_ndim}D image")
    n = image.shape[prompt.axis]
    if not 0 <= prompt.slice_index < n:
        raise ValueError(
            f"slice_index {prompt.slice_index} is outside the image (axis {prompt.axis} has "
            f"{n} slices)"
        )
    sl = [slice(None)] * len(image.shape)
    sl[prompt.axis] = prompt.slice_index
    return image[tuple(sl)]


def _predict_args(prompt: PromptRecord, hw: tuple[int, int], object_id: int) -> dict[str, Any]:
    """PromptRecord (napari row, col) -> predictor keyword arguments (SAM x, y / XYXY),
    converted by :mod:`napari_sam.prompts` (the one place that swaps the axes)."""
    from napari_sam.prompts import box_rc_to_xyxy, rc_to_xy

    h, w = hw
    args: dict[str, Any] = {"multimask_output": prompt.multimask}
    if prompt.points:
        pts = np.asarray(prompt.points, dtype=float)  # (N, 2) (row, col)
        outside = (pts[:, 0] < 0) | (pts[:, 0] > h - 1) | (pts[:, 1] < 0) | (pts[:, 1] > w - 1)
        if outside.any():
            r, c = pts[np.flatnonzero(outside)[0]]
            raise ValueError(
                f"object {object_id}: point (row {r:g}, col {c:g}) is outside the image "
                f"(height {h}, width {w})"
            )
        args["point_coords"] = rc_to_xy(pts)  # (N, 2) (x, y)
        args["point_labels"] = np.asarray(prompt.point_labels, dtype=np.int64)
    if prompt.box is not None:
        r0, c0, r1, c1 = prompt.box
        box = box_rc_to_xyxy(np.array([[r0, c0], [r1, c1]]))  # (4,) XYXY
        if box[2] - box[0] <= 0 or box[3] - box[1] <= 0:
            raise ValueError(f"object {object_id}: box {prompt.box} has zero area")
        args["box"] = box
    return args


def replay(
    session: SessionRecord,
    predictor: Any,
    image: Any,
    *,
    shape: Sequence[int] | None = None,
    model: str | None = None,
    weights_sha256: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Re-run every object's prompts and return the labels they produce.

    Parameters
    ----------
    session : the recorded objects (painted in list order, ``session.paint`` rules).
    predictor : anything with ``set_image(image2d)`` and ``predict(point_coords,
        point_labels, box, mask_input, multimask_output) -> (masks (C, H, W) bool,
        iou (C,), low_res_logits (C, h, w))`` (docs/architecture.md).
    image : the image the session was recorded on, ``(H, W)``, ``(H, W, 3)`` or nD with
        the slice axes first (``(Z, H, W)``, ``(Z, H, W, 3)``, ...).
    shape : labels shape; default ``session.image_shape`` or the image's shape.
    model, weights_sha256 : the predictor's model; if given, objects recorded with another
        model are refused (replay would not reproduce them).
    progress : called as ``progress(done, total)`` after each slice.

    Returns labels of ``shape``, the smallest unsigned dtype holding the largest id.
    """
    if not isinstance(session, SessionRecord):
        raise TypeError(f"session must be a SessionRecord, got {type(session).__name__}")
    if shape is None:
        shape = session.image_shape
    if shape is None:
        ish = tuple(image.shape)
        shape = ish[:-1] if len(ish) >= 3 and ish[-1] in (3, 4) else ish
    shape = tuple(int(s) for s in shape)
    if tuple(image.shape[: len(shape)]) != shape:
        raise ValueError(
            f"image shape {tuple(image.shape)} does not match the session's labels shape "
            f"{shape}: this session belongs to another image"
        )
    for obj in session.objects:
        om = obj.model or session.model
        ow = obj.weights_sha256 or session.weights_sha256
        if model is not None and om is not None and om != model:
            raise ValueError(
                f"object {obj.object_id} was made with model {om!r}, the predictor has "
                f"{model!r}; load {om!r} to replay this session"
            )
        if weights_sha256 is not None and ow is not None and ow != weights_sha256:
            raise ValueError(
                f"object {obj.object_id} was made with other weights (sha256 {ow[:12]}...) "
                f"than the predictor's ({weights_sha256[:12]}...); replay would differ"
            )
    from napari_sam.io._arrays import smallest_uint

    max_id = max((o.object_id for o in session.objects), default=0)
    labels = np.zeros(shape, dtype=smallest_uint(max_id))
    spatial_ndim = len(shape)
    # Group calls by slice so that each slice's embedding is computed once; painting per
    # slice in object order gives the same result as painting object by object.
    slices: dict[tuple[int, int | None], list[tuple[int, list[PromptRecord]]]] = {}
    for k, obj in enumerate(session.objects):
        if not obj.prompts:
            continue
        per_slice: dict[tuple[int, int | None], list[PromptRecord]] = {}
        for p in obj.prompts:
            key = (p.axis, p.slice_index) if spatial_ndim > 2 else (0, None)
            per_slice.setdefault(key, []).append(p)
        for key, prompts in per_slice.items():
            slices.setdefault(key, []).append((k, prompts))
    total = len(slices)
    for done, ((axis, index), work) in enumerate(
        sorted(slices.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)), 1
    ):
        first = work[0][1][0]
        img2d = np.asarray(_slice_image(image, first, spatial_ndim))
        hw = tuple(img2d.shape[:2])
        predictor.set_image(img2d)
        if spatial_ndim == 2:
            target = labels
        else:
            sl = [slice(None)] * spatial_ndim
            sl[axis] = index
            target = labels[tuple(sl)]
        for k, prompts in sorted(work, key=lambda w: w[0]):
            obj = session.objects[k]
            mask = None
            logits = None
            for p in prompts:
                args = _predict_args(p, hw, obj.object_id)
                if p.use_previous_mask and logits is not None:
                    args["mask_input"] = logits[None]
                masks, iou, low_res = predictor.predict(**args)
                masks, iou, low_res = np.asarray(masks), np.asarray(iou), np.asarray(low_res)
                c = p.candidate if p.candidate is not None else int(np.argmax(iou))
                if not 0 <= c < masks.shape[0]:
                    raise ValueError(
                        f"object {obj.object_id}: recorded candidate {c} but the predictor "
                        f"returned {masks.shape[0]} masks"
                    )
                mask, logits = masks[c].astype(bool), low_res[c]
            assert mask is not None
            if session.paint == "keep":
                mask = mask & (target == 0)
            target[mask] = obj.object_id
        if progress is not None:
            progress(done, total)
    return labels

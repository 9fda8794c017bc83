"""Write propagation results into a 3D label array, as one undoable edit.

:class:`LabelWriter` applies :class:`~napari_sam.propagate.PropagationStep` results to a
label volume ``(Z, Y, X)`` (numpy, in data order) along the stack axis the embedding store
slices on. Rules, per written slice ``z`` of object ``obj_id``:

- the object's pixels on ``z`` become the step's mask: pixels of ``obj_id`` outside the
  mask go back to 0, mask pixels get ``obj_id``;
- ``overlap="keep"`` (default, as for 2D commits) leaves pixels of other objects
  untouched; ``"overwrite"`` gives every mask pixel to ``obj_id``;
- a later step for the same ``(obj_id, z)`` (the better of the two directions between
  anchors) first takes back what the earlier one wrote, then writes;
- anchor slices are never written (propagation does not yield them as accepted steps).

Every change is logged (flat indices, old values, new values) so that the whole run
undoes and redoes as one edit, even when cancelled half-way. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from napari_sam.propagate import PropagationState

__all__ = ["LabelWriter", "anchor_state", "plane_of", "stale_slices"]

OVERLAP_RULES = ("keep", "overwrite")


@dataclass
class _Change:
    z: int
    index: np.ndarray  # flat indices into the (rows, cols) plane
    old: np.ndarray
    new: np.ndarray


@dataclass
class LabelWriter:
    """Apply propagation steps to ``labels`` (see module docstring).

    labels: ``(Z, Y, X)`` integer numpy array, modified in place. axis: the slice axis
    (0, 1 or 2; the plane keeps the data order of the two other axes).
    """

    labels: np.ndarray
    axis: int = 0
    overlap: str = "keep"
    _log: list[_Change] = field(default_factory=list, repr=False)
    _written: dict[tuple[int, int], list[int]] = field(default_factory=dict, repr=False)
    undone: bool = False

    def __post_init__(self):
        if not isinstance(self.labels, np.ndarray) or self.labels.ndim != 3:
            raise TypeError(
                "labels must be a 3D numpy array (Z, Y, X); convert a dask/zarr label layer "
                "with np.asarray first"
            )
        if not np.issubdtype(self.labels.dtype, np.integer):
            raise TypeError(f"labels must have an integer dtype, got {self.labels.dtype}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {self.axis}")
        if self.overlap not in OVERLAP_RULES:
            raise ValueError(f"overlap must be one of {OVERLAP_RULES}, not {self.overlap!r}")

    def plane(self, z: int) -> np.ndarray:
        """A view of slice ``z`` of the labels along the axis, ``(rows, cols)``."""
        index = [slice(None)] * 3
        index[self.axis] = z
        return self.labels[tuple(index)]

    @property
    def changed_slices(self) -> list[int]:
        return sorted({c.z for c in self._log})

    def _set(self, z: int, index: np.ndarray, new: np.ndarray) -> int:
        view = self.plane(z)
        rows, cols = np.unravel_index(index, view.shape)
        old = view[rows, cols].copy()
        differ = old != new
        if not differ.any():
            return -1
        index, old, new = index[differ], old[differ], np.asarray(new)[differ]
        view[np.unravel_index(index, view.shape)] = new
        self._log.append(_Change(z, index, old, new))
        return len(self._log) - 1

    def write(self, z: int, obj_id: int, mask: np.ndarray) -> bool:
        """Make ``obj_id``'s pixels on slice ``z`` equal ``mask`` (overlap rule applies).

        Returns True if any pixel changed.
        """
        if self.undone:
            raise RuntimeError("this edit was undone; redo() it or start a new LabelWriter")
        view = self.plane(z)
        if mask.shape != view.shape:
            raise ValueError(f"mask shape {mask.shape} does not match the plane {view.shape}")
        changed = False
        # Take back what an earlier step of this run wrote for (obj_id, z).
        for k in reversed(self._written.pop((obj_id, z), [])):
            c = self._log[k]
            rows, cols = np.unravel_index(c.index, view.shape)
            still = view[rows, cols] == c.new  # only pixels nobody changed since
            if still.any():
                changed |= self._set(z, c.index[still], c.old[still]) >= 0
        ids: list[int] = []
        flat = view.ravel() if view.flags.c_contiguous else np.ascontiguousarray(view).ravel()
        m = np.asarray(mask, bool).ravel()
        clear = np.flatnonzero((flat == obj_id) & ~m)
        if clear.size:
            ids.append(self._set(z, clear, np.zeros(clear.size, view.dtype)))
        target = m & (flat != obj_id)
        if self.overlap == "keep":
            target &= flat == 0
        take = np.flatnonzero(target)
        if take.size:
            ids.append(self._set(z, take, np.full(take.size, obj_id, view.dtype)))
        ids = [k for k in ids if k >= 0]
        self._written[(obj_id, z)] = ids
        return changed or bool(ids)

    def apply(self, step) -> bool:
        """Write an accepted, chosen :class:`PropagationStep`; ignore the others."""
        if step.mask is None or step.reason is not None or not step.chosen:
            return False
        return self.write(step.z, step.obj_id, step.mask)

    def undo(self) -> list[int]:
        """Restore every pixel this writer changed; returns the slices touched."""
        if self.undone:
            return []
        for c in reversed(self._log):
            view = self.plane(c.z)
            view[np.unravel_index(c.index, view.shape)] = c.old
        self.undone = True
        return self.changed_slices

    def redo(self) -> list[int]:
        """Re-apply the changes after :meth:`undo`; returns the slices touched."""
        if not self.undone:
            return []
        for c in self._log:
            view = self.plane(c.z)
            view[np.unravel_index(c.index, view.shape)] = c.new
        self.undone = False
        return self.changed_slices


def plane_of(labels: np.ndarray, axis: int, z: int) -> np.ndarray:
    """A view of slice ``z`` of a 3D array along ``axis`` (the plane keeps data order)."""
    index = [slice(None)] * 3
    index[axis] = int(z)
    return labels[tuple(index)]


def anchor_state(labels: np.ndarray, axis: int, obj_id: int, slices) -> PropagationState:
    """A :class:`PropagationState` for object ``obj_id`` of a ``(Z, Y, X)`` label volume,
    with an anchor on each of ``slices`` (along ``axis``) where the object has pixels: the
    object's current pixels there are the anchor mask.

    Raises ValueError naming the fix when no given slice holds the object.
    """
    if labels.ndim != 3:
        raise ValueError(f"propagation needs a 3D label volume, got shape {labels.shape}")
    n = labels.shape[axis]
    shape = tuple(s for i, s in enumerate(labels.shape) if i != axis)
    state = PropagationState(n, shape)
    for z in sorted({int(z) for z in slices}):
        mask = plane_of(labels, axis, z) == obj_id
        if mask.any():
            state.add_anchor(obj_id, z, mask)
    if obj_id not in state.objects:
        raise ValueError(
            f"object {obj_id} has no pixels on its committed slices {sorted(slices)}; "
            "commit it on a slice first (C), then propagate (Shift-S)"
        )
    return state


def stale_slices(previous, state: PropagationState, obj_id: int) -> list[int]:
    """Slices an earlier propagation of ``obj_id`` wrote (``previous``) that the object
    no longer reaches in ``state`` (neither anchor nor propagated result): after a
    complete re-propagation they lose the object, so that it is exactly anchors + result.
    """
    now = set(state.object_slices(obj_id)) if obj_id in state.objects else set()
    return sorted({int(z) for z in previous} - now)

"""napari glue for z-propagation: run it in a worker, grow a labels layer, cancel, undo.

Thin by design: the work is :func:`napari_sam.propagate.propagate` (a generator) and the
label edits are :class:`napari_sam.label_writer.LabelWriter`; this module only drives the
generator in a napari thread worker and applies each yielded step to the layer in the
GUI thread, so the result is visible as it grows and the Qt event loop never blocks.

Usage from a widget (Shift+S / a button)::

    job = PropagationJob(labels_layer, store, decoder, state, obj_id=3,
                         on_status=viewer.status_setter)   # any callable(str)
    job.start()          # returns at once
    job.cancel()         # e.g. on Escape; what was written stays, consistently
    job.undo(); job.redo()

``store.axis`` is the slice axis (the displayed-dims axis the user slices on); layer
scale/translate are untouched because everything happens in data coordinates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from napari_sam.label_writer import LabelWriter
from napari_sam.propagate import PropagationStep, describe_stops, propagate

__all__ = ["PropagationJob"]


class PropagationJob:
    """One propagation run writing into a napari Labels layer (numpy data, 3D).

    labels_layer: napari ``Labels`` with ``(Z, Y, X)`` numpy data. store / decoder / state:
    as for :func:`~napari_sam.propagate.propagate`. obj_id: the object to propagate (None:
    all objects of ``state``). overlap: ``"keep"`` or ``"overwrite"`` (see LabelWriter).
    on_status: called with a short message per step and at the end (stop reasons).
    on_finished: called once in the GUI thread when the run ends (done or cancelled).
    Other keyword arguments go to :func:`propagate` (criteria, prompts, start, z_range...).
    """

    def __init__(
        self,
        labels_layer,
        store,
        decoder,
        state,
        obj_id: int | None = None,
        *,
        overlap: str = "keep",
        on_status: Callable[[str], object] | None = None,
        on_finished: Callable[[PropagationJob], object] | None = None,
        **propagate_kwargs,
    ):
        self.layer = labels_layer
        self.store, self.decoder, self.state = store, decoder, state
        self.objects = None if obj_id is None else [obj_id]
        self.writer = LabelWriter(labels_layer.data, axis=store.axis, overlap=overlap)
        self.on_status = on_status
        self.on_finished = on_finished
        self.kwargs = propagate_kwargs
        self.steps: list[PropagationStep] = []
        self.cancelled = False
        self.finished = False
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self.worker = None

    # ------------------------------------------------------------------ control
    def start(self):
        """Start the worker thread; returns the napari worker."""
        from napari.qt.threading import create_worker

        if self.worker is not None:
            raise RuntimeError("this job already ran; create a new PropagationJob")
        self.worker = create_worker(
            propagate,
            self.store,
            self.decoder,
            self.state,
            objects=self.objects,
            should_cancel=self._cancel.is_set,
            _start_thread=False,
            **self.kwargs,
        )
        self.worker.yielded.connect(self._on_step)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self._status("propagating ...")
        self.worker.start()
        return self.worker

    def run_blocking(self) -> None:
        """Same work in the calling thread (scripts, debugging)."""
        for step in propagate(self.store, self.decoder, self.state, objects=self.objects,
                              should_cancel=self._cancel.is_set, **self.kwargs):  # fmt: skip
            self._on_step(step)
        self._on_finished()

    def cancel(self) -> None:
        """Stop after the slice in progress; written slices stay (undo removes them)."""
        self.cancelled = True
        self._cancel.set()

    def undo(self) -> None:
        """Remove everything this run wrote into the layer."""
        if self.writer.undo():
            self.layer.refresh()

    def redo(self) -> None:
        if self.writer.redo():
            self.layer.refresh()

    # ---------------------------------------------------------------- callbacks
    def _status(self, text: str) -> None:
        if self.on_status is not None:
            self.on_status(text)

    def _on_step(self, step: PropagationStep) -> None:
        self.steps.append(step)
        if self.writer.apply(step):
            self.layer.refresh()
        if step.reason is None:
            self._status(f"propagating object {step.obj_id}: slice {step.z} "
                         f"(predicted IoU {step.score:.2f})")  # fmt: skip

    def _on_error(self, exc: BaseException) -> None:
        self.error = exc
        self._status(f"propagation failed: {exc}")

    def _on_finished(self) -> None:
        self.finished = True
        if self.error is None:
            ids = self.objects or list(self.state.objects)
            text = "; ".join(describe_stops(self.state, i) for i in ids if i in self.state.objects)
            prefix = "propagation cancelled" if self.cancelled else "propagation done"
            self._status(f"{prefix}. {text}")
        if self.on_finished is not None:
            self.on_finished(self)

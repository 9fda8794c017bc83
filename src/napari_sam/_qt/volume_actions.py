"""Volume actions of the SAM annotator dock: propagate (Shift-S), precompute, cancel (Escape).

A mixin of :class:`napari_sam._qt.widget.SamWidget`, kept apart so that the 2D widget
stays readable. Thin like the rest of ``_qt``: the work is
:func:`napari_sam.propagate.propagate` (driven by
:class:`napari_sam._qt.propagation.PropagationJob`),
:meth:`napari_sam.embeddings.EmbeddingStore.iter_precompute` and the label helpers of
:mod:`napari_sam.label_writer`; this module picks what to run, runs it in workers and
reports in the widget's status line.

Rules (also in docs/usage.md):

- **Which object.** Shift-S propagates the object of the current slice: if the slice has
  prompts, the selected candidate is committed first (as with C) and that object is
  propagated; otherwise the object chosen under "Object id" if it has pixels on this
  slice (e.g. painted by hand, or committed before a model change), else the object
  committed last on this slice. Nothing of that kind: a message says what to do.
- **Anchors.** The current slice and every slice along the slice axis where the user
  committed that object (and did not undo it) are anchors: propagation starts from all
  of them, fills between them and never writes on them. The object's pixels there are
  the anchor masks (a commit with the id of an existing object adds to its pixels).
- **Writing.** Results go into the committed-objects layer under the object's id as they
  come; other objects' pixels are never taken (overlap "keep"). After a complete run, the
  slices an earlier propagation of the same object had written but this run does not
  reach lose the object, so the object is exactly its anchors plus this run's result.
- **Embeddings** come from the annotator's :class:`~napari_sam.embeddings.EmbeddingStore`
  of the slice axis (shared with the annotator's slices and "Precompute stack"). It lives
  on disk, in ``<cache>/embeddings/<key>.zarr`` (``napari_sam.embeddings.open_cached_store``:
  the key hashes the image's fingerprint, the axis, the model and its weights hash and the
  contrast), float32 so that candidates are those of the direct predictor, so a later
  session on the same image and model reuses it and an interrupted precompute resumes.
  Opening it (weights hash, fingerprint, the ``done`` list) runs on the torch thread
  before the first encoder call; stored slices are checked against the image one by one
  when first used. A store made with other settings is computed again (status line); an
  unwritable folder or ``NAPARI_SAM_EMBEDDINGS=memory`` keeps them in memory only.
  Opening also keeps the folder under ``NAPARI_SAM_EMBEDDINGS_MAX_GB`` (least recently
  used stores not in use are deleted; the status line says how much was freed).
- **Undo.** A run (complete or cancelled) is one entry in the annotator's undo history;
  Ctrl-Z during a run cancels it, then undoes it.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from functools import partial

import numpy as np
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton

from napari_sam._qt import layers as L
from napari_sam.embeddings import cache_root
from napari_sam.label_writer import anchor_state, plane_of, stale_slices
from napari_sam.propagate import StopCriteria

#: in-memory embedding budget of one slice axis (float32 features, shared with the annotator)
STORE_BYTES = 512 * 2**20


class VolumeActions:
    """Propagation and precompute for :class:`SamWidget` (see the module docstring)."""

    # ============================================================== UI
    def _build_volume_ui(self, lay) -> None:
        self.stop_criteria = StopCriteria()
        self._prop_job = None
        self._prop_history: list = []  # (obj_id, axis, job) of finished runs
        self._prop_decoder = None  # (annotator, predictor)
        self._volume_model = None  # (choice, model, contrast) of the session
        self._propagate_after_commit = False
        self._after_job = None  # "undo" / "redo" requested during a run
        self._precompute = None  # (worker or None, threading.Event)
        self._store_opening: dict = {}  # slice axis -> Future of open_cached_store
        self._store_failed: set = set()  # slice axes whose store could not be made
        self._volume_deferred = None  # "propagate" / "precompute_stack" waiting for it
        self.store_note = ""  # where this session's embeddings live (or why not on disk)
        # what to stop if the widget is deleted while work runs (no reference to self)
        self._volume_cancels: dict = {}
        self.destroyed.connect(partial(_cancel_all, self._volume_cancels))
        self.propagate_button = QPushButton("Propagate (Shift-S)")
        self.propagate_button.setToolTip(
            "Propagate the object of this slice through the stack along the slice axis"
        )
        self.precompute_button = QPushButton("Precompute stack")
        self.precompute_button.setToolTip(
            "Compute the embeddings of all slices in the background (the slice on screen "
            "goes first)"
        )
        self.cancel_button = QPushButton("Cancel (Esc)")
        self.propagate_button.clicked.connect(self.propagate)
        self.precompute_button.clicked.connect(self.precompute_stack)
        self.cancel_button.clicked.connect(self.cancel_background)
        lay.addWidget(QLabel("Volume"))
        row = QHBoxLayout()
        row.addWidget(self.propagate_button)
        row.addWidget(self.precompute_button)
        row.addWidget(self.cancel_button)
        lay.addLayout(row)
        self.store_label = QLabel("")
        self.store_label.setWordWrap(True)
        self.store_label.setToolTip(
            "Stack embeddings are kept in the user cache (NAPARI_SAM_EMBEDDINGS=memory: "
            "in memory only), at most NAPARI_SAM_EMBEDDINGS_MAX_GB (default 20) GB: the "
            "least recently used go first. `napari-sam cache` lists or clears them"
        )
        lay.addWidget(self.store_label)
        self._update_volume_buttons()

    def _update_volume_buttons(self) -> None:
        ann = self.annotator
        is3d = ann is not None and len(ann.shape) == 3
        self.propagate_button.setEnabled(is3d and self._prop_job is None)
        self.precompute_button.setEnabled(is3d and self._precompute is None)
        self.cancel_button.setEnabled(self._prop_job is not None or self._precompute is not None)

    @property
    def volume_busy(self) -> bool:
        """A propagation or a precompute runs."""
        return self._prop_job is not None or self._precompute is not None

    # ========================================================== session hooks
    def _volume_session_started(self, choice, model, contrast) -> None:
        self._volume_model = (choice, model, contrast)
        self._prop_decoder = None

    def _volume_teardown(self) -> None:
        self._propagate_after_commit = False
        self._after_job = None
        self._store_opening = {}  # a running open finishes for the old session, unused
        self._store_failed = set()
        self._volume_deferred = None
        self.store_note = ""
        self.store_label.setText("")
        if self._prop_job is not None:
            self._prop_job.cancel()
        if self._precompute is not None:
            self._precompute[1].set()

    def _volume_on_dims(self, key) -> None:
        """The user is on plane ``key``: make sure a store serves its axis; a stored slice
        is checked against the image (one slice); a running precompute handles this slice
        next."""
        store, z = self._store_for(key)
        if store is None:
            return
        store.verify_slice(z)  # changed since it was stored: encoded again, in the worker
        if self._precompute is not None:
            store.priority(z)

    def _store_for(self, key):
        """``(store, z)`` for plane ``key`` of a 3D image; else ``(None, None)`` (2D, RGBA,
        no session, or the store is being opened: see :meth:`_open_store`)."""
        ann = self.annotator
        if ann is None or len(ann.shape) != 3 or self._volume_model is None:
            return None, None
        store, z = ann.store_for(key)
        if store is not None:
            return store, z
        sliced = [i for i, k in enumerate(key) if k is not None]
        data = L.image_data(self.image_layer)
        if len(sliced) != 1 or (ann.rgb and data.shape[-1] != 3):
            return None, None
        if sliced[0] not in self._store_opening and sliced[0] not in self._store_failed:
            self._open_store(ann, data, sliced[0])
        return ann.store_for(key)

    def _open_store(self, ann, data, axis: int) -> None:
        """Attach the embedding store of ``axis``: in memory at once when
        ``NAPARI_SAM_EMBEDDINGS=memory``, else the on-disk one, opened on the torch thread
        (weights hash, image fingerprint, zarr metadata: no O(volume) work, none on the
        Qt thread). It is attached there too, so every encoder call queued after it uses
        it; until then the annotator embeds the slice on screen in its own cache."""
        from napari_sam.embeddings import EmbeddingStore, open_cached_store

        choice, _, contrast = self._volume_model
        if cache_root() is None:
            try:
                store = EmbeddingStore(
                    data,
                    ann.encoder,
                    axis=axis,
                    dtype="float32",  # exactly the encoder's output: same candidates
                    cache_bytes=STORE_BYTES,
                    model_name=choice.key,
                    weights_hash="in-memory",  # never written to disk: no signature check
                    preprocess_key=repr(contrast),
                )
                ann.attach_store(store)
            except (TypeError, ValueError) as e:  # the session's own cache still works
                self._set_status(f"propagation unavailable for this image: {e}")
                return
            self._show_store(store, "")
            return

        def work():
            store, note = open_cached_store(
                data, ann.encoder, axis=axis, model_name=choice.key, cache_bytes=STORE_BYTES
            )
            ann.attach_store(store)  # on the torch thread, before any later encoder call
            return store, note

        if self._torch is None:
            future = Future()
            try:
                future.set_result(work())
            except Exception as e:  # noqa: BLE001 - reported in the status line
                future.set_exception(e)
            self._on_store_opened(ann, axis, future)
            return
        future = self._torch.submit(work)
        self._store_opening[axis] = future
        self._track(future, partial(self._on_store_opened, ann, axis))

    def _on_store_opened(self, ann, axis, future) -> None:
        if self._store_opening.get(axis) is future:
            del self._store_opening[axis]
        if self._closed() or ann is not self.annotator:
            if future.exception() is None:  # opened for a session that has ended
                future.result()[0].close()
            return
        exc = future.exception()
        after, self._volume_deferred = self._volume_deferred, None
        if exc is not None:
            self._store_failed.add(axis)
            self._set_status(
                f"propagation unavailable for this image: {type(exc).__name__}: {exc}"
            )
        else:
            store, note = future.result()
            self._show_store(store, note)
            if note:
                self._set_status(note)
        self._update_volume_buttons()
        if after is not None:
            getattr(self, after)()

    def _show_store(self, store, note: str) -> None:
        if store.path is None:
            where = note or "in memory only (NAPARI_SAM_EMBEDDINGS=memory)"
        else:
            done = store.n_slices - len(store.missing())
            where = f"stored, {done} of {store.n_slices} slices ready ({store.path.parent})"
        self.store_note = note
        self.store_label.setText(f"Embeddings: {where}")

    def _decoder(self):
        ann = self.annotator
        if self._prop_decoder is None or self._prop_decoder[0] is not ann:
            choice, model, contrast = self._volume_model
            # one view even when the session uses test-time flips: propagation gained
            # nothing from them at 4.8x the time (docs/models.md); the store's view 0 serves
            self._prop_decoder = (ann, choice.make_predictor(model, contrast))
        return self._prop_decoder[1]

    def _volume_key(self, action: str):
        """The current plane if ``action`` can run on it, else None (message shown)."""
        ann = self.annotator
        if ann is None:
            self._set_status(f"cannot {action}: no image/model set up")
            return None
        if len(ann.shape) != 3:
            self._set_status(
                f"cannot {action}: the image is 2D; propagation and precompute work on 3D "
                "stacks (commit 2D objects with C)"
            )
            return None
        key, reason = L.slice_key(self.viewer, self.image_layer, ann.shape)
        if key is None:
            self._set_status(f"cannot {action}: {reason}")
            return None
        if self._store_for(key)[0] is None:
            if self._store_opening:  # runs once the store is open (_on_store_opened)
                self._volume_deferred = "propagate" if action == "propagate" else (
                    "precompute_stack"
                )  # fmt: skip
                self._set_status(
                    f"opening this stack's embedding store; {action} starts when it is ready"
                )
                return None
            self._set_status(
                f"cannot {action}: RGBA stacks are not supported; drop the alpha channel"
            )
            return None
        return key

    # ============================================================ propagate
    def propagate(self):
        """Propagate the current slice's object through the stack (see module rules)."""
        if self._prop_job is not None:
            self._set_status("a propagation is running; Esc cancels it")
            return
        key = self._volume_key("propagate")
        if key is None:
            return
        ann = self.annotator
        if not ann.prompts.is_empty:
            # commit the selected candidate first; commit() comes back here when done
            self._propagate_after_commit = True
            self.commit()
            return
        store, z = self._store_for(key)
        chosen = self.label_id.value()
        record = ann.last_commit_on(key)
        if chosen and (plane_of(ann.labels, store.axis, z) == chosen).any():
            obj_id = chosen
        elif record is not None:
            obj_id = record.label_id
        else:
            self._set_status(
                "nothing to propagate on this slice: add prompts for the object (or commit "
                "it with C), or choose an object of this slice under Object id, then "
                "press Shift-S"
            )
            return
        self._start_propagation(key, obj_id)

    def _after_commit(self, ok: bool) -> None:
        """Called by commit(): run a propagation that waited for it."""
        if self._propagate_after_commit:
            self._propagate_after_commit = False
            if ok:
                self.propagate()

    def _start_propagation(self, key, obj_id: int) -> None:
        from napari_sam._qt.propagation import PropagationJob

        ann = self.annotator
        store, z = self._store_for(key)
        axis = store.axis
        labels = ann.labels
        if not isinstance(labels, np.ndarray):
            self._set_status("cannot propagate: the objects layer is not an in-memory array")
            return
        try:
            slices = [z, *ann.committed_slices(obj_id, axis)]
            state = anchor_state(labels, axis, obj_id, slices)
        except ValueError as e:
            self._set_status(str(e))
            return
        previous = set()
        for o, a, old in self._prop_history:
            if o == obj_id and a == axis and old.writer.labels is labels and not old.writer.undone:
                previous.update(old.writer.changed_slices)
        job = PropagationJob(
            self.objects_layer,
            store,
            self._decoder(),
            state,
            obj_id,
            overlap="keep",
            on_status=self._volume_status,
            on_finished=partial(self._on_propagated, ann, key, obj_id, axis, previous),
            criteria=self.stop_criteria,
        )
        self._prop_job = job
        self._volume_cancels["propagation"] = job.cancel
        self._update_volume_buttons()
        anchors = ", ".join(map(str, sorted(state.objects[obj_id].anchors)))
        self._set_status(f"propagating object {obj_id} from slice(s) {anchors}...")
        if self._torch is None:
            job.run_blocking()
        else:
            job.start()

    def _volume_status(self, text: str) -> None:
        if not self._closed():
            self._set_status(text)

    def _on_propagated(self, ann, key, obj_id, axis, previous, job) -> None:
        if self._prop_job is job:
            self._prop_job = None
        if self._closed():
            return
        if job.error is not None:
            self._set_banner(f"Propagation failed: {type(job.error).__name__}: {job.error}")
        elif not job.cancelled:
            zero = np.zeros(job.writer.plane(0).shape, bool)
            for z in stale_slices(previous, job.state, obj_id):
                if (plane_of(job.writer.labels, axis, z) == obj_id).any():
                    job.writer.write(z, obj_id, zero)
            job.layer.refresh()
        if job.writer.changed_slices:
            self._prop_history.append((obj_id, axis, job))
            if ann is self.annotator:
                zs = job.writer.changed_slices
                box = [slice(None)] * ann.labels.ndim
                box[axis] = slice(min(zs), max(zs) + 1)
                ann.push_edit(job.undo, job.redo, f"propagate object {obj_id}", key, tuple(box))
                self._autosave_change(self.status_text)
        after, self._after_job = self._after_job, None
        self._update_buttons()
        self._update_volume_buttons()
        if after is not None and ann is self.annotator:
            getattr(self, after)()

    def _defer_history(self, verb: str) -> bool:
        """Undo/redo during a run: cancel it and do ``verb`` once it stopped."""
        if self._prop_job is None:
            return False
        self._after_job = verb
        self._prop_job.cancel()
        self._set_status(f"cancelling the propagation; {verb} follows when it has stopped")
        return True

    # ============================================================ precompute
    def precompute_stack(self):
        """Compute the embeddings of every slice along the slice axis in a worker (napari
        progress bar; Esc cancels; the slice on screen goes first)."""
        if self._precompute is not None:
            self._set_status("precomputing already; Esc cancels it")
            return
        key = self._volume_key("precompute")
        if key is None:
            return
        store, z = self._store_for(key)
        missing = store.missing()
        if not missing:
            self._set_status(f"all {store.n_slices} slices are embedded already")
            return
        store.priority(z)
        cancel = threading.Event()
        counts = {"done": 0, "runs": 0, "total": len(missing)}
        executor = self._torch

        def run():
            events = store.iter_precompute(should_cancel=cancel.is_set)
            while True:
                # on the widget's one torch thread: decoder calls interleave between slices
                event = next(events, None) if executor is None else (
                    executor.submit(next, events, None).result()
                )  # fmt: skip
                if event is None:
                    return
                yield event

        ann = self.annotator
        on_event = partial(self._on_precomputed, ann, store, counts)
        on_end = partial(self._on_precompute_end, ann, store, counts, cancel)
        if executor is None:
            self._precompute = (None, cancel)
            for event in run():
                on_event(event)
            on_end()
            return
        from napari.qt.threading import create_worker

        worker = create_worker(
            run, _progress={"total": len(missing), "desc": "SAM: precomputing embeddings"}
        )
        worker.yielded.connect(on_event)
        worker.errored.connect(lambda e: self._volume_error("Precompute failed", e))
        worker.finished.connect(on_end)
        self._precompute = (worker, cancel)
        self._volume_cancels["precompute"] = cancel.set
        self._update_volume_buttons()
        self._set_status(f"precomputing {len(missing)} slice embeddings... (Esc cancels)")
        worker.start()

    def _volume_error(self, what, exc) -> None:
        if not self._closed():
            self._set_banner(f"{what}: {type(exc).__name__}: {exc}")

    def _on_precomputed(self, ann, store, counts, event) -> None:
        counts["done"] = event.done
        counts["runs"] += int(event.computed)
        counts["total"] = event.total
        if not self._closed() and ann is self.annotator:
            self._set_status(
                f"precomputing embeddings: {event.done}/{event.total} (slice {event.z})"
            )

    def _on_precompute_end(self, ann, store, counts, cancel) -> None:
        worker = self._precompute[0] if self._precompute is not None else None
        self._precompute = None
        if worker is not None:  # its slots hold this session's annotator and store
            from .workers import _disconnect_all

            _disconnect_all(worker)
        if self._closed():
            return
        self._update_volume_buttons()
        if ann is not self.annotator:
            return
        left = len(store.missing())
        what = "precompute cancelled" if cancel.is_set() else "precompute done"
        kept = "" if store.path is None else f"; stored in {store.path}"
        self._set_status(
            f"{what}: {counts['runs']} slice(s) embedded, {store.n_slices - left} of "
            f"{store.n_slices} ready{kept}"
        )
        self._show_store(store, self.store_note)

    # ================================================================ cancel
    def cancel_background(self):
        """Cancel a running propagation and/or precompute (Escape)."""
        did = []
        if self._prop_job is not None:
            self._prop_job.cancel()
            did.append("propagation")
        if self._precompute is not None:
            self._precompute[1].set()
            did.append("precompute")
        if did:
            self._set_status(f"cancelling {' and '.join(did)}...")


def _cancel_all(cancels: dict, *_):
    """On widget deletion: stop a running propagation/precompute."""
    for cancel in cancels.values():
        cancel()

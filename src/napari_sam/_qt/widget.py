"""The SAM annotator dock widget: napari layers in, :class:`~napari_sam.annotator.Annotator`
calls, napari layers out.

All decisions (prompts, candidates, selection, commit rules, undo) live in the annotator;
this module reads layers, calls it, writes layer data, and keeps the Qt thread free by
running the encoder and the decoder in worker threads (newest request wins).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_sam._qt import layers as L
from napari_sam._qt.volume_actions import VolumeActions
from napari_sam._qt.workers import LatestWins
from napari_sam.model_choices import (
    ContrastSetting,
    ModelChoice,
    available_devices,
    default_choices,
    file_choice,
    preferred_index,
)
from napari_sam.slicing import check_image_shape, describe_key

#: (key, what it does) — shown in the widget and in docs/usage.md
KEYS = (
    ("click", "add a positive point (Points layer in add mode)"),
    ("Shift-click / right-click", "add a negative point"),
    ("T", "toggle the next point positive / negative"),
    ("B", "switch between drawing points and a box"),
    ("1 / 2 / 3", "select candidate 1 / 2 / 3"),
    ("C", "commit the selected candidate as an object"),
    ("Shift-C", "clear the prompts of this slice"),
    ("Ctrl-Z / Ctrl-Shift-Z", "undo / redo (prompts, commits and propagations)"),
    ("Shift-S", "propagate the slice's object through the stack (3D; commits prompts first)"),
    ("Escape", "cancel a running propagation or precompute"),
)

CONTRASTS = {
    "auto (percentiles 0.5-99.5)": lambda layer: ContrastSetting("auto"),
    "layer contrast limits": lambda layer: ContrastSetting(
        "window", vmin=float(layer.contrast_limits[0]), vmax=float(layer.contrast_limits[1])
    ),
    "full range (min-max)": lambda layer: ContrastSetting("minmax"),
}

#: Test-time flip views (``SamPredictor.tta``) by dock entry: off by default, because four
#: views make every click ~4x slower to decode (docs/models.md, "Test-time flips").
FLIPS = {
    "off": 1,
    "4 views (slice + 3 flips)": 4,
}


class SamWidget(VolumeActions, QWidget):
    """Interactive SAM annotation of the current 2D slice of an image layer.

    Decoder calls cheaper than :attr:`inline_decode_ms` (median CPU time of the last few)
    run on the Qt thread when no other torch work is under way: handing them to the worker
    thread cost more than the call itself (the hop waits for the GIL and for napari's
    redraw of the new point; docs/performance.md). Slower calls (large slices, big models)
    and the first call on a slice size always run in the worker.

    Parameters
    ----------
    napari_viewer
        The viewer (napari passes it).
    models
        The model list (default: :func:`napari_sam.model_choices.default_choices`).
    threaded
        Run encoder/decoder in worker threads (default; ``NAPARI_SAM_NO_THREADS=1`` or
        False runs them inline, for debugging).
    """

    #: budget (ms, the interaction target) under which decoder calls run on the Qt thread;
    #: 0 disables
    #: (``NAPARI_SAM_INLINE_DECODE_MS`` overrides)
    inline_decode_ms: float = 50.0
    #: candidates of planes larger than this on a side are shown at a reduced size (blocks
    #: of k x k pixels; commits stay at full resolution); 0: always full resolution
    #: (``NAPARI_SAM_DISPLAY_MAX_SIDE`` overrides; see docs/usage.md)
    display_max_side: int = 1024
    # (callback, future) from a worker thread, delivered on the Qt thread
    _relay = Signal(object)

    def __init__(
        self,
        napari_viewer,
        *,
        models: list[ModelChoice] | None = None,
        threaded: bool | None = None,
        parent=None,
    ):
        super().__init__(parent)
        _prefer_passive_openmp()
        self.viewer = napari_viewer
        if threaded is None:
            threaded = os.environ.get("NAPARI_SAM_NO_THREADS", "") not in ("1", "true")
        self.models: list[ModelChoice] = list(default_choices() if models is None else models)
        # one thread for all torch work (see napari_sam._qt.workers)
        self._torch = ThreadPoolExecutor(1, "napari-sam-torch") if threaded else None
        self._encoder_jobs = LatestWins(threaded, progress=True, executor=self._torch)
        self._decoder_jobs = LatestWins(threaded, executor=self._torch)
        self._loader_jobs = LatestWins(threaded, progress=True, executor=self._torch)
        self.annotator = None
        self.image_layer = None
        self.points_layer = self.box_layer = self.objects_layer = None
        self.candidate_layers: list = []
        self._model = None  # (choice key, device, model)
        self._carried: dict = {}
        self._commit_when_ready = False
        self._syncing = False
        self._negative_click = False
        self._connections: list = []
        self._decode_ms: deque = deque(maxlen=5)  # recent decoder calls of this session
        with contextlib.suppress(ValueError):
            self.inline_decode_ms = float(
                os.environ.get("NAPARI_SAM_INLINE_DECODE_MS", self.inline_decode_ms)
            )
        with contextlib.suppress(ValueError):
            self.display_max_side = max(
                0, int(os.environ.get("NAPARI_SAM_DISPLAY_MAX_SIDE", self.display_max_side))
            )
        self._candidate_place = None  # (plane key, mask size) the candidate layers fit
        self._build_ui()
        self._init_recovery(threaded)
        # layer-list thumbnails of the candidate layers, refreshed once clicks pause
        self._thumbnails = QTimer(self)
        self._thumbnails.setSingleShot(True)
        self._thumbnails.setInterval(400)
        self._thumbnails.timeout.connect(self._refresh_thumbnails)
        self._connect_viewer()
        self._refresh_images()
        if self.image_combo.count():
            self._setup()
        else:
            self._set_banner(
                "No image layer: open an image (File > Open, or File > Open "
                "Sample > napari-sam) and it is picked up here."
            )

    # ================================================================== UI
    def _build_ui(self):
        self.image_combo = QComboBox()
        self.model_combo = QComboBox()
        pref = preferred_index(self.models)
        if pref is None:  # never start a download without the user asking for it
            self.model_combo.addItem("choose a model (downloaded on first use)", "__none__")
        for c in self.models:
            self.model_combo.addItem(c.label, c.key)
        self.model_combo.addItem("Local checkpoint file...", "__file__")
        if pref is not None:
            self.model_combo.setCurrentIndex(self.model_combo.findData(self.models[pref].key))
        self._last_model_index = self.model_combo.currentIndex()
        self.device_combo = QComboBox()
        self.device_combo.addItems(available_devices())
        self.contrast_combo = QComboBox()
        self.contrast_combo.addItems(list(CONTRASTS))
        self.flips_combo = QComboBox()
        self.flips_combo.addItems(list(FLIPS))
        self.flips_combo.setToolTip(
            "Test-time flips: also segment the left-right, up-down and doubly flipped slice "
            "and average the four (better masks; 4x encoder time and embedding memory, "
            "~4x decoder time per click)"
        )

        self.parts_check = QCheckBox("only the parts you clicked")
        self.parts_check.setChecked(True)
        self.parts_check.setToolTip(
            "Drop the pieces of a mask that no positive click touches (SAM often adds blobs "
            "on look-alike objects elsewhere). Boxes alone are not affected."
        )

        combos = (
            self.image_combo,
            self.model_combo,
            self.device_combo,
            self.contrast_combo,
            self.flips_combo,
        )
        for combo in combos:
            # long model names must not widen the dock (the canvas needs the room)
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.setMinimumContentsLength(14)
        form = QFormLayout()
        form.addRow("Image", self.image_combo)
        form.addRow("Model", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Contrast", self.contrast_combo)
        form.addRow("Flips", self.flips_combo)
        form.addRow("Masks", self.parts_check)

        self.model_note = QLabel(
            "UNTRAINED model (testing): its masks are random. Pick a trained model for real work."
        )
        self.model_note.setWordWrap(True)
        self.model_note.setStyleSheet("QLabel { color: #fbbf24; }")
        self.model_note.hide()
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet(
            "QLabel { background: #7f1d1d; color: white; padding: 4px; border-radius: 3px; }"
        )
        self.banner.hide()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.candidate_buttons = []
        self.candidate_group = QButtonGroup(self)
        cand_row = QHBoxLayout()
        for i in range(3):
            b = QPushButton(f"{i + 1}")
            b.setCheckable(True)
            b.setToolTip(f"Select candidate {i + 1} (key {i + 1})")
            b.setStyleSheet(
                f"QPushButton:checked {{ border: 2px solid {L.CANDIDATE_COLORS[i]}; }}"
            )
            self.candidate_group.addButton(b, i)
            self.candidate_buttons.append(b)
            cand_row.addWidget(b)
        self.candidate_group.idClicked.connect(self.select_candidate)

        self.point_mode = QPushButton("Next point: positive (T)")
        self.point_mode.clicked.connect(self.toggle_point_label)
        self.box_button = QPushButton("Draw box (B)")
        self.box_button.clicked.connect(self.toggle_box_mode)

        self.label_id = QSpinBox()
        self.label_id.setRange(0, 2**31 - 1)
        self.label_id.setSpecialValueText("new")
        self.label_id.setToolTip("Id for the next commit; 'new' = next free id")
        self.overlap_combo = QComboBox()
        self.overlap_combo.addItem("keep existing objects", "keep")
        self.overlap_combo.addItem("overwrite existing objects", "overwrite")

        grid = QGridLayout()
        self.commit_button = QPushButton("Commit (C)")
        self.undo_button = QPushButton("Undo (Ctrl-Z)")
        self.redo_button = QPushButton("Redo (Ctrl-Shift-Z)")
        self.clear_button = QPushButton("Clear (Shift-C)")
        self.commit_button.clicked.connect(self.commit)
        self.undo_button.clicked.connect(self.undo)
        self.redo_button.clicked.connect(self.redo)
        self.clear_button.clicked.connect(self.clear)
        grid.addWidget(self.commit_button, 0, 0)
        grid.addWidget(self.clear_button, 0, 1)
        grid.addWidget(self.undo_button, 1, 0)
        grid.addWidget(self.redo_button, 1, 1)

        obj_form = QFormLayout()
        obj_form.addRow("Object id", self.label_id)
        obj_form.addRow("Overlap", self.overlap_combo)

        keys = QLabel("<b>Keys</b><br>" + "<br>".join(f"<b>{k}</b>: {v}" for k, v in KEYS))
        keys.setWordWrap(True)
        keys.setTextFormat(Qt.TextFormat.RichText)

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.model_note)
        lay.addWidget(self.banner)
        lay.addWidget(self.status)
        lay.addWidget(QLabel("Candidates"))
        lay.addLayout(cand_row)
        row = QHBoxLayout()
        row.addWidget(self.point_mode)
        row.addWidget(self.box_button)
        lay.addLayout(row)
        lay.addLayout(obj_form)
        lay.addLayout(grid)
        self._build_volume_ui(lay)
        lay.addWidget(keys)
        lay.addStretch(1)

        self.image_combo.currentIndexChanged.connect(lambda *_: self._setup())
        self.model_combo.currentIndexChanged.connect(self._on_model_combo)
        self.device_combo.currentIndexChanged.connect(lambda *_: self._setup())
        self.contrast_combo.currentIndexChanged.connect(lambda *_: self._setup())
        self.flips_combo.currentIndexChanged.connect(lambda *_: self._setup())
        self.parts_check.toggled.connect(self._on_parts_toggled)

    # ============================================================ viewer events
    def _connect_viewer(self):
        ref = weakref.ref(self)

        def call(name):
            def handler(*args):
                w = ref()
                if w is not None and not w._closed():
                    getattr(w, name)(*args)

            return handler

        pairs = [
            (self.viewer.layers.events.inserted, call("_on_layers_changed")),
            (self.viewer.layers.events.removed, call("_on_layer_removed")),
            (self.viewer.dims.events.current_step, call("_on_dims")),
            (self.viewer.dims.events.order, call("_on_dims")),
            (self.viewer.dims.events.ndisplay, call("_on_dims")),
        ]
        for emitter, cb in pairs:
            emitter.connect(cb)
        self._connections = pairs
        keys = {
            "C": "commit",
            "Shift-C": "clear",
            "Control-Z": "undo",
            "Control-Shift-Z": "redo",
            "T": "toggle_point_label",
            "B": "toggle_box_mode",
            "1": ("select_candidate", 0),
            "2": ("select_candidate", 1),
            "3": ("select_candidate", 2),
            "Shift-S": "propagate",
            "Escape": "cancel_background",
        }
        self._keys = {}
        for key, action in keys.items():
            name, *args = action if isinstance(action, tuple) else (action,)

            def fn(_target, _name=name, _args=tuple(args)):
                w = ref()
                if w is not None and not w._closed():
                    getattr(w, _name)(*_args)

            self._keys[key] = fn
            self.viewer.bind_key(key, fn, overwrite=True)
        self.destroyed.connect(
            partial(
                _disconnect,
                pairs,
                self.viewer,
                dict(self._keys),
                [self._encoder_jobs, self._decoder_jobs, self._loader_jobs],
                self._torch,
            )
        )

    def _closed(self) -> bool:
        return self._decoder_jobs.closed

    def _bind_layer_keys(self, layer):
        for key, fn in self._keys.items():
            layer.bind_key(key, fn, overwrite=True)

    def _unbind_layer_keys(self, layer):
        for key, fn in self._keys.items():
            if layer.keymap.get(_coerce(key)) is fn:
                layer.keymap.pop(_coerce(key))

    def _refresh_images(self):
        current = self.image_combo.currentData()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in self.viewer.layers:
            if layer.__class__.__name__ == "Image" and L.ROLE not in layer.metadata:
                self.image_combo.addItem(layer.name, id(layer))
        idx = self.image_combo.findData(current)
        self.image_combo.setCurrentIndex(max(idx, 0) if self.image_combo.count() else -1)
        self.image_combo.blockSignals(False)

    def _selected_image(self):
        key = self.image_combo.currentData()
        for layer in self.viewer.layers:
            if id(layer) == key:
                return layer
        return None

    def _on_layers_changed(self, event=None):
        had = self.image_combo.count()
        self._refresh_images()
        if self.annotator is None and self.image_combo.count() and not had:
            self._setup()

    def _on_layer_removed(self, event):
        layer = event.value
        if layer is self.image_layer:
            name = layer.name
            self._teardown(remove_layers=True)
            self._refresh_images()
            self._set_banner(
                f"The image layer '{name}' was removed; work on it stopped. "
                "Pick another image above."
            )
            if self.image_combo.count():
                self._setup(keep_banner=True)
            return
        if layer in (self.points_layer, self.box_layer, *self.candidate_layers):
            self._set_status("A SAM helper layer was removed; it is recreated on the next prompt.")
        self._refresh_images()

    # ================================================================ set-up
    def _on_model_combo(self, *_):
        if self.model_combo.currentData() == "__file__":
            path, _ = QFileDialog.getOpenFileName(
                self, "SAM checkpoint", "", "Checkpoints (*.pth *.pt *.bin);;All files (*)"
            )
            if path:
                self.add_model_file(path)
            else:
                self.model_combo.setCurrentIndex(self._last_model_index)
            return
        self._last_model_index = self.model_combo.currentIndex()
        self._setup()

    def add_model_file(self, path) -> None:
        """Add a local checkpoint to the model list and switch to it."""
        choice = file_choice(path)
        self.models.append(choice)
        self.model_combo.blockSignals(True)
        self.model_combo.insertItem(self.model_combo.count() - 1, choice.label, choice.key)
        self.model_combo.setCurrentIndex(self.model_combo.count() - 2)
        self._last_model_index = self.model_combo.currentIndex()
        self.model_combo.blockSignals(False)
        self._setup()

    def select_model(self, name_or_path: str) -> None:
        """Switch to a model by list key (e.g. ``vit_b``) or to a checkpoint file."""
        idx = self.model_combo.findData(name_or_path)
        if idx >= 0:
            self.model_combo.setCurrentIndex(idx)
        elif os.path.isfile(name_or_path):
            self.add_model_file(name_or_path)
        else:
            known = ", ".join(c.key for c in self.models)
            self._set_banner(
                f"Unknown model {name_or_path!r}: pick one of {known}, or give "
                "the path of a checkpoint file."
            )

    def _choice(self) -> ModelChoice | None:
        key = self.model_combo.currentData()
        return next((c for c in self.models if c.key == key), None)

    def _setup(self, keep_banner: bool = False):
        """(Re)build the session for the selected image, model, device and contrast."""
        if not keep_banner:
            self._set_banner("")
        layer = self._selected_image()
        if layer is None:
            self._teardown(keep_layers=False)
            self._set_banner("No image layer: open an image and pick it above.")
            return
        try:
            check_image_shape(L.image_data(layer).shape, layer.rgb)
        except ValueError as e:
            self._teardown(keep_layers=False)
            self._set_banner(f"Image '{layer.name}': {e}")
            return
        choice = self._choice()
        self.model_note.setVisible(choice is not None and not choice.trained)
        if choice is None:
            self._teardown(keep_layers=False)
            self._set_banner(
                "No model available offline: pick one under Model (downloaded once; sizes "
                "shown) or 'Local checkpoint file...'."
            )
            return
        device = self.device_combo.currentText()
        if self.annotator is not None and layer is self.image_layer:
            self._carried = self.annotator.all_prompts()
        self._teardown(keep_layers=layer is self.image_layer)
        if self._model is not None and self._model[:2] == (choice.key, device):
            self._start_session(layer, choice, self._model[2])
            return
        self._set_status(f"loading model {choice.label}...")
        self._loader_jobs.submit(
            lambda: partial(choice.load, device),
            partial(self._on_model_loaded, choice, device),
            self._on_model_error,
            desc="SAM: loading model",
        )

    def _on_model_loaded(self, choice, device, model):
        if choice is not self._choice() or device != self.device_combo.currentText():
            return  # the user has picked another model meanwhile
        self._model = (choice.key, device, model)
        layer = self._selected_image()
        if layer is not None:
            self._start_session(layer, choice, model)

    def _on_model_error(self, exc):
        self._set_banner(f"Could not load the model: {exc}")
        self._set_status("")

    def _start_session(self, layer, choice, model):
        from napari_sam.annotator import Annotator

        carried, self._carried = self._carried, {}
        self._decode_ms.clear()  # a new image or model: decoder cost measured again
        if layer is not self.image_layer:
            carried = {}
            self._teardown(keep_layers=False)
        data = L.image_data(layer)
        spatial = check_image_shape(data.shape, layer.rgb)
        contrast = CONTRASTS[self.contrast_combo.currentText()](layer)
        tta = FLIPS[self.flips_combo.currentText()]
        try:
            predictor, encoder = choice.predictors(model, contrast, tta=tta)
        except Exception as e:  # noqa: BLE001 - shown to the user
            self._set_banner(f"Could not set up the predictor: {e}")
            return
        objects = L.find_layer(self.viewer, "objects", image=layer.name)
        if objects is not None and tuple(objects.data.shape) != spatial:
            objects = None
        labels = np.asarray(objects.data) if objects is not None else None
        self.annotator = Annotator(
            predictor,
            data,
            rgb=layer.rgb,
            encoder=encoder,
            labels=labels,
            model_name=choice.key,
            display_max_side=self.display_max_side or None,
            clicked_parts_only=self.parts_check.isChecked(),
        )
        self._volume_session_started(choice, model, contrast)
        for key, p in carried.items():
            self.annotator.restore_prompts(key, p.points, p.labels, p.box)
        self.image_layer = layer
        layer.events.data.connect(self._on_image_data)
        self._bind_layer_keys(layer)  # SAM keys also while the image is the active layer
        self._ensure_layers(objects)
        self.viewer.layers.selection.active = self.points_layer
        self._start_recovery(layer, data)
        self._on_dims()

    def _teardown(self, keep_layers: bool = True, remove_layers: bool = False):
        """Stop the session; ``keep_layers=False`` also removes the helper layers (never
        the committed objects)."""
        self._encoder_jobs.cancel_pending()
        self._decoder_jobs.cancel_pending()
        self._commit_when_ready = False
        self._candidate_place = None
        self._volume_teardown()
        self._stop_recovery()
        if self.image_layer is not None:
            with contextlib.suppress(TypeError, ValueError, RuntimeError):
                self.image_layer.events.data.disconnect(self._on_image_data)
            self._unbind_layer_keys(self.image_layer)
        if self.annotator is not None:  # its stores may now leave the disk cache
            self.annotator.close_stores()
        self.annotator = None
        if remove_layers or not keep_layers:
            helpers = [self.points_layer, self.box_layer, *self.candidate_layers]
            self.points_layer = self.box_layer = None
            self.candidate_layers = []
            self.image_layer = None
            for layer in helpers:
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
        self._update_buttons()

    def _on_image_data(self, event=None):
        """The image layer got new data: start a new session on it (committed objects of
        the same shape are kept)."""
        layer = self.image_layer
        self._teardown(remove_layers=True)
        self._set_banner("The image data changed: its embeddings are computed again.")
        if layer is not None and layer in self.viewer.layers:
            self._setup(keep_banner=True)

    def _ensure_layers(self, objects=None):
        """Create the helper layers that are missing (or do not fit the image)."""
        ann, img = self.annotator, self.image_layer
        ndim = len(ann.shape)
        v = self.viewer
        self._syncing = True
        try:
            if (
                self.points_layer is None
                or self.points_layer not in v.layers
                or self.points_layer.ndim != ndim
            ):
                self.points_layer = L.make_points_layer(v, img, ndim)
                self.points_layer.events.data.connect(self._on_prompt_layer)
                self.points_layer.mouse_drag_callbacks.insert(0, self._negative_click_cb)
                self._bind_layer_keys(self.points_layer)
            if (
                self.box_layer is None
                or self.box_layer not in v.layers
                or self.box_layer.ndim != ndim
            ):
                self.box_layer = L.make_box_layer(v, img, ndim)
                self.box_layer.events.data.connect(self._on_prompt_layer)
                self._bind_layer_keys(self.box_layer)
            for layer in (self.points_layer, self.box_layer):
                L.set_geometry(layer, L.geometry(img))
            alive = [c for c in self.candidate_layers if c in v.layers and c.ndim == ndim]
            if len(alive) != 3:
                for c in alive:
                    v.layers.remove(c)
                size = ann.display_size()
                self.candidate_layers = [
                    L.make_candidate_layer(v, img, i, ann.key, ann.shape, size) for i in range(3)
                ]
                self._candidate_place = (ann.key, size)
                for c in self.candidate_layers:
                    self._bind_layer_keys(c)
            if self.objects_layer is not None and (
                self.objects_layer not in v.layers or self.objects_layer.data is not ann.labels
            ):
                self.objects_layer = None
            if self.objects_layer is None:
                self.objects_layer = (
                    objects if objects is not None else L.make_objects_layer(v, img, ann.labels)
                )
                if self.objects_layer.data is not ann.labels:
                    self.objects_layer.data = ann.labels
            # keep the prompt layers above the candidates and objects
            for layer in (self.box_layer, self.points_layer):
                i = v.layers.index(layer)
                if i != len(v.layers) - 1:
                    v.layers.move(i, len(v.layers))
            L.write_points(self.points_layer, ann.all_prompts())
            L.write_boxes(self.box_layer, ann.all_prompts())
        finally:
            self._syncing = False

    # ============================================================== slices
    def _on_dims(self, event=None):
        ann = self.annotator
        if ann is None or self.image_layer is None:
            return
        key, reason = L.slice_key(self.viewer, self.image_layer, ann.shape)
        if key is None:
            self._set_status(reason)
            return
        changed = ann.set_slice(key)
        self._volume_on_dims(key)
        if changed or not self.candidate_layers:
            self._ensure_layers()
            self._place_candidate_layers(ann.display_size(), force=True)
        self._show_candidates()
        if ann.has_embedding():
            self._set_status(self._ready_text())
            self._request_decode()
        else:
            self._request_embedding()

    def _request_embedding(self):
        ann = self.annotator
        key = ann.key
        where = describe_key(key, _axis_letters(len(ann.shape)))
        self._set_status(f"embedding {where}... (prompts wait; the UI stays live)")

        def prepare():
            if ann is not self.annotator or key != ann.key or ann.has_embedding(key):
                return None  # stale: the user has moved on
            return partial(ann.compute_embedding, key)

        self._encoder_jobs.submit(
            prepare,
            partial(self._on_embedded, ann, key),
            self._on_worker_error,
            desc=f"SAM: embedding {where}",
        )

    def _on_embedded(self, ann, key, _embedding):
        if ann is not self.annotator or key != ann.key:
            return
        self._set_status(self._ready_text())
        self._request_decode()

    def _ready_text(self):
        ann = self.annotator
        if ann.prompts.is_empty:
            return "ready: click on the object to add a point, or draw a box (B)"
        return "ready"

    # ============================================================== prompts
    def _negative_click_cb(self, layer, event):
        """Shift-click or right-click in add mode adds a negative point."""
        if layer.mode != "add" or not ("Shift" in event.modifiers or event.button == 2):
            return
        previous = layer.feature_defaults["label"][0]
        layer.feature_defaults["label"] = L.NEGATIVE
        self._negative_click = True
        yield
        while event.type == "mouse_move":
            yield

        # napari's add-point callback runs after this one on release; restore afterwards
        def restore():
            if self.points_layer is layer:
                layer.feature_defaults["label"] = previous
            self._negative_click = False

        QTimer.singleShot(0, restore)

    def _on_prompt_layer(self, event=None):
        if self._syncing or self.annotator is None:
            return
        action = getattr(event, "action", None)
        if action is not None and str(action) not in ("added", "removed", "changed"):
            return
        ann = self.annotator
        try:
            pts, labels = L.read_points(self.points_layer, ann.key)
            box = L.read_box(self.box_layer, ann.key)
            changed = ann.set_prompts(pts, labels, box)
        except ValueError as e:
            self._set_banner(str(e))
            self._sync_prompt_layers()
            return
        self._set_banner("")
        if event is not None and event.source is self.box_layer:
            self._sync_prompt_layers()  # one box per object: drop older rectangles
        if changed:
            self._after_prompt_change()

    def _after_prompt_change(self):
        ann = self.annotator
        if ann.prompts.is_empty:
            self._show_candidates()
            self._set_status(self._ready_text())
        elif ann.waiting_for_embedding:
            self._set_status("embedding... your prompts are used as soon as it is ready")
        self._request_decode()
        self._update_buttons()

    def _sync_prompt_layers(self):
        ann = self.annotator
        if ann is None:
            return
        self._syncing = True
        try:
            if (
                self.points_layer is None
                or self.points_layer not in self.viewer.layers
                or self.box_layer is None
                or self.box_layer not in self.viewer.layers
            ):
                self._ensure_layers()
            L.write_points(self.points_layer, ann.all_prompts())
            L.write_boxes(self.box_layer, ann.all_prompts())
        finally:
            self._syncing = False

    # ============================================================ candidates
    def _on_parts_toggled(self, checked: bool):
        if self.annotator is not None:
            self.annotator.clicked_parts_only = checked
            self._request_decode()

    def _request_decode(self):
        ann = self.annotator
        if ann is None:
            return

        def prepare():
            if ann is not self.annotator:
                return None
            req = ann.prediction_request()
            if req is None:
                self._show_candidates()
                return None
            return partial(self._timed_run, ann, req)

        self._decoder_jobs.submit(
            prepare,
            partial(self._on_decoded, ann),
            self._on_worker_error,
            inline=self._decode_inline(),
        )

    def _timed_run(self, ann, req):
        # CPU time of the calling thread: what the call costs, whatever else the machine
        # (or the Qt thread, while it redraws) is doing
        t = time.thread_time()
        out = ann.run(req)
        self._decode_ms.append(1e3 * (time.thread_time() - t))
        return out

    def _decode_inline(self) -> bool:
        """Run the next decoder call on the Qt thread (see :attr:`inline_decode_ms`)?"""
        busy = self._loader_jobs.busy or self._encoder_jobs.busy or self.volume_busy
        if len(self._decode_ms) < 2 or busy:  # other torch work would slow it down
            return False
        return float(np.median(self._decode_ms)) < self.inline_decode_ms

    def _on_decoded(self, ann, candidates):
        if ann is not self.annotator:
            return
        if ann.apply(candidates):
            self._show_candidates()
            if self._commit_when_ready and ann.up_to_date:
                self.commit()
                return
            if ann.up_to_date:
                i = ann.selected
                self._set_status(
                    f"candidate {i + 1} selected (IoU {candidates.ious[i]:.2f}); "
                    "1/2/3 to pick another, C to commit"
                )

    def _show_candidates(self):
        ann = self.annotator
        if ann is None or len(self.candidate_layers) != 3:
            return
        if any(c not in self.viewer.layers for c in self.candidate_layers):
            self._ensure_layers()
        cands = ann.candidates
        sel = ann.selected
        names = L.size_names(cands.masks) if cands is not None else [""] * 3
        size = tuple(cands.masks.shape[-2:]) if cands is not None else ann.display_size()
        self._place_candidate_layers(size)
        for i, layer in enumerate(self.candidate_layers):
            if cands is None:
                L.show_candidate(
                    layer, None, ann.key, ann.shape, f"SAM candidate {i + 1}", False, size
                )
                self.candidate_buttons[i].setText(f"{i + 1}")
            else:
                name = f"SAM candidate {i + 1}: {names[i]} IoU {cands.ious[i]:.2f}"
                L.show_candidate(layer, cands.masks[i], ann.key, ann.shape, name, i == sel, size)
                self.candidate_buttons[i].setText(f"{i + 1} {names[i]}\nIoU {cands.ious[i]:.2f}")
        self._thumbnails.start()
        if sel is not None:  # the selected candidate above the other two
            layers = self.viewer.layers
            top = max(layers.index(c) for c in self.candidate_layers)
            i = layers.index(self.candidate_layers[sel])
            if i != top:
                layers.move(i, top + 1)
        for i, b in enumerate(self.candidate_buttons):
            b.setChecked(sel == i)
            b.setEnabled(cands is not None)
        self._update_buttons()

    def _place_candidate_layers(self, size, force: bool = False):
        """Put the candidate layers on the current plane, holding masks of ``size`` (the
        plane's size, or a reduced one: each layer pixel then covers a block of image
        pixels; see :attr:`display_max_side`)."""
        ann = self.annotator
        place = (ann.key, tuple(size))
        if not force and place == self._candidate_place:
            return
        geo = L.plane_geometry(self.image_layer, ann.key, ann.shape, size)
        for layer in self.candidate_layers:
            L.set_geometry(layer, geo)
        self._candidate_place = place

    def _refresh_thumbnails(self):
        for layer in self.candidate_layers:
            if layer in self.viewer.layers:
                layer.refresh()

    def select_candidate(self, index: int):
        """Select candidate ``index`` (0, 1, 2) for the commit."""
        if self.annotator is None or self.annotator.candidates is None:
            return
        self.annotator.select(int(index))
        self._show_candidates()

    # =============================================================== actions
    def commit(self):
        """Commit the selected candidate (once the candidates match the prompts)."""
        ann = self.annotator
        if ann is None:
            self._set_status("nothing to commit: no image/model set up")
            return
        if not ann.prompts.is_empty and not ann.waiting_for_embedding and not ann.up_to_date:
            # the decoder is still on the latest prompts: commit when it delivers (no
            # torch on the Qt thread)
            self._commit_when_ready = True
            self._set_status("committing as soon as the candidates are up to date...")
            self._request_decode()
            return
        self._commit_when_ready = False
        if self._recovery_blocks_commit():
            self._after_commit(False)
            return
        job = ann.full_mask_job()
        if job is not None:
            # candidates shown at a reduced size (large planes): the full-resolution mask
            # is a torch upsampling of the logits (~0.3 s at 4096 x 4096), so it runs on
            # the torch thread and the commit follows on the Qt thread
            token, work = job
            self._set_status("committing (full-resolution mask)...")
            self._decoder_jobs.submit(
                lambda: work,
                partial(self._commit_full_mask, ann, token),
                self._on_worker_error,
            )
            return
        self._commit_now(ann)

    def _commit_full_mask(self, ann, token, mask):
        if ann is not self.annotator:
            return
        self._commit_now(ann, mask=mask, token=token)

    def _commit_now(self, ann, mask=None, token=None):
        label_id = self.label_id.value() or None
        try:
            record = ann.commit(
                label_id=label_id,
                overlap=self.overlap_combo.currentData(),
                mask=mask,
                token=token,
            )
        except (ValueError, TypeError) as e:
            self._set_status(str(e))
            self._after_commit(False)
            return
        self.label_id.setValue(0)
        self.objects_layer.refresh()
        self._sync_prompt_layers()
        self._show_candidates()
        self._autosave_change(f"committed object {record.label_id} ({record.n_pixels} px)")
        self._after_commit(True)

    def undo(self):
        if self._defer_history("undo"):
            return
        self._history(self.annotator.undo if self.annotator else None, "undone")

    def redo(self):
        if self._defer_history("redo"):
            return
        self._history(self.annotator.redo if self.annotator else None, "redone")

    def _history(self, step, verb):
        if step is None:
            return
        text = step()
        if text is None:
            self._set_status(f"nothing to be {verb}")
            return
        self.objects_layer.refresh()
        self._sync_prompt_layers()
        self._show_candidates()
        self._request_decode()
        self._autosave_change(f"{verb}: {text}")

    def clear(self):
        ann = self.annotator
        if ann is None or not ann.clear():
            return
        self._sync_prompt_layers()
        self._show_candidates()
        self._set_status(self._ready_text())

    def toggle_point_label(self):
        layer = self.points_layer
        if layer is None:
            return
        now = layer.feature_defaults["label"][0]
        new = L.NEGATIVE if now == L.POSITIVE else L.POSITIVE
        layer.feature_defaults["label"] = new
        self.point_mode.setText(f"Next point: {new} (T)")

    def toggle_box_mode(self):
        if self.points_layer is None or self.box_layer is None:
            return
        sel = self.viewer.layers.selection
        if sel.active is self.box_layer:
            sel.active = self.points_layer
            self.points_layer.mode = "add"
            self.box_button.setText("Draw box (B)")
        else:
            sel.active = self.box_layer
            self.box_layer.mode = "add_rectangle"
            self.box_button.setText("Add points (B)")

    # ============================================================== feedback
    def _on_worker_error(self, exc):
        self._set_banner(f"{type(exc).__name__}: {exc}")

    def _set_status(self, text: str):
        self.status.setText(text)

    def _set_banner(self, text: str):
        self.banner.setText(text)
        self.banner.setVisible(bool(text))

    @property
    def status_text(self) -> str:
        return self.status.text()

    @property
    def banner_text(self) -> str:
        return self.banner.text() if self.banner.isVisible() or self.banner.text() else ""

    def _update_buttons(self):
        ann = self.annotator
        self.commit_button.setEnabled(ann is not None and not ann.prompts.is_empty)
        self.undo_button.setEnabled(ann is not None and ann.can_undo)
        self.redo_button.setEnabled(ann is not None and ann.can_redo)
        self.clear_button.setEnabled(ann is not None and not ann.prompts.is_empty)
        self._update_volume_buttons()

    def is_idle(self) -> bool:
        """No model load, embedding, decoding, propagation, precompute or recovery-folder
        work runs or waits."""
        return not (
            self._loader_jobs.busy
            or self._encoder_jobs.busy
            or self._decoder_jobs.busy
            or self.volume_busy
            or self._recovery_jobs
        )

    # ====================================================== recovery (autosave)
    def _init_recovery(self, threaded):
        """Autosave to the image's recovery folder and the restore offer (see
        :class:`napari_sam.io.recovery.Autosave`); all folder work on one thread, in order."""
        self._autosave_pool = ThreadPoolExecutor(1, "napari-sam-autosave") if threaded else None
        self._autosave = None  # Autosave of the current image
        self._autosave_ready = False  # lookup done and no restore offer pending
        self._recovery = None  # the Lookup whose restore is offered
        self._recovery_jobs = 0  # futures whose result has not reached the Qt thread yet
        self._relay.connect(self._on_relay)
        self.recovery_text = QLabel()
        self.recovery_text.setWordWrap(True)
        self.recovery_text.setStyleSheet(
            "QLabel { background: #1e3a5f; color: white; padding: 4px; border-radius: 3px; }"
        )
        self.restore_button = QPushButton("Restore")
        self.discard_button = QPushButton("Discard")
        self.restore_button.clicked.connect(self.restore_recovered)
        self.discard_button.clicked.connect(self.discard_recovered)
        self.recovery_row = QWidget()
        lay = QVBoxLayout(self.recovery_row)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.recovery_text)
        buttons = QHBoxLayout()
        buttons.addWidget(self.restore_button)
        buttons.addWidget(self.discard_button)
        lay.addLayout(buttons)
        self.recovery_row.hide()
        main = self.layout()
        main.insertWidget(main.indexOf(self.banner) + 1, self.recovery_row)
        if self._autosave_pool is not None:  # queued writes still finish after closing
            self.destroyed.connect(partial(_let_writes_finish, self._autosave_pool))

    def _track(self, future, callback):
        """Run ``callback(future)`` on the Qt thread once ``future`` is done."""
        self._recovery_jobs += 1
        relay = self._relay

        def done(f):
            with contextlib.suppress(RuntimeError):  # the widget is gone
                relay.emit((callback, f))

        future.add_done_callback(done)

    def _on_relay(self, payload):
        callback, future = payload
        self._recovery_jobs -= 1
        callback(future)

    def _start_recovery(self, layer, data):
        from napari_sam.io.recovery import Autosave

        source = getattr(getattr(layer, "source", None), "path", None) or ""
        saver = Autosave(
            data,
            self.annotator.shape,
            name=layer.name,
            source=str(source),
            executor=self._autosave_pool,
        )
        self._autosave = saver
        self._autosave_ready = False
        self._track(saver.lookup(self.annotator.labels), partial(self._on_lookup, saver))

    def _stop_recovery(self):
        self._autosave = None
        self._autosave_ready = False
        self._recovery = None
        self.recovery_row.hide()

    def _on_lookup(self, saver, future):
        if saver is not self._autosave:
            return  # the session has changed meanwhile
        exc = future.exception()
        if exc is not None:
            self._autosave = None
            self._autosave_ready = True
            self._set_banner(
                f"Autosave is off for this image: could not read its recovery folder "
                f"({type(exc).__name__}: {exc}). Save your objects with File > Save Selected "
                "Layers, or set NAPARI_SAM_RECOVERY to a folder you can write to."
            )
            return
        found = future.result()
        if not found.offer:
            self._autosave_ready = True
            return
        self._recovery = found
        n = len(found.state.object_ids)
        damaged = len(found.state.damaged)
        self.recovery_text.setText(
            f"An earlier session on this image left {n} object(s) that were not saved "
            f"(recovery folder {found.path})"
            + (f"; {damaged} damaged record(s) are skipped" if damaged else "")
            + ". Restore them, or discard them before committing new objects."
        )
        self.restore_button.setText(f"Restore {n} objects")
        self.recovery_row.show()

    def _recovery_blocks_commit(self) -> bool:
        if self._autosave is not None and not self._autosave_ready:
            self._set_status(
                "first choose 'Restore' or 'Discard' for the objects of the earlier session "
                "(above), then commit"
                if self._recovery is not None
                else "checking the recovery folder of this image; commit again in a moment"
            )
            return True
        return False

    def restore_recovered(self):
        """Put the objects of the offered earlier session back (layer and records)."""
        from napari_sam.annotator import from_session_object

        found, ann = self._recovery, self.annotator
        if found is None or ann is None:
            return
        state = found.state
        try:
            records = [from_session_object(o, ann.shape) for o in state.session.objects]
            if ann.labels.any():  # never lose what is on screen: keep it as a layer
                self.viewer.add_labels(
                    np.array(ann.labels),
                    name=f"{self.image_layer.name} SAM objects before restore",
                    **L.geometry(self.image_layer),
                )
            ann.restore_objects(state.labels, records)
        except (ValueError, TypeError) as e:
            self._set_banner(f"Could not restore: {e}")
            return
        self._recovery = None
        self.recovery_row.hide()
        self._autosave_ready = True
        self._track(self._autosave.accept(), self._on_recovery_write)
        self.objects_layer.refresh()
        self._update_buttons()
        self._set_status(f"restored {len(state.object_ids)} objects from {found.path}")

    def discard_recovered(self):
        """Delete the offered earlier session's records (the user chose to)."""
        found, ann = self._recovery, self.annotator
        if found is None or ann is None:
            return
        self._recovery = None
        self.recovery_row.hide()
        self._autosave_ready = True
        self._track(
            self._autosave.discard(labels_nonempty=bool(ann.labels.any())),
            self._on_recovery_write,
        )
        self._set_status(f"discarded the {len(found.state.object_ids)} earlier objects")

    def _autosave_change(self, text):
        """Write the annotator's latest labels change to the recovery folder; ``text``
        (what happened) is reported as done once the write is on disk."""
        from napari_sam.annotator import autosave_change

        saver = self._autosave
        future = None
        if saver is not None and self._autosave_ready and self.annotator is not None:
            future = autosave_change(saver, self.annotator)
        if future is None:
            self._set_status(text)
            return
        pending = f"{text}; autosaving..."
        self._set_status(pending)

        def done(f):
            self._on_recovery_write(f)
            if f.exception() is None and self.status_text == pending:
                self._set_status(f"{text}, autosaved")

        self._track(future, done)

    def _on_recovery_write(self, future):
        exc = future.exception()
        if exc is None:
            if self.banner_text.startswith("Autosave failed"):
                self._set_banner("")
            return
        self._set_banner(
            f"Autosave failed: {exc}. Your objects are in the layer but not protected "
            "against a crash: set NAPARI_SAM_RECOVERY to a folder you can write to, or save "
            "the layer (File > Save Selected Layers). The next commit tries again."
        )


def _prefer_passive_openmp():
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``).

    The widget's torch thread shares the cores with napari's own work (and software
    rendering on machines without a GPU); spinning OpenMP workers of an idle thread team
    made the decoder several times slower on a 2-core machine (docs/performance.md). Only
    set when torch is not imported yet (OpenMP reads it once) and the user has not chosen.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _axis_letters(n):
    return "zyx"[-n:] if n <= 3 else None


def _let_writes_finish(pool, *_):
    pool.shutdown(wait=False)  # queued autosave writes still run; nothing new is accepted


def _disconnect(pairs, viewer, keys, runners, executor, *_):
    """On widget deletion: stop callbacks into it (viewer events, key bindings, workers)."""
    for r in runners:
        r.close()
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)
    for emitter, cb in pairs:
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            emitter.disconnect(cb)
    for key, fn in keys.items():
        if viewer.keymap.get(_coerce(key)) is fn:
            viewer.keymap.pop(_coerce(key), None)


def _coerce(key):
    from napari.utils.key_bindings import coerce_keybinding

    return coerce_keybinding(key)

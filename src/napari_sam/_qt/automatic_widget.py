"""Dock widget "Segment all": automatic instance segmentation of the current slice or stack.

Thin glue: reads the chosen image layer and the parameters, runs
:func:`napari_sam.automatic.segment_slice` / :func:`~napari_sam.automatic.segment_volume`
in a worker thread (progress bar, cancel), and writes the result into a labels layer named
"automatic" that the user can correct and commit from. No torch at import time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:
    import napari

LAYER_NAME = "automatic"


class _Signals(QObject):
    progress = Signal(int, int)


def _spin(lo, hi, value, tip, step=None, decimals=None):
    w = QDoubleSpinBox() if decimals is not None else QSpinBox()
    w.setRange(lo, hi)
    if decimals is not None:
        w.setDecimals(decimals)
        w.setSingleStep(step or 0.01)
    w.setValue(value)
    w.setToolTip(tip)
    return w


class AutomaticWidget(QWidget):
    """ "Segment all" dock. ``predictor_factory`` returns a SamPredictor (called once, in the
    worker thread); default: the model named in the "model" field, else the default one."""

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        predictor_factory: Callable[[], Any] | None = None,
    ):
        super().__init__()
        self.viewer = napari_viewer
        self._factory = predictor_factory
        self._predictor = None
        self._worker = None
        self._cancel = threading.Event()
        self._signals = _Signals()
        self._signals.progress.connect(self._on_progress)

        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to segment (gray 2-D/3-D or RGB 2-D)")
        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("default model")
        self.model_edit.setToolTip("Model name (see `napari-sam models`) or checkpoint path")
        self.points = _spin(
            4,
            128,
            32,
            "Grid of points per side; more finds smaller objects but costs time (quadratic)",
        )
        # lowest value = "model default": the model's recommended threshold (SAM's 0.88 /
        # 0.95 for official models; the bundled model's own, lower, calibrated values)
        self.iou = _spin(
            -0.01,
            1.0,
            -0.01,
            "Keep masks whose predicted IoU is at least this ('model default': the value "
            "recommended for the model, 0.88 for official SAM)",
            decimals=2,
        )
        self.stability = _spin(
            -0.01,
            1.0,
            -0.01,
            "Keep masks whose stability score (agreement of the mask at logit thresholds "
            "-1 and +1) is at least this ('model default': 0.95 for official SAM)",
            decimals=2,
        )
        for spin in (self.iou, self.stability):
            spin.setSpecialValueText("model default")
        self.min_area = _spin(
            0,
            10**7,
            25,
            "Fill holes, remove islands and drop objects smaller than this many pixels",
        )
        self.max_area = _spin(
            0.01,
            1.0,
            0.5,
            "Drop masks covering more than this fraction of the image (usually the background)",
            decimals=2,
        )
        self.crops = _spin(
            0,
            3,
            0,
            "Extra layers of zoomed-in crops for small objects (each "
            "crop runs the image encoder: slow)",
        )
        self.exhaustive = QCheckBox("prompt every point")
        self.exhaustive.setToolTip(
            "Off (default): skip grid points inside masks already "
            "found (much faster). On: SAM's exhaustive search."
        )
        self.min_z = _spin(1, 1000, 2, "Stack: drop 3-D objects present in fewer slices")
        self.overlap = _spin(
            0.05,
            1.0,
            0.5,
            "Stack: overlap (fraction of the smaller "
            "instance) needed to link instances of neighbouring slices",
            decimals=2,
        )

        form = QFormLayout()
        form.addRow("image", self.image_combo)
        form.addRow("model", self.model_edit)
        form.addRow("points per side", self.points)
        form.addRow("min predicted IoU", self.iou)
        form.addRow("min stability", self.stability)
        form.addRow("min area (px)", self.min_area)
        form.addRow("max area fraction", self.max_area)
        form.addRow("crop layers", self.crops)
        form.addRow("", self.exhaustive)
        form.addRow("stack: min z extent", self.min_z)
        form.addRow("stack: link overlap", self.overlap)

        self.slice_btn = QPushButton("Segment slice")
        self.slice_btn.setToolTip("Segment the slice shown in the viewer")
        self.stack_btn = QPushButton("Segment stack")
        self.stack_btn.setToolTip("Segment every slice and link them into 3-D objects")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.slice_btn.clicked.connect(lambda: self.run("slice"))
        self.stack_btn.clicked.connect(lambda: self.run("stack"))
        self.cancel_btn.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        for b in (self.slice_btn, self.stack_btn, self.cancel_btn):
            buttons.addWidget(b)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch()

        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)
        self.model_edit.editingFinished.connect(self._forget_predictor)
        self._refresh_layers()

    # -- state ------------------------------------------------------------------------------
    def _refresh_layers(self, *_):
        from napari.layers import Image

        current = self.image_combo.currentText()
        names = [ly.name for ly in self.viewer.layers if isinstance(ly, Image)]
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)

    def _forget_predictor(self):
        if self._factory is None:
            self._predictor = None

    def _fields(self) -> dict:
        """The fields' values as AutomaticParams keyword arguments; thresholds left at
        "model default" are not included."""
        given = {
            k: spin.value()
            for k, spin in (
                ("pred_iou_thresh", self.iou),
                ("stability_score_thresh", self.stability),
            )
            if spin.value() >= 0
        }
        return {
            **given,
            "points_per_side": self.points.value(),
            "min_region_area": self.min_area.value(),
            "min_object_area": self.min_area.value(),
            "max_area_fraction": self.max_area.value(),
            "crop_n_layers": self.crops.value(),
            "skip_covered_points": not self.exhaustive.isChecked(),
        }

    def params(self, model=None):
        """AutomaticParams from the fields; thresholds left at "model default" come from
        ``model`` (see :meth:`napari_sam.automatic.AutomaticParams.for_model`)."""
        from napari_sam.automatic import AutomaticParams

        return AutomaticParams.for_model(model, **self._fields())

    def stitch_params(self):
        from napari_sam.stitching import StitchParams

        return StitchParams(
            overlap_threshold=self.overlap.value(), min_z_extent=self.min_z.value()
        )

    def _image_layer(self):
        name = self.image_combo.currentText()
        if not name or name not in self.viewer.layers:
            raise ValueError("choose an image layer first")
        return self.viewer.layers[name]

    def _current_z(self, layer) -> int:
        world = self.viewer.dims.point[-layer.ndim]
        z = round((world - layer.translate[0]) / layer.scale[0])
        return int(np.clip(z, 0, layer.data.shape[0] - 1))

    def _get_predictor(self):
        if self._predictor is None:
            if self._factory is not None:
                self._predictor = self._factory()
            else:
                from napari_sam import SamPredictor, load_model

                self._predictor = SamPredictor(load_model(self.model_edit.text().strip() or None))
        return self._predictor

    # -- running ----------------------------------------------------------------------------
    def run(self, what: str):
        """Start segmenting ``what`` = "slice" (current slice) or "stack"."""
        from napari.qt.threading import create_worker

        try:
            layer = self._image_layer()
            job = self._job(layer, what)
        except ValueError as e:
            self.status.setText(str(e))
            return None
        self._cancel.clear()
        self._set_running(True)
        self.status.setText(f"segmenting {what} of {layer.name} ...")
        self._worker = create_worker(job)
        self._worker.returned.connect(lambda res: self._show(layer, res))
        self._worker.errored.connect(self._on_error)
        self._worker.finished.connect(lambda: self._set_running(False))
        self._worker.start()
        return self._worker

    def _job(self, layer, what: str):
        """A function for the worker thread returning (kind, z, labels); a cancelled run
        returns ("cancelled", None, None) rather than raising in the thread."""
        from napari_sam.automatic import (
            AutomaticParams,
            Cancelled,
            segment_slice,
            segment_volume,
        )

        data = layer.data[0] if layer.multiscale else layer.data
        rgb = bool(getattr(layer, "rgb", False))
        spatial = data.ndim - (1 if rgb else 0)
        self.params()  # bad values fail here, before the worker starts
        fields = self._fields()  # read on the Qt thread, used in the worker
        stitch = self.stitch_params()
        report = self._signals.progress.emit
        cancelled = self._cancel.is_set
        if what == "stack":
            if spatial != 3 or rgb:
                raise ValueError(
                    f"'Segment stack' needs a gray 3-D image; {layer.name} has shape {data.shape}"
                )

            def job():
                predictor = self._get_predictor()
                try:
                    lab = segment_volume(
                        data,
                        predictor,
                        AutomaticParams.for_model(predictor, **fields),
                        stitch=stitch,
                        progress=report,
                        should_cancel=cancelled,
                    )
                except Cancelled:
                    return ("cancelled", None, None)
                return ("stack", None, lab)

            return job
        if spatial == 2:
            z = None
        elif spatial == 3 and not rgb:
            z = self._current_z(layer)
        else:
            raise ValueError(
                f"cannot segment {layer.name} with shape {data.shape}: expected "
                "a 2-D, RGB or 3-D gray image"
            )

        def job():
            img = np.asarray(data if z is None else data[z])
            predictor = self._get_predictor()
            try:
                lab = segment_slice(
                    predictor,
                    img,
                    AutomaticParams.for_model(predictor, **fields),
                    progress=report,
                    should_cancel=cancelled,
                )
            except Cancelled:
                return ("cancelled", None, None)
            return ("slice", z, lab)

        return job

    def cancel(self):
        self._cancel.set()
        self.status.setText("cancelling ...")

    def _set_running(self, running: bool):
        self.slice_btn.setEnabled(not running)
        self.stack_btn.setEnabled(not running)
        self.cancel_btn.setEnabled(running)

    def _on_progress(self, done: int, total: int):
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)

    def _on_error(self, err):
        self.status.setText(f"error: {err}")

    def _show(self, image_layer, result):
        kind, z, lab = result
        if kind == "cancelled":
            self.status.setText("cancelled")
            return
        shape = image_layer.data.shape[:-1] if image_layer.rgb else image_layer.data.shape
        ndim = len(shape)
        existing = None
        if LAYER_NAME in self.viewer.layers:  # LayerList has no .get
            existing = self.viewer.layers[LAYER_NAME]
        if existing is not None and tuple(existing.data.shape) != tuple(shape):
            self.viewer.layers.remove(existing)
            existing = None
        if kind == "stack" or ndim == 2:
            data = lab
        else:
            if existing is None:
                data = np.zeros(shape, np.int32)
            else:
                data = np.array(existing.data, dtype=np.int32)
            other = np.delete(data, z, axis=0)
            offset = int(other.max(initial=0))  # new ids, distinct from other slices'
            data[z] = np.where(lab > 0, lab + offset, 0)
        if existing is None:
            self.viewer.add_labels(
                data,
                name=LAYER_NAME,
                scale=image_layer.scale[-ndim:],
                translate=image_layer.translate[-ndim:],
            )
        else:
            existing.data = data
        n = len(np.unique(lab)) - 1
        where = f" (slice {z})" if z is not None else ""
        self.status.setText(f"{n} objects{where} -> layer '{LAYER_NAME}'")

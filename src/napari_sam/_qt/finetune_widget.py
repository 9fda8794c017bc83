"""Dock widget "Fine-tune SAM": adapt a model to your annotated images.

Thin glue around :func:`napari_sam.finetune.finetune`: pick (image, labels) layer pairs
as ground truth, the base model, what to train, the number of steps and the held-out
fraction; the run happens in a worker thread with a progress bar (also in napari's
activity dock, where it can be cancelled) and a Cancel button. The held-out mean IoU
before and after is shown, the checkpoint is saved to the chosen path (an existing file
is only replaced when "overwrite" is ticked) and added to the user model list
(:mod:`napari_sam.model.user_models`) that model pickers read. No torch at import time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
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

TRAIN_CHOICES = (
    ("decoder", "mask decoder"),
    ("decoder+prompt", "decoder + prompt encoder"),
    ("all", "everything, incl. image encoder (slow)"),
)
STAGE_TEXT = {
    "before": "evaluating the base model",
    "train": "training",
    "after": "evaluating the fine-tuned model",
    "save": "saving",
}


@dataclass(frozen=True)
class BaseModel:
    """A model to start from: ``load()`` returns a SAM model (called in the worker)."""

    label: str
    name: str  # recorded in the checkpoint's sidecar
    load: Callable[[], Any]


def default_base_models() -> list[BaseModel]:
    """Models available without a download: your models, the bundled one, cached ones."""
    from napari_sam.model import registry
    from napari_sam.model.user_models import list_user_models

    out = []
    for m in list_user_models():
        out.append(BaseModel(f"{m.name} (your model)", m.name, _loader(m.path)))
    try:
        from napari_sam.model.small_encoder import default_weights

        bundled = default_weights()
    except ImportError:  # pragma: no cover - torch missing
        bundled = None
    if bundled is not None and bundled.is_file():
        out.append(BaseModel("nsam_s (bundled default)", "nsam_s", _loader(bundled)))
    for name in registry.MODELS:
        try:
            cached = registry.cached_path(name).is_file()
        except Exception:  # an unusable cache folder must not break the widget
            cached = False
        if cached:
            out.append(BaseModel(f"{name} (cached)", name, _loader(name)))
    return out


def _loader(name_or_path) -> Callable[[], Any]:
    def load():
        from napari_sam.model.registry import load_model

        return load_model(name_or_path, device="cpu")

    return load


class _Signals(QObject):
    progress = Signal(object)


def _spin(lo, hi, value, tip, decimals=None, step=None):
    w = QDoubleSpinBox() if decimals is not None else QSpinBox()
    w.setRange(lo, hi)
    if decimals is not None:
        w.setDecimals(decimals)
    if step is not None:
        w.setSingleStep(step)
    w.setValue(value)
    w.setToolTip(tip)
    return w


class FinetuneWidget(QWidget):
    """The "Fine-tune SAM" dock.

    Args:
        napari_viewer: the viewer.
        base_models: models offered as a starting point (default
            :func:`default_base_models`); a "Browse..." button adds a checkpoint file.
        threaded: run in a worker thread (False: in the calling thread, for debugging).

    Signals:
        model_saved(str): the path of a checkpoint just saved and added to the list.
    """

    model_saved = Signal(str)

    def __init__(
        self,
        napari_viewer: napari.Viewer,
        base_models: list[BaseModel] | None = None,
        threaded: bool = True,
    ):
        super().__init__()
        self.viewer = napari_viewer
        self.threaded = threaded
        self.base_models = list(default_base_models() if base_models is None else base_models)
        self.result = None  # the last FinetuneResult
        self._worker = None
        self._running = False
        self._cancel = threading.Event()
        self._pbar = None
        self._stage = None
        self._signals = _Signals()
        self._signals.progress.connect(self._on_progress)

        # image/labels pairs
        self.pairs_grid = QGridLayout()
        self.pairs_grid.addWidget(QLabel("image"), 0, 0)
        self.pairs_grid.addWidget(QLabel("labels (ground truth)"), 0, 1)
        self.pair_rows: list[tuple[QComboBox, QComboBox]] = []
        add = QPushButton("+ pair")
        add.setToolTip("Add another image and its labels")
        add.clicked.connect(lambda: self.add_pair())
        remove = QPushButton("- pair")
        remove.clicked.connect(self.remove_pair)
        pair_buttons = QHBoxLayout()
        pair_buttons.addWidget(add)
        pair_buttons.addWidget(remove)

        self.model_combo = QComboBox()
        self.model_combo.setToolTip("The model to start from (it is not changed)")
        for m in self.base_models:
            self.model_combo.addItem(m.label)
        browse_model = QPushButton("Browse...")
        browse_model.setToolTip("Start from a checkpoint file")
        browse_model.clicked.connect(self._browse_model)
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(browse_model)

        self.train_combo = QComboBox()
        for key, text in TRAIN_CHOICES:
            self.train_combo.addItem(text, key)
        self.train_combo.setToolTip(
            "What is trained. With a frozen image encoder every image is encoded once."
        )
        self.steps = _spin(1, 100_000, 200, "Training steps (each: a few images, 6 objects)")
        self.held_out = _spin(
            0.0,
            0.9,
            0.2,
            "Fraction of the images (4 or more images) or of the objects kept out of "
            "training to measure IoU before and after (0: no measurement)",
            decimals=2,
            step=0.05,
        )
        self.lr = _spin(1e-5, 0.1, 5e-4, "Peak learning rate", decimals=5, step=1e-4)
        self.path_edit = QLineEdit()
        self.path_edit.setPlaceholderText("where to save the model (.pt)")
        browse_out = QPushButton("Browse...")
        browse_out.clicked.connect(self._browse_out)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(browse_out)
        self.overwrite = QCheckBox("overwrite an existing file")
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name in the model list (default: file name)")

        form = QFormLayout()
        form.addRow("base model", model_row)
        form.addRow("train", self.train_combo)
        form.addRow("steps", self.steps)
        form.addRow("held-out fraction", self.held_out)
        form.addRow("learning rate", self.lr)
        form.addRow("save to", path_row)
        form.addRow("", self.overwrite)
        form.addRow("name", self.name_edit)

        self.run_btn = QPushButton("Fine-tune")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_btn)
        buttons.addWidget(self.cancel_btn)
        self.progress_bar = QProgressBar()
        self.progress_bar.setVisible(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.results = QLabel("")
        self.results.setWordWrap(True)

        layout = QVBoxLayout(self)
        layout.addLayout(self.pairs_grid)
        layout.addLayout(pair_buttons)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(self.results)
        layout.addStretch(1)

        self.add_pair()
        self.viewer.layers.events.inserted.connect(self._refresh_layers)
        self.viewer.layers.events.removed.connect(self._refresh_layers)

    # ----------------------------------------------------------------- layers
    def _layers(self, kind: str) -> list:
        from napari.layers import Image, Labels

        cls = Image if kind == "image" else Labels
        return [layer for layer in self.viewer.layers if isinstance(layer, cls)]

    def add_pair(self, image: str | None = None, labels: str | None = None) -> None:
        """Add a row; default: the first unused image layer and unused labels of its shape."""
        row = len(self.pair_rows) + 1
        img, lab = QComboBox(), QComboBox()
        self.pairs_grid.addWidget(img, row, 0)
        self.pairs_grid.addWidget(lab, row, 1)
        used = {c.currentText() for c, _ in self.pair_rows}
        self.pair_rows.append((img, lab))
        first_unused = next((x.name for x in self._layers("image") if x.name not in used), None)
        self._fill(img, "image", image or first_unused)
        self._fill(lab, "labels", labels or self._matching_labels(img.currentText(), lab))
        img.currentTextChanged.connect(
            lambda name, lab=lab: self._fill(lab, "labels", self._matching_labels(name, lab))
        )

    def remove_pair(self) -> None:
        if len(self.pair_rows) <= 1:
            return
        for w in self.pair_rows.pop():
            self.pairs_grid.removeWidget(w)
            w.deleteLater()

    def _matching_labels(self, image_name: str, combo: QComboBox | None = None) -> str | None:
        """A labels layer of the image's shape, preferring one no other row uses."""
        try:
            image = self.viewer.layers[image_name]
        except (KeyError, ValueError):
            return None
        shape = tuple(image.data.shape[:-1] if image.rgb else image.data.shape)
        if image.multiscale:
            shape = tuple(image.data[0].shape[:-1] if image.rgb else image.data[0].shape)
        used = {b.currentText() for _, b in self.pair_rows if b is not combo}
        fits = [x.name for x in self._layers("labels") if tuple(x.data.shape) == shape]
        unused = [n for n in fits if n not in used]
        return (unused or fits or [None])[0]

    def _fill(self, combo: QComboBox, kind: str, select: str | None = None) -> None:
        keep = select or combo.currentText()
        combo.blockSignals(True)
        combo.clear()
        combo.addItems([layer.name for layer in self._layers(kind)])
        if keep:
            i = combo.findText(keep)
            if i >= 0:
                combo.setCurrentIndex(i)
        combo.blockSignals(False)

    def _refresh_layers(self, event=None) -> None:
        for img, lab in self.pair_rows:
            self._fill(img, "image")
            keep = lab.currentText() or self._matching_labels(img.currentText(), lab)
            self._fill(lab, "labels", keep)

    # ----------------------------------------------------------------- inputs
    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Base model checkpoint", "", "Checkpoints (*.pt *.pth);;All files (*)"
        )
        if path:
            self.add_base_model(BaseModel(f"{Path(path).name} (file)", path, _loader(path)))

    def add_base_model(self, model: BaseModel) -> None:
        """Offer ``model`` and select it."""
        self.base_models.append(model)
        self.model_combo.addItem(model.label)
        self.model_combo.setCurrentIndex(self.model_combo.count() - 1)

    def _browse_out(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save the fine-tuned model", "", "Checkpoints (*.pt)"
        )
        if path:
            if not path.endswith((".pt", ".pth")):
                path += ".pt"
            self.path_edit.setText(path)
            # the dialog itself asked before choosing an existing file
            self.overwrite.setChecked(Path(path).exists())

    def _pairs(self) -> tuple[list, list, list[str]]:
        images, labels, names = [], [], []
        for img_combo, lab_combo in self.pair_rows:
            if not img_combo.currentText() and not lab_combo.currentText():
                continue
            if not img_combo.currentText() or not lab_combo.currentText():
                raise ValueError("every row needs an image layer and a labels layer")
            image = self.viewer.layers[img_combo.currentText()]
            lab = self.viewer.layers[lab_combo.currentText()]
            data = image.data[0] if image.multiscale else image.data
            ldata = lab.data[0] if lab.multiscale else lab.data
            if isinstance(ldata, np.ndarray):  # a snapshot: painting may go on meanwhile
                ldata = ldata.copy()
            images.append(data)
            labels.append(ldata)
            names.append(f"{image.name} / {lab.name}")
        if not images:
            raise ValueError("add an image layer and a labels layer with your annotations")
        return images, labels, names

    def config(self):
        """The :class:`~napari_sam.finetune.FinetuneConfig` of the controls."""
        from napari_sam.finetune import FinetuneConfig

        return FinetuneConfig(
            steps=int(self.steps.value()),
            train=self.train_combo.currentData(),
            held_out=float(self.held_out.value()),
            lr=float(self.lr.value()),
        )

    # ----------------------------------------------------------------- running
    def is_idle(self) -> bool:
        return not self._running

    def run(self) -> None:
        """Start fine-tuning with the current settings (errors go to the status line)."""
        if self._running:
            return
        from napari_sam.finetune import check_save_path

        try:
            images, labels, _ = self._pairs()
            if self.model_combo.currentIndex() < 0:
                raise ValueError("no base model: choose a checkpoint with Browse...")
            text = self.path_edit.text().strip()
            if not text:
                raise ValueError("choose where to save the fine-tuned model")
            path = check_save_path(text, overwrite=self.overwrite.isChecked())
            cfg = self.config()
            cfg.check()
        except (ValueError, TypeError, OSError) as e:
            self._set_status(f"Cannot start: {e}", error=True)
            return
        base = self.base_models[self.model_combo.currentIndex()]
        self._cancel.clear()
        self._running = True
        self.result = None
        self.results.setText("")
        self.run_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress_bar.setVisible(True)
        self.progress_bar.setRange(0, 0)
        self._start_progress()
        self._set_status(f"Loading {base.name} ...")
        overwrite = self.overwrite.isChecked()

        def job():
            from napari_sam.finetune import finetune

            model = base.load()
            return finetune(
                model,
                images,
                labels,
                cfg,
                save_to=path,
                overwrite=overwrite,
                base_name=base.name,
                progress=self._signals.progress.emit,
                should_stop=self._should_stop,
            )

        if not self.threaded:
            try:
                self._on_done(job())
            except Exception as e:  # noqa: BLE001 - shown to the user
                self._on_error(e)
            self._on_finished()
            return
        from napari.qt.threading import create_worker

        # errors are shown in the status line (and unexpected ones logged), not re-raised
        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_done)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        worker.start()

    def cancel(self) -> None:
        """Ask the run to stop (after the current step); nothing is saved."""
        if self._running:
            self._cancel.set()
            self._set_status("Cancelling ...")

    def _should_stop(self) -> bool:
        pbar = self._pbar
        return self._cancel.is_set() or bool(pbar is not None and pbar.is_canceled)

    def _start_progress(self) -> None:
        from napari.utils import cancelable_progress

        self._pbar = cancelable_progress(total=0, desc="Fine-tuning SAM")
        self._stage = None

    def _on_progress(self, ev: dict) -> None:
        stage, done, total = ev["stage"], int(ev["done"]), int(ev["total"])
        text = STAGE_TEXT.get(stage, stage)
        if stage == "train" and "loss" in ev:
            text += f" (loss {ev['loss']:.3f})"
        if not self._cancel.is_set():
            self._set_status(f"{text}: {done}/{total}")
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(done)
        pbar = self._pbar
        if pbar is not None:
            if stage != self._stage:
                self._stage = stage
                pbar.set_description(f"Fine-tuning SAM: {STAGE_TEXT.get(stage, stage)}")
                pbar.total = total
                pbar.n = 0
            pbar.update(done - pbar.n)

    def _on_done(self, result) -> None:
        self.result = result
        if result.cancelled:
            self._set_status(f"Cancelled after {result.steps} steps; nothing was saved.")
            self._show_results(result)
            return
        from napari_sam.model.user_models import add_user_model

        name = self.name_edit.text().strip() or None
        entry = add_user_model(
            result.path,
            name,
            base_model=self.base_models[self.model_combo.currentIndex()].name,
            metrics={"before": result.before, "after": result.after},
            description=f"fine-tuned for {result.steps} steps ({result.config['train']})",
        )
        self._show_results(result)
        self._set_status(
            f"Saved {result.path} ({result.seconds:.0f} s); added to the model list as "
            f"{entry.name!r}."
        )
        self.model_saved.emit(str(result.path))

    def _on_error(self, error: BaseException) -> None:
        if not isinstance(error, (ValueError, TypeError, OSError)):  # a bug: keep the trace
            logging.getLogger(__name__).error("fine-tuning failed", exc_info=error)
        self._set_status(f"Fine-tuning failed: {type(error).__name__}: {error}", error=True)

    def _on_finished(self) -> None:
        self._running = False
        self._worker = None
        self.run_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.progress_bar.setVisible(False)
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None

    def _set_status(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet("color: #e0584f;" if error else "")
        self.status.setText(text)

    def _show_results(self, result) -> None:
        self.results.setText(results_html(result))


def results_html(result) -> str:
    """A small before/after table of held-out mean IoU (HTML for a QLabel)."""
    if not result.before:
        if result.cancelled:
            return ""
        return "No held-out data (held-out fraction 0): no IoU measured."
    keys = [k for k in result.before if k not in ("objects", "box3")]
    rows = []
    for k in keys:
        b = result.before[k]
        a = result.after.get(k) if result.after else None
        after = f"{a:.3f}" if a is not None else "-"
        change = f"{a - b:+.3f}" if a is not None else ""
        rows.append(f"<tr><td>{k}</td><td>{b:.3f}</td><td>{after}</td><td>{change}</td></tr>")
    s = result.split
    head = "<tr><th>held-out mIoU</th><th>before</th><th>after</th><th>change</th></tr>"
    return (
        f"<table>{head}{''.join(rows)}</table>"
        f"<p>{result.before['objects']} held-out objects ({s['by']} split: "
        f"{s['train_objects']} objects for training, {s['test_objects']} held out)</p>"
    )

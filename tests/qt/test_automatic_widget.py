"""The "Segment all" dock: runs in a worker, writes the "automatic" labels layer, cancels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from core._automatic_models import project_predictor  # noqa: E402
from napari_sam._qt.automatic_widget import LAYER_NAME, AutomaticWidget  # noqa: E402
from napari_sam._sample_data import _blobs  # noqa: E402


def _widget(viewer):
    pred = project_predictor()
    w = AutomaticWidget(viewer, predictor_factory=lambda: pred)
    w.points.setValue(4)
    w.iou.setValue(0.0)
    w.stability.setValue(0.0)
    w.min_area.setValue(0)
    w.max_area.setValue(1.0)
    w.min_z.setValue(1)
    return w


def _wait(qtbot, w):
    qtbot.waitUntil(lambda: w.slice_btn.isEnabled(), timeout=120_000)


def test_segment_current_slice_and_stack(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    vol, _ = _blobs((3, 48, 64), 4, seed=1, radius=(6, 12))
    viewer.add_image(vol, name="stack", scale=(2.0, 1.0, 1.0))
    w = _widget(viewer)
    qtbot.addWidget(w)
    assert w.image_combo.currentText() == "stack"
    viewer.dims.set_point(0, 2.0)  # world z = 2 -> slice 1
    w.run("slice")
    _wait(qtbot, w)
    lab = viewer.layers[LAYER_NAME]
    assert lab.data.shape == (3, 48, 64) and tuple(lab.scale) == (2.0, 1.0, 1.0)
    assert lab.data[1].max() > 0 and lab.data[0].max() == 0 and lab.data[2].max() == 0
    assert w.progress.value() == w.progress.maximum()
    w.run("stack")
    _wait(qtbot, w)
    assert viewer.layers[LAYER_NAME].data[[0, 2]].max() > 0
    assert "objects" in w.status.text()


def test_2d_image_and_errors(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    img, _ = _blobs((40, 50), 3, seed=2, radius=(6, 10))
    viewer.add_image(img, name="img")
    w = _widget(viewer)
    qtbot.addWidget(w)
    assert w.run("stack") is None and "gray 3-D" in w.status.text()
    w.run("slice")
    _wait(qtbot, w)
    assert viewer.layers[LAYER_NAME].data.shape == (40, 50)


def test_cancel(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    vol, _ = _blobs((4, 48, 48), 3, seed=3, radius=(6, 10))
    viewer.add_image(vol, name="stack")
    w = _widget(viewer)
    qtbot.addWidget(w)
    w.run("stack")
    w.cancel()
    _wait(qtbot, w)
    assert w.status.text() == "cancelled"
    assert LAYER_NAME not in viewer.layers


def test_thresholds_default_to_the_models_recommendation(make_napari_viewer):
    from napari_sam.automatic import AutomaticParams

    w = AutomaticWidget(make_napari_viewer())
    assert w.iou.text() == "model default" and w.stability.text() == "model default"
    model = project_predictor().model
    model.automatic_defaults = {"pred_iou_thresh": 0.42, "stability_score_thresh": 0.61}
    p = w.params(model)
    assert (p.pred_iou_thresh, p.stability_score_thresh) == (0.42, 0.61)
    assert w.params().pred_iou_thresh == AutomaticParams().pred_iou_thresh  # SAM's 0.88
    w.iou.setValue(0.7)  # a value the user sets wins
    assert w.params(model).pred_iou_thresh == 0.7
    assert w.params(model).stability_score_thresh == 0.61

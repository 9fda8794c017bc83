"""The "Fine-tune SAM" dock: a real short fine-tune in a viewer (worker thread), the
reported numbers, the saved file, the user model list, overwrite refusal and cancel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from napari_sam.train.synthetic import make_image

TINY = {
    "img_size": 96,
    "widths": [8, 12, 16, 24, 32],
    "depths": [0, 1, 1, 0, 0],
    "embed_dim": 64,
    "mask_in_chans": 8,
    "decoder_depth": 1,
    "decoder_num_heads": 4,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 32,
}


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def base():
    from napari_sam.model.small_encoder import build_nsam

    torch.manual_seed(0)
    return build_nsam(TINY)


@pytest.fixture
def dock(make_napari_viewer, base):
    from napari_sam._qt.finetune_widget import BaseModel, FinetuneWidget

    viewer = make_napari_viewer()
    data = [make_image(40 + i, (96, 96), "membrane", 8, scale=0.5) for i in range(2)]
    for i, (img, lab) in enumerate(data):
        viewer.add_image(img, name=f"img{i}")
        viewer.add_labels(lab, name=f"gt{i}")
    viewer.add_labels(np.zeros((50, 50), np.uint8), name="other")  # wrong shape: not picked
    widget = FinetuneWidget(viewer, base_models=[BaseModel("tiny (test)", "tiny", lambda: base)])
    viewer.window.add_dock_widget(widget, name="Fine-tune SAM")
    return viewer, widget, data


def _wait(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(widget.is_idle, timeout=timeout)


def test_real_short_finetune_reports_numbers_and_saves(dock, qtbot, tmp_path, base):
    from napari_sam import load_model
    from napari_sam.finetune import evaluate_held_out, split_annotations
    from napari_sam.model.user_models import list_user_models

    viewer, w, data = dock
    assert [(a.currentText(), b.currentText()) for a, b in w.pair_rows] == [("img0", "gt0")]
    w.add_pair()  # the next unused image and the labels of its shape
    assert [(a.currentText(), b.currentText()) for a, b in w.pair_rows] == [
        ("img0", "gt0"),
        ("img1", "gt1"),
    ]
    out = tmp_path / "tuned.pt"
    w.steps.setValue(6)
    w.held_out.setValue(0.3)
    w.lr.setValue(0.003)
    w.path_edit.setText(str(out))
    w.name_edit.setText("membrane-tuned")
    seen = []
    w._signals.progress.connect(seen.append)
    with qtbot.waitSignal(w.model_saved, timeout=120_000) as saved:
        w.run_btn.click()
        assert not w.is_idle() and not w.run_btn.isEnabled()
    _wait(qtbot, w)
    r = w.result
    assert saved.args == [str(out)]
    assert not r.cancelled and r.steps == 6 and r.path == out and out.is_file()
    assert r.split["by"] == "objects" and r.split["test_images"] == 2
    assert "Saved" in w.status.text() and "membrane-tuned" in w.status.text()
    # the table shows the numbers of the run
    html = w.results.text()
    for key in ("box", "point", "click1", "click3"):
        assert f"{r.before[key]:.3f}" in html and f"{r.after[key]:.3f}" in html
    assert f"{r.before['objects']} held-out objects" in html
    assert [e["done"] for e in seen if e["stage"] == "train"] == list(range(7))
    # the file reloads and its held-out numbers are the reported "after" ones
    loaded = load_model(out, device="cpu")
    split = split_annotations(
        [d[0] for d in data], [d[1] for d in data], 0.3, "auto", seed=0, min_area=20
    )
    again = evaluate_held_out(loaded, split.test_images, split.test_labels, n_clicks=3)
    assert again == pytest.approx(r.after)
    before = evaluate_held_out(base, split.test_images, split.test_labels, n_clicks=3)
    assert before == pytest.approx(r.before)
    # the user model list has it
    (entry,) = list_user_models()
    assert entry.name == "membrane-tuned" and entry.path == str(out.resolve())
    assert entry.base_model == "tiny"
    assert entry.metrics["after"] == pytest.approx(r.after)
    assert json.loads(out.with_suffix(".json").read_text())["base_model"] == "tiny"

    # a second run to the same file is refused until "overwrite" is ticked
    mtime = out.stat().st_mtime_ns
    w.run_btn.click()
    assert w.is_idle() and "already exists" in w.status.text()
    assert out.stat().st_mtime_ns == mtime


def test_cancel_stops_the_run_and_saves_nothing(dock, qtbot, tmp_path):
    _, w, _ = dock
    out = tmp_path / "never.pt"
    w.steps.setValue(100_000)
    w.path_edit.setText(str(out))
    w.run_btn.click()
    qtbot.waitUntil(lambda: w.progress_bar.maximum() == 100_000, timeout=60_000)
    qtbot.waitUntil(lambda: w.progress_bar.value() >= 1, timeout=60_000)
    w.cancel_btn.click()
    _wait(qtbot, w)
    r = w.result
    assert r.cancelled and 1 <= r.steps < 100_000 and r.after is None
    assert "Cancelled" in w.status.text() and "nothing was saved" in w.status.text()
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert w.run_btn.isEnabled() and not w.cancel_btn.isEnabled()


def test_bad_setups_are_explained_without_running(dock, qtbot, tmp_path):
    viewer, w, _ = dock
    w.run_btn.click()
    assert w.is_idle() and "choose where to save" in w.status.text()
    w.path_edit.setText(str(tmp_path / "missing" / "x.pt"))
    w.run_btn.click()
    assert "does not exist" in w.status.text()
    w.path_edit.setText(str(tmp_path / "x.pt"))
    w.pair_rows[0][1].setCurrentText("other")  # labels of another size
    w.run_btn.click()
    _wait(qtbot, w)
    assert "same size" in w.status.text() and w.result is None
    assert not (tmp_path / "x.pt").exists()

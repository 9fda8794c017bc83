"""The annotator dock keeps stack embeddings on disk: reopen, resume, opt-out, fallbacks."""

import time

import numpy as np
import pytest
from qtpy.QtCore import Qt

from .conftest import masks_of, wait_idle
from .test_volume_widget import SHIFT, open_stack, stack
from .test_widget import key, reference

pytestmark = pytest.mark.gui


def _store(w):
    return w.annotator.store_for()[0]


def test_reopen_runs_no_encoder(open_widget, qtbot, models, embeddings_dir):
    img, _ = stack(10)
    viewer, w = open_stack(open_widget, qtbot, img, 4)
    w.precompute_stack()
    wait_idle(qtbot, w, timeout=120_000)
    store = _store(w)
    assert store.path.parent == embeddings_dir and store.missing() == []
    assert "stored in" in w.status_text and "10 of 10 slices ready" in w.store_label.text()
    viewer.close()

    counter = models(0).counter
    runs = counter.count
    # a new viewer and widget on the same image (a copy: found by content, not identity)
    viewer, w = open_stack(open_widget, qtbot, img.copy(), 7)
    assert _store(w).path == store.path
    for z in (0, 9, 2):  # switching to stored slices
        viewer.dims.set_current_step(0, z)
        wait_idle(qtbot, w)
        assert w.annotator.key == (z, None, None) and w.annotator.has_embedding()
    w.points_layer.add([[2, 20, 20]])
    wait_idle(qtbot, w)
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)  # commit + propagate through the stack
    wait_idle(qtbot, w, timeout=120_000)
    assert w.status_text.startswith("propagation done")
    reached = [z for z in range(10) if z != 2 and (w.objects_layer.data[z] == 1).any()]
    assert reached
    assert counter.count == runs and w.annotator.encoder_runs == 0
    # the stored float32 embeddings give exactly the direct predictor's candidates
    viewer.dims.set_current_step(0, 5)
    wait_idle(qtbot, w)
    w.points_layer.add([[5, 20, 20]])
    wait_idle(qtbot, w)
    masks, ious, _ = reference(
        models(0), img[5], point_coords=np.array([[20.0, 20.0]]), point_labels=np.array([1])
    )
    np.testing.assert_array_equal(masks_of(w), masks)
    np.testing.assert_allclose(w.annotator.candidates.ious, ious, rtol=1e-5)


def test_interrupted_precompute_resumes(open_widget, qtbot, models):
    img, _ = stack(16)
    viewer, w = open_stack(open_widget, qtbot, img, 0)
    store = _store(w)
    original = store.predictor.set_image
    store.predictor.set_image = lambda *a, **k: (time.sleep(0.2), original(*a, **k))[1]
    w.precompute_stack()
    qtbot.waitUntil(lambda: len(store.missing()) <= 12, timeout=60_000)
    key(qtbot, viewer, Qt.Key.Key_Escape)
    wait_idle(qtbot, w, timeout=60_000)
    left = store.missing()
    assert 0 < len(left) <= 12
    viewer.close()

    counter = models(0).counter
    runs = counter.count
    viewer, w = open_stack(open_widget, qtbot, img, 0)
    again = _store(w)
    assert again.path == store.path and again.missing() == left
    assert f"{16 - len(left)} of 16 slices ready" in w.store_label.text()
    w.precompute_stack()
    wait_idle(qtbot, w, timeout=120_000)
    assert counter.count - runs == len(left)  # only the missing slices were encoded
    assert w.status_text.startswith(f"precompute done: {len(left)} slice(s) embedded, 16 of 16")


def test_memory_setting_writes_nothing(open_widget, qtbot, models, monkeypatch, embeddings_dir):
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", "memory")
    img, _ = stack(6)
    viewer, w = open_stack(open_widget, qtbot, img, 2)
    w.precompute_stack()
    wait_idle(qtbot, w, timeout=120_000)
    assert _store(w).path is None and _store(w).missing() == []
    assert "in memory only" in w.store_label.text()
    assert not embeddings_dir.exists()


def test_unwritable_cache_falls_back_to_memory(open_widget, qtbot, models, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the embeddings folder should be")
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", str(blocker))
    img, _ = stack(6)
    viewer, w = open_stack(open_widget, qtbot, img, 2)
    assert _store(w).path is None and w.banner_text == ""
    assert "memory only" in w.store_note and "NAPARI_SAM_EMBEDDINGS" in w.store_note
    assert "memory only" in w.store_label.text()
    w.precompute_stack()  # still works, in memory
    wait_idle(qtbot, w, timeout=120_000)
    assert _store(w).missing() == [] and w.status_text.startswith("precompute done")


def test_store_of_other_settings_is_computed_again(open_widget, qtbot, models, monkeypatch):
    from napari_sam.embeddings import EmbeddingStore

    img, _ = stack(8)
    viewer, w = open_stack(open_widget, qtbot, img, 3)
    path, predictor = _store(w).path, _store(w).predictor
    viewer.close()
    with monkeypatch.context() as m:  # the same path written by another napari-sam version
        m.setattr("napari_sam.__version__", "0.0.1-old")
        old = EmbeddingStore(
            img, predictor, path, dtype="float32", model_name="tiny-a", overwrite=True
        )
        old.precompute()

    counter = models(0).counter
    runs = counter.count
    viewer, w = open_stack(open_widget, qtbot, img, 3)
    store = _store(w)
    assert store.path == path
    assert "do not fit" in w.store_note and "napari-sam version" in w.store_note
    assert counter.count == runs + 1  # slice 3 encoded again, never read from the old store
    assert store.missing() == [z for z in range(8) if z != 3]


def test_other_model_does_not_reuse(open_widget, qtbot, models, embeddings_dir):
    img, _ = stack(6)
    viewer, w = open_stack(open_widget, qtbot, img, 2)
    w.precompute_stack()
    wait_idle(qtbot, w, timeout=120_000)
    first = _store(w).path
    counter_b = models(1).counter
    runs = counter_b.count
    w.model_combo.setCurrentIndex(1)  # tiny B: other weights
    wait_idle(qtbot, w)
    assert _store(w).path != first and _store(w).missing() == [0, 1, 3, 4, 5]
    assert counter_b.count == runs + 1  # its own embedding of the slice on screen
    assert sorted(p.name for p in embeddings_dir.glob("*.zarr")) == sorted(
        [first.name, _store(w).path.name]
    )


def test_cache_cap_removes_the_store_of_an_ended_session(
    open_widget, qtbot, embeddings_dir, monkeypatch
):
    img, _ = stack(6)
    viewer, w = open_stack(open_widget, qtbot, img, 2)
    w.precompute_stack()
    wait_idle(qtbot, w, timeout=120_000)
    first = _store(w)
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS_MAX_GB", "0.000001")  # about 1 KiB
    # the user moves on to another stack: the first session ends and closes its store
    viewer.add_image(img + 1, name="second")
    w.image_combo.setCurrentIndex(w.image_combo.findText("second"))
    wait_idle(qtbot, w)
    second = _store(w)
    assert second.path not in (None, first.path) and second.path.exists()
    assert not first.path.exists()
    assert "removed 1 least recently used store(s)" in w.store_note
    assert "NAPARI_SAM_EMBEDDINGS_MAX_GB" in w.store_note
    # the open store is kept, however far over the cap
    viewer.dims.set_current_step(0, 4)
    w.precompute_stack()
    wait_idle(qtbot, w, timeout=120_000)
    assert second.path.exists() and second.missing() == []

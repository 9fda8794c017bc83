"""The annotator dock on 3D stacks: Shift-S propagation, Escape, undo/redo, precompute."""

import time

import numpy as np
import pytest
from qtpy.QtCore import Qt

from napari_sam.propagate import StopCriteria
from tiny_sam import blob_image
from volume_helpers import ellipsoid_volume

from .conftest import masks_of, wait_idle
from .test_widget import key

pytestmark = pytest.mark.gui

# Random-weight test models: stop only on empty masks or at the stack's end, so that the
# fronts walk far enough to test the plumbing (stop rules are tested in tests/core).
WALK = StopCriteria(min_iou_prev=None, max_area_growth=None, min_contrast=None)
SHIFT = Qt.KeyboardModifier.ShiftModifier
CTRL = Qt.KeyboardModifier.ControlModifier


def stack(n=12):
    img, gt = ellipsoid_volume(shape=(n, 40, 40), center=(n // 2, 20, 20), radii=(n, 12, 10))
    return img, gt


def open_stack(open_widget, qtbot, img, z):
    viewer, w = open_widget(img)
    w.stop_criteria = WALK
    viewer.dims.set_current_step(0, z)
    wait_idle(qtbot, w)
    assert w.annotator.key == (z, None, None)
    return viewer, w


def recovered(recovery_dir):
    from napari_sam.io.recovery import RecoveryStore

    (name,) = [p.name for p in recovery_dir.iterdir()]
    return RecoveryStore(name, root=recovery_dir).restore().labels


def test_shift_s_commits_propagates_undoes_redoes(open_widget, qtbot, models, recovery_dir):
    img, _ = stack()
    viewer, w = open_stack(open_widget, qtbot, img, 6)
    ann = w.annotator
    w.points_layer.add([[6, 20, 20]])
    wait_idle(qtbot, w)
    expected = masks_of(w)[ann.selected]
    assert expected.any()
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)  # commits the selected candidate first
    wait_idle(qtbot, w, timeout=120_000)
    data = w.objects_layer.data
    assert len(ann.records) == 1 and ann.records[0].label_id == 1
    np.testing.assert_array_equal(data[6] == 1, expected)  # the anchor slice as committed
    assert set(np.unique(data[6])) <= {0, 1}
    job = w._prop_history[-1][2]
    reached = [z for z in range(12) if z != 6 and (data[z] == 1).any()]
    assert len(reached) >= 3, reached  # grown beyond the start slice
    for z in range(12):
        if z != 6:
            mask = job.state.mask(1, z)
            np.testing.assert_array_equal(data[z] == 1, False if mask is None else mask)
    status = w.status_text
    assert status.startswith("propagation done") and "stopped at" in status
    assert "up from 6" in status and "down from 6" in status
    np.testing.assert_array_equal(recovered(recovery_dir), data)  # autosaved, whole run
    # embeddings are shared: a slice embedded by propagation needs no encoder run here
    runs = models(0).counter.count
    viewer.dims.set_current_step(0, reached[-1])
    wait_idle(qtbot, w)
    assert models(0).counter.count == runs and ann.has_embedding()
    viewer.dims.set_current_step(0, 6)
    wait_idle(qtbot, w)

    after = data.copy()
    key(qtbot, viewer, Qt.Key.Key_Z, CTRL)  # one undo: the whole propagation
    wait_idle(qtbot, w)
    assert "propagate object 1" in w.status_text
    assert not np.delete(w.objects_layer.data, 6, axis=0).any()
    np.testing.assert_array_equal(w.objects_layer.data[6] == 1, expected)
    np.testing.assert_array_equal(recovered(recovery_dir), w.objects_layer.data)
    key(qtbot, viewer, Qt.Key.Key_Z, CTRL | SHIFT)
    wait_idle(qtbot, w)
    np.testing.assert_array_equal(w.objects_layer.data, after)
    np.testing.assert_array_equal(recovered(recovery_dir), after)
    # a second undo goes past the propagation to the commit
    key(qtbot, viewer, Qt.Key.Key_Z, CTRL)
    key(qtbot, viewer, Qt.Key.Key_Z, CTRL)
    wait_idle(qtbot, w)
    assert not w.objects_layer.data.any() and len(ann.prompts.points) == 1


def test_correction_is_an_anchor_and_repropagation_keeps_it(open_widget, qtbot, models):
    img, _ = stack()
    viewer, w = open_stack(open_widget, qtbot, img, 6)
    ann = w.annotator
    w.points_layer.add([[6, 20, 20]])
    wait_idle(qtbot, w)
    w.propagate()
    wait_idle(qtbot, w, timeout=120_000)
    # correct slice 3 with new prompts for the same object, commit, re-propagate from it
    viewer.dims.set_current_step(0, 3)
    wait_idle(qtbot, w)
    w.label_id.setValue(1)
    w.box_layer.add_rectangles(np.array([[3, 10, 12], [3, 10, 26], [3, 30, 26], [3, 30, 12]]))
    wait_idle(qtbot, w)
    w.commit()
    corrected = w.objects_layer.data[3].copy()
    anchor6 = w.objects_layer.data[6].copy()
    assert ann.committed_slices(1, 0) == [3, 6]
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, w, timeout=120_000)
    data = w.objects_layer.data
    np.testing.assert_array_equal(data[3], corrected)  # anchors are never overwritten
    np.testing.assert_array_equal(data[6], anchor6)
    job = w._prop_history[-1][2]
    assert sorted(job.state.objects[1].anchors) == [3, 6]
    for z in set(range(12)) - {3, 6}:
        mask = job.state.mask(1, z)
        np.testing.assert_array_equal(data[z] == 1, False if mask is None else mask)
    assert "up from 3" in w.status_text and "down from 6" in w.status_text


def test_escape_cancels_and_leaves_whole_slices(open_widget, qtbot, models):
    img, _ = stack(24)
    viewer, w = open_stack(open_widget, qtbot, img, 12)
    w.points_layer.add([[12, 20, 20]])
    wait_idle(qtbot, w)
    w.commit()
    before = w.objects_layer.data.copy()
    decoder = w._decoder()
    original = decoder.predict_torch

    def slow_decode(*args, **kwargs):  # leaves the GUI time to show each step
        time.sleep(0.25)
        return original(*args, **kwargs)

    decoder.predict_torch = slow_decode
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    assert w._prop_job is not None and not w.propagate_button.isEnabled()
    qtbot.waitUntil(lambda: len(w._prop_job.steps) >= 2, timeout=60_000)
    key(qtbot, viewer, Qt.Key.Key_Escape)
    wait_idle(qtbot, w, timeout=60_000)
    job = w._prop_history[-1][2]
    assert job.cancelled and job.error is None
    assert w.status_text.startswith("propagation cancelled")
    data = w.objects_layer.data
    kept = {s.z for s in job.steps if s.accepted}
    written = {z for z in range(24) if not np.array_equal(data[z], before[z])}
    assert written <= kept and 2 <= len(kept) < 22
    for z in range(24):  # each slice fully written or untouched
        if z in kept:
            np.testing.assert_array_equal(data[z] == 1, job.state.mask(1, z))
        else:
            np.testing.assert_array_equal(data[z], before[z])
    w.undo()
    np.testing.assert_array_equal(w.objects_layer.data, before)


def test_undo_during_propagation_cancels_then_undoes(open_widget, qtbot, models):
    img, _ = stack(24)
    viewer, w = open_stack(open_widget, qtbot, img, 12)
    w.points_layer.add([[12, 20, 20]])
    wait_idle(qtbot, w)
    w.commit()
    before = w.objects_layer.data.copy()
    decoder = w._decoder()
    original = decoder.predict_torch
    decoder.predict_torch = lambda *a, **k: (time.sleep(0.25), original(*a, **k))[1]
    w.propagate()
    qtbot.waitUntil(lambda: len(w._prop_job.steps) >= 2, timeout=60_000)
    key(qtbot, viewer, Qt.Key.Key_Z, CTRL)
    wait_idle(qtbot, w, timeout=60_000)
    np.testing.assert_array_equal(w.objects_layer.data, before)
    assert w.annotator.can_redo and "undone: propagate object 1" in w.status_text


def test_2d_image_gives_a_message(open_widget, qtbot):
    viewer, w = open_widget(blob_image((64, 96)))
    assert not w.propagate_button.isEnabled() and not w.precompute_button.isEnabled()
    w.points_layer.add([[40, 50]])
    wait_idle(qtbot, w)
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    assert "2D" in w.status_text and "3D" in w.status_text
    w.precompute_stack()
    assert "2D" in w.status_text
    assert not w.objects_layer.data.any()  # nothing committed by Shift-S on 2D
    assert w.banner_text == ""


def test_shift_s_without_object_says_what_to_do(open_widget, qtbot):
    img, _ = stack()
    viewer, w = open_stack(open_widget, qtbot, img, 6)
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    assert "nothing to propagate" in w.status_text
    assert w.is_idle() and not w.objects_layer.data.any()


def test_precompute_embeds_every_slice_once(open_widget, qtbot, models):
    img, _ = stack(10)
    viewer, w = open_stack(open_widget, qtbot, img, 4)
    counter = models(0).counter
    runs = counter.count
    w.precompute_button.click()
    wait_idle(qtbot, w, timeout=120_000)
    store, _ = w.annotator.store_for()
    assert counter.count == runs + 9  # slice 4 was embedded already
    assert store.missing() == []
    assert w.status_text.startswith("precompute done: 9 slice(s) embedded, 10 of 10")
    for z in (0, 9, 7):  # switching to a precomputed slice runs no encoder
        viewer.dims.set_current_step(0, z)
        wait_idle(qtbot, w)
        assert w.annotator.key == (z, None, None) and w.annotator.has_embedding()
    w.points_layer.add([[7, 20, 20]])
    wait_idle(qtbot, w)
    assert masks_of(w).shape == (3, 40, 40)
    assert counter.count == runs + 9
    w.precompute_stack()
    assert "already" in w.status_text and counter.count == runs + 9


def test_precompute_cancel_keeps_what_was_computed(open_widget, qtbot, models):
    img, _ = stack(16)
    viewer, w = open_stack(open_widget, qtbot, img, 0)
    store, _ = w.annotator.store_for()
    original = store.predictor.set_image

    def slow_set_image(*args, **kwargs):
        time.sleep(0.2)
        return original(*args, **kwargs)

    store.predictor.set_image = slow_set_image
    counter = models(0).counter
    runs = counter.count
    missing = store.missing()
    w.precompute_stack()
    qtbot.waitUntil(lambda: len(store.missing()) <= len(missing) - 2, timeout=60_000)
    viewer.dims.set_current_step(0, 15)  # the slice on screen jumps the queue
    key(qtbot, viewer, Qt.Key.Key_Escape)
    wait_idle(qtbot, w, timeout=60_000)
    assert w._precompute is None and w.precompute_button.isEnabled()
    left = store.missing()
    assert 0 < len(left) < len(missing) - 2 and 15 not in left
    assert counter.count - runs == len(missing) - len(left)  # one encoder run per slice


def test_repropagation_replaces_the_earlier_result(open_widget, qtbot, models):
    img, _ = stack()
    viewer, w = open_stack(open_widget, qtbot, img, 6)
    w.points_layer.add([[6, 20, 20]])
    wait_idle(qtbot, w)
    w.propagate()
    wait_idle(qtbot, w, timeout=120_000)
    first = w.objects_layer.data.copy()
    assert np.delete(first == 1, 6, axis=0).any()
    # stricter rules: every front stops on its first slice; the earlier result goes
    w.stop_criteria = StopCriteria(min_area=10**9)
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, w, timeout=120_000)
    data = w.objects_layer.data
    assert not np.delete(data == 1, 6, axis=0).any()
    np.testing.assert_array_equal(data[6], first[6])
    assert "stopped at 7 (empty mask)" in w.status_text
    w.undo()
    np.testing.assert_array_equal(w.objects_layer.data, first)


def test_object_id_picks_a_hand_painted_object(open_widget, qtbot, models):
    img, gt = stack()
    viewer, w = open_stack(open_widget, qtbot, img, 6)
    w.objects_layer.data[6][gt[6]] = 5  # painted by hand, no commit
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    assert "nothing to propagate" in w.status_text
    w.label_id.setValue(5)
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, w, timeout=120_000)
    data = w.objects_layer.data
    np.testing.assert_array_equal(data[6] == 5, gt[6])
    assert np.delete(data == 5, 6, axis=0).any()
    assert "object 5" in w.status_text


def test_a_finished_session_is_freed(open_widget, qtbot, models):
    """After a precompute and the session's end, no finished worker (its signal slots or
    its function's closure) keeps the old annotator, its stores and embeddings alive."""
    import gc
    import weakref

    img, _ = stack(6)
    viewer, w = open_stack(open_widget, qtbot, img, 2)
    w.precompute_button.click()
    wait_idle(qtbot, w, timeout=120_000)
    assert w.status_text.startswith("precompute done")
    old = weakref.ref(w.annotator)
    w._teardown()
    qtbot.wait(100)
    gc.collect()
    assert old() is None


def test_propagation_with_flips_decodes_view_0_of_the_stored_views(open_widget, qtbot, models):
    """With Flips on, the stack's stored embeddings hold four views (the slices are
    annotated with them) and propagation decodes the first one (the slice itself)."""
    img, _ = stack()
    viewer, w = open_widget(img)
    w.flips_combo.setCurrentText("4 views (slice + 3 flips)")
    w.stop_criteria = WALK
    viewer.dims.set_current_step(0, 6)
    wait_idle(qtbot, w)
    ann = w.annotator
    assert ann.predictor.tta == 4
    w.points_layer.add([[6, 20, 20]])
    wait_idle(qtbot, w)
    expected = masks_of(w)[ann.selected]
    key(qtbot, viewer, Qt.Key.Key_S, SHIFT)
    wait_idle(qtbot, w, timeout=120_000)
    data = w.objects_layer.data
    np.testing.assert_array_equal(data[6] == 1, expected)
    reached = [z for z in range(12) if z != 6 and (data[z] == 1).any()]
    assert len(reached) >= 3, reached
    store, _ = ann.store_for(ann.key)
    assert store.get(reached[0]).features.shape[0] == 4
    decoder = w._decoder()
    assert decoder.tta == 1 and decoder.features.shape[0] == 1

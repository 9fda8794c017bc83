"""Autosave and restore in the dock widget: close without saving, reopen, restore."""

import numpy as np
from qtpy.QtCore import Qt

from napari_sam.io.recovery import RecoveryStore
from tiny_sam import blob_image

from .conftest import wait_idle


def commit_point(qtbot, w, rc):
    """Commit the largest candidate for a point (the tiny model is untrained)."""
    w.points_layer.add([list(rc)])
    wait_idle(qtbot, w)
    w.select_candidate(int(np.argmax([np.asarray(c.data).sum() for c in w.candidate_layers])))
    w.commit()
    wait_idle(qtbot, w)


def test_closed_without_saving_then_restore_or_discard(open_widget, qtbot, recovery_dir):
    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    assert not w.recovery_row.isVisible() and not recovery_dir.exists()  # nothing yet
    commit_point(qtbot, w, (40, 50))
    assert "committed object 1" in w.status_text and "autosaved" in w.status_text
    w.overlap_combo.setCurrentIndex(1)  # overwrite
    commit_point(qtbot, w, (60, 90))
    commit_point(qtbot, w, (20, 20))
    w.undo()  # the third commit is undone: the store follows
    wait_idle(qtbot, w)
    labels = np.array(w.objects_layer.data)
    (key,) = [p.name for p in recovery_dir.iterdir()]
    np.testing.assert_array_equal(RecoveryStore(key, root=recovery_dir).restore().labels, labels)
    uids = [r.uid for r in w.annotator.records]
    assert set(np.unique(labels)) == {0, 1, 2} and len(uids) == 2
    viewer.close()  # no export, no save

    # a new viewer on the same image (a copy of the data): the restore is offered
    viewer2, w2 = open_widget(img.copy())
    assert not w2.recovery_row.isHidden()
    assert w2.restore_button.text() == "Restore 2 objects"
    assert "left 2 object(s)" in w2.recovery_text.text()
    assert not w2.objects_layer.data.any()
    w2.points_layer.add([[40, 50]])
    wait_idle(qtbot, w2)
    w2.commit()  # refused until the user has chosen
    assert "first choose 'Restore' or 'Discard'" in w2.status_text
    assert not w2.objects_layer.data.any()
    qtbot.mouseClick(w2.restore_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w2)
    assert w2.recovery_row.isHidden() and "restored 2 objects" in w2.status_text
    np.testing.assert_array_equal(w2.objects_layer.data, labels)
    assert w2.objects_layer.data is w2.annotator.labels
    assert [r.uid for r in w2.annotator.records] == uids
    assert w2.annotator.next_id == 3
    # annotation goes on: commit (the pending prompt), undo it, all autosaved
    w2.overlap_combo.setCurrentIndex(1)  # overwrite
    w2.commit()
    wait_idle(qtbot, w2)
    assert (w2.objects_layer.data == 3).any() and "autosaved" in w2.status_text
    w2.undo()
    wait_idle(qtbot, w2)
    np.testing.assert_array_equal(w2.objects_layer.data, labels)
    viewer2.close()

    # third start: discard; the earlier records are deleted, new work starts a new store
    viewer3, w3 = open_widget(img)
    assert w3.restore_button.text() == "Restore 2 objects"
    qtbot.mouseClick(w3.discard_button, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, w3)
    assert w3.recovery_row.isHidden() and "discarded the 2" in w3.status_text
    assert not (recovery_dir / key).exists()
    commit_point(qtbot, w3, (40, 50))
    state = RecoveryStore(key, root=recovery_dir).restore()
    assert state.object_ids == [1]
    np.testing.assert_array_equal(state.labels, w3.objects_layer.data)


def test_model_change_keeps_autosaving_without_an_offer(open_widget, qtbot, recovery_dir):
    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    commit_point(qtbot, w, (40, 50))
    w.model_combo.setCurrentIndex(1)  # a new session on the same image and objects
    wait_idle(qtbot, w)
    assert w.recovery_row.isHidden()  # the store holds exactly what is on screen
    commit_point(qtbot, w, (60, 90))
    (key,) = [p.name for p in recovery_dir.iterdir()]
    state = RecoveryStore(key, root=recovery_dir).restore()
    np.testing.assert_array_equal(state.labels, w.objects_layer.data)
    assert state.object_ids == [1, 2]


def test_unwritable_recovery_folder_is_a_banner_not_an_exception(
    open_widget, qtbot, tmp_path, monkeypatch
):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the recovery folder should be")
    monkeypatch.setenv("NAPARI_SAM_RECOVERY", str(blocked))
    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    commit_point(qtbot, w, (40, 50))
    assert (w.objects_layer.data == 1).any()  # the commit itself stands
    assert "Autosave failed" in w.banner_text and str(blocked) in w.banner_text
    assert "NAPARI_SAM_RECOVERY" in w.banner_text and "autosaved" not in w.status_text
    blocked.unlink()  # the user fixes it; the next commit writes everything
    commit_point(qtbot, w, (60, 90))
    assert not w.banner_text and "autosaved" in w.status_text
    (key,) = [p.name for p in blocked.iterdir()]
    state = RecoveryStore(key, root=blocked).restore()
    np.testing.assert_array_equal(state.labels, w.objects_layer.data)
    assert len(state.object_ids) == 2

"""LabelWriter: propagation results into a label volume, overlap rules, one undoable edit."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.label_writer import LabelWriter
from napari_sam.propagate import PropagationStep, StopReason


def _box(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def _step(z, obj, mask, chosen=True, reason=None):
    return PropagationStep(z, obj, mask, 0.9, reason, 1, 0, chosen)


@pytest.mark.parametrize("overlap", ["keep", "overwrite"])
def test_write_respects_overlap_rule_and_undo_redo(overlap):
    labels = np.zeros((4, 10, 12), np.uint16)
    labels[2, 0:5, 0:5] = 7  # another object
    labels[2, 8, 8] = 3  # stale pixel of the object we write (cleared)
    before = labels.copy()
    w = LabelWriter(labels, overlap=overlap)
    mask = _box((10, 12), 3, 7, 3, 9)
    assert w.apply(_step(2, 3, mask))
    plane = labels[2]
    if overlap == "keep":
        assert np.array_equal(plane == 3, mask & (before[2] != 7))
        assert (plane == 7).sum() == 25
    else:
        assert np.array_equal(plane == 3, mask)
        assert (plane == 7).sum() == 25 - 4
    assert labels[2, 8, 8] == 0
    assert np.array_equal(labels[[0, 1, 3]], before[[0, 1, 3]])
    after = labels.copy()
    assert w.undo() == [2]
    assert np.array_equal(labels, before)
    assert w.redo() == [2]
    assert np.array_equal(labels, after)


def test_rewrite_of_a_slice_takes_back_the_earlier_step():
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 0:4, 0:4] = 5
    before = labels.copy()
    w = LabelWriter(labels, overlap="overwrite")
    w.apply(_step(1, 2, _box((8, 8), 0, 4, 0, 8)))  # takes object 5's pixels
    w.apply(_step(1, 2, _box((8, 8), 4, 8, 0, 8)))  # the better step: lower half only
    assert np.array_equal(labels[1, 0:4, 0:4], before[1, 0:4, 0:4])  # 5 is back
    assert np.array_equal(labels[1] == 2, _box((8, 8), 4, 8, 0, 8))
    w.undo()
    assert np.array_equal(labels, before)


def test_ignores_rejected_and_unchosen_steps():
    labels = np.zeros((3, 8, 8), np.uint8)
    w = LabelWriter(labels)
    mask = _box((8, 8), 1, 3, 1, 3)
    assert not w.apply(_step(0, 1, mask, chosen=False))
    assert not w.apply(_step(0, 1, mask, reason=StopReason.EMPTY))
    assert not w.apply(_step(0, 1, None, reason=StopReason.RANGE))
    assert not labels.any()


def test_other_axis_and_bad_input():
    labels = np.zeros((5, 6, 7), np.int32)
    w = LabelWriter(labels, axis=1)
    mask = _box((5, 7), 1, 4, 2, 5)
    w.write(3, 9, mask)
    assert np.array_equal(labels[:, 3, :] == 9, mask)
    assert labels.sum() == 9 * mask.sum()
    with pytest.raises(ValueError, match="plane"):
        w.write(3, 9, mask[:2])
    with pytest.raises(TypeError, match="3D numpy"):
        LabelWriter(labels[0])
    with pytest.raises(ValueError, match="overlap"):
        LabelWriter(labels, overlap="merge")


def test_anchor_state_and_stale_slices():
    from napari_sam.label_writer import anchor_state, plane_of, stale_slices

    labels = np.zeros((6, 5, 7), np.uint16)
    labels[:, 2, 1:4] = 3  # object 3 on every (z, x) plane y=2 ... sliced along axis 1
    labels[:, 4, 0] = 2
    state = anchor_state(labels, 1, 3, [2, 4, 2])
    assert state.n_slices == 5 and tuple(state.slice_shape) == (6, 7)
    assert list(state.objects[3].anchors) == [2]  # slice 4 holds no pixel of object 3
    np.testing.assert_array_equal(state.mask(3, 2), plane_of(labels, 1, 2) == 3)
    with pytest.raises(ValueError, match="commit it on a slice first"):
        anchor_state(labels, 1, 3, [0, 4])
    assert stale_slices([0, 1, 2, 3], state, 3) == [0, 1, 3]

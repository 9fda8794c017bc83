"""Stitching per-slice label images into 3-D objects (no model: given 2-D labels)."""

import numpy as np
import pytest
from scipy import ndimage

from napari_sam.stitching import Stitcher, StitchParams, overlap_iou, stitch_slices


def _ball(shape, centre, radius):
    zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in shape)]
    cz, cy, cx = centre
    return (zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _per_slice_labels(objects, seed=0):
    """Independent 2-D labelling of each slice (ids shuffled per slice) of given 3-D
    objects, as an automatic 2-D segmentation would produce: each object's cross-section
    gets its own random id."""
    rng = np.random.default_rng(seed)
    shape = objects[0].shape
    out = np.zeros(shape, dtype=np.int32)
    for z in range(shape[0]):
        ids = rng.permutation(np.arange(1, len(objects) + 1)) * 7
        for k, obj in enumerate(objects):
            out[z][obj[z]] = ids[k]
    return out


def test_one_ball_is_one_object():
    ball = _ball((21, 40, 40), (10, 20, 20), 9)
    per_slice = _per_slice_labels([ball])
    lab = stitch_slices(per_slice)
    assert lab.dtype == np.int32
    assert set(np.unique(lab)) == {0, 1}
    assert ((lab == 1) == ball).all()


def test_touching_balls_stay_separate():
    shape = (25, 40, 60)
    a = _ball(shape, (12, 20, 19), 10)
    b = _ball(shape, (12, 20, 37), 10) & ~a  # shares a face with a
    assert ndimage.label(a | b)[1] == 1  # one connected blob
    lab = stitch_slices(_per_slice_labels([a, b], seed=1))
    ids = np.unique(lab[lab > 0])
    assert len(ids) == 2
    ia, ib = np.unique(lab[a])[0], np.unique(lab[b])[0]
    assert ia != ib and (lab[a] == ia).all() and (lab[b] == ib).all()
    # raster order of first voxel: a (smaller x) first
    assert ia == 1


def test_shifted_cross_sections_follow_the_best_overlap():
    """An object drifting sideways by 3 px per slice next to a static one."""
    lab2d = np.zeros((6, 20, 60), dtype=np.int32)
    for z in range(6):
        lab2d[z, 5:15, 5 + 3 * z : 15 + 3 * z] = 1  # drifts towards the other
        lab2d[z, 5:15, 40:50] = 2
    lab = stitch_slices(lab2d)
    assert set(np.unique(lab)) == {0, 1, 2}
    assert len(np.unique(lab[:, 10, 42])) == 1


def test_min_z_extent_and_gap_bridging():
    lab2d = np.zeros((5, 10, 10), dtype=np.int32)
    lab2d[[0, 1, 3, 4], 2:6, 2:6] = 1  # missing in slice 2
    lab2d[2, 8:10, 8:10] = 3  # one-slice blip
    split = stitch_slices(lab2d, StitchParams(max_gap=1, min_z_extent=2))
    assert set(np.unique(split)) == {0, 1, 2}  # two pieces, the blip removed
    assert split[0, 3, 3] != split[4, 3, 3]
    bridged = stitch_slices(lab2d, StitchParams(max_gap=2, min_z_extent=2))
    assert set(np.unique(bridged)) == {0, 1} and bridged[4, 3, 3] == 1
    keep_all = stitch_slices(lab2d, StitchParams(max_gap=2, min_z_extent=1))
    assert keep_all[2, 9, 9] > 0


def test_overlap_threshold_controls_linking():
    lab2d = np.zeros((2, 10, 20), dtype=np.int32)
    lab2d[0, 0:10, 0:10] = 1
    lab2d[1, 0:10, 6:16] = 1  # overlap 40 / 100 = .4
    st = {"min_z_extent": 1, "max_gap": 1}
    assert stitch_slices(lab2d, StitchParams(overlap_threshold=0.35, **st)).max() == 1
    assert stitch_slices(lab2d, StitchParams(overlap_threshold=0.45, **st)).max() == 2


def test_merged_instance_continues_the_better_fitting_object():
    """Slice 1 fuses two objects into one instance; it continues the one it fits best, and
    the other is picked up again after the gap."""
    lab2d = np.zeros((3, 10, 30), dtype=np.int32)
    lab2d[[0, 2], :, 0:12] = 1
    lab2d[[0, 2], :, 14:22] = 2
    lab2d[1, :, 0:22] = 1  # fused
    lab = stitch_slices(lab2d, StitchParams(max_gap=2, min_z_extent=1))
    assert lab[0, 0, 0] == lab[1, 0, 0] == lab[2, 0, 0] == 1
    assert lab[0, 0, 15] == lab[2, 0, 15] == 2


def test_overlap_iou_hand_computed():
    a = np.array([[1, 1, 0], [2, 2, 2]])
    b = np.array([[5, 0, 0], [5, 5, 0]])
    ia, ib, overlap, iou = overlap_iou(a, b)
    assert ia.tolist() == [1, 2] and ib.tolist() == [5]
    np.testing.assert_allclose(iou, [[1 / 4], [2 / 4]])
    np.testing.assert_allclose(overlap, [[1 / 2], [2 / 3]])


def test_incremental_matches_batch_and_errors():
    ball = _ball((9, 20, 20), (4, 10, 10), 4)
    per_slice = _per_slice_labels([ball], seed=4)
    st = Stitcher((20, 20))
    for s in per_slice:
        st.add(s)
    assert (st.result() == stitch_slices(per_slice)).all()
    with pytest.raises(ValueError, match="expected"):
        st.add(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="overlap_threshold"):
        StitchParams(overlap_threshold=0)
    with pytest.raises(ValueError, match=r"\(Z, H, W\)"):
        stitch_slices(np.zeros((4, 4)))

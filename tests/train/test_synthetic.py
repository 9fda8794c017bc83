"""Synthetic microscopy generator: determinism, dtypes, labels, 3D extents, bad input."""

import numpy as np
import pytest

from napari_sam.train.synthetic import KINDS, make_image, make_volume, z_extent


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_by_seed(kind):
    a_img, a_lab = make_image(7, (96, 128), kind=kind)
    b_img, b_lab = make_image(7, (96, 128), kind=kind)
    c_img, _ = make_image(8, (96, 128), kind=kind)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == a_lab.shape == (96, 128)


@pytest.mark.parametrize(
    ("bit_depth", "dtype"), [(8, np.uint8), (16, np.uint16), (None, np.float32)]
)
def test_bit_depths(bit_depth, dtype):
    img, lab = make_image(3, (64, 64), bit_depth=bit_depth)
    assert img.dtype == dtype
    assert lab.dtype == np.int32
    assert img.std() > 0


def test_labels_consecutive_and_objects_brighter_than_background():
    # fluorescence-like scenes: objects are on average brighter than background
    brighter = 0
    for seed in range(12):
        img, lab = make_image(seed, (128, 128), kind="nuclei", bit_depth=None)
        ids = np.unique(lab)
        assert ids[0] == 0 and np.array_equal(ids, np.arange(ids.size))
        assert ids.size > 2
        brighter += img[lab > 0].mean() > img[lab == 0].mean()
    # some scenes are rendered with inverted contrast (transmitted light), most are not
    assert brighter >= 8


def test_touching_objects_exist():
    # dense scenes have objects that share a boundary (4-neighbours with different ids)
    touching = 0
    for seed in range(6):
        _, lab = make_image(seed, (128, 128), kind="cells")
        a, b = lab[:, :-1], lab[:, 1:]
        touching += np.any((a > 0) & (b > 0) & (a != b))
    assert touching >= 3


def test_scale_changes_object_size():
    small = [
        np.bincount(make_image(s, (128, 128), "nuclei", scale=0.5)[1].ravel())[1:].mean()
        for s in range(4)
    ]
    large = [
        np.bincount(make_image(s, (128, 128), "nuclei", scale=2.0)[1].ravel())[1:].mean()
        for s in range(4)
    ]
    assert np.mean(large) > 4 * np.mean(small)


def test_volume_objects_have_finite_z_extent():
    vol, lab = make_volume(5, (24, 64, 64))
    assert vol.shape == lab.shape == (24, 64, 64) and vol.dtype == np.uint16
    n = lab.max()
    assert n >= 2
    for i in range(1, n + 1):
        z0, z1 = z_extent(lab, i)
        assert 0 <= z0 <= z1 < 24
        assert (lab[z0] == i).any() and (lab[z1] == i).any()
    # at least one object does not span the whole stack
    assert any(z_extent(lab, i) != (0, 23) for i in range(1, n + 1))
    np.testing.assert_array_equal(make_volume(5, (24, 64, 64))[0], vol)


def test_dense_volumes_stack_touching_nuclei_in_z():
    vol, lab = make_volume(11, (16, 96, 96), "dense")
    np.testing.assert_array_equal(make_volume(11, (16, 96, 96), "dense")[1], lab)
    n = lab.max()
    assert n >= 30
    assert all(z_extent(lab, i)[1] - z_extent(lab, i)[0] < 15 for i in range(1, n + 1))
    # voxels whose neighbour above is another nucleus: a propagated mask has to stop there
    above, below = lab[1:], lab[:-1]
    stacked = (above > 0) & (below > 0) & (above != below)
    assert stacked.sum() > 200
    # and touching in the plane as well
    left, right = lab[:, :, 1:], lab[:, :, :-1]
    assert ((left > 0) & (right > 0) & (left != right)).sum() > 200
    # the other kinds keep nuclei apart: far fewer stacked voxels
    _, sparse = make_volume(11, (16, 96, 96), "nuclei")
    a, b = sparse[1:], sparse[:-1]
    assert ((a > 0) & (b > 0) & (a != b)).sum() < stacked.sum() / 4


def test_bad_input_messages():
    with pytest.raises(ValueError, match="kind"):
        make_image(0, kind="bananas")
    with pytest.raises(ValueError, match="bit_depth"):
        make_image(0, bit_depth=12)
    with pytest.raises(ValueError, match="2 entries"):
        make_image(0, shape=(10, 10, 10))
    with pytest.raises(ValueError, match=">= 16"):
        make_image(0, shape=(8, 64))
    with pytest.raises(ValueError, match="z, y, x"):
        z_extent(np.zeros((4, 4), int), 1)
    with pytest.raises(ValueError, match="not present"):
        z_extent(np.zeros((4, 4, 4), int), 1)

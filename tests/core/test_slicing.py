"""Planes of N-D images: keys, reading a plane, lifting/dropping points, layer offsets."""

import numpy as np
import pytest

from napari_sam import slicing as s


def test_check_image_shape():
    assert s.check_image_shape((10, 20)) == (10, 20)
    assert s.check_image_shape((10, 20, 3), rgb=True) == (10, 20)
    assert s.check_image_shape((4, 10, 20, 4), rgb=True) == (4, 10, 20)
    with pytest.raises(ValueError, match="4D images are not supported"):
        s.check_image_shape((2, 3, 10, 20))
    with pytest.raises(ValueError, match="1D"):
        s.check_image_shape((10,))
    with pytest.raises(ValueError, match="RGB image needs a last axis of length 3 or 4"):
        s.check_image_shape((10, 20, 5), rgb=True)
    with pytest.raises(ValueError, match="empty"):
        s.check_image_shape((0, 20))


def test_key_from_point_rounds_and_rejects_outside():
    shape = (8, 30, 40)
    assert s.key_from_point((2.4, 7.0, 9.0), (1, 2), shape) == (2, None, None)
    assert s.key_from_point((2.6, 7.0, 9.0), (2, 1), shape) == (3, None, None)
    assert s.key_from_point((2.0, 12.2, 9.0), (0, 2), shape) == (None, 12, None)
    assert s.key_from_point((8.2, 0, 0), (1, 2), shape) is None
    assert s.key_from_point((-0.6, 0, 0), (1, 2), shape) is None
    assert s.key_from_point((3.0, 4.0), (0, 1), (10, 10)) == (None, None)


def test_take_plane_and_views():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    np.testing.assert_array_equal(s.take_plane(vol, (2, None, None)), vol[2])
    np.testing.assert_array_equal(s.take_plane(vol, (None, 3, None)), vol[:, 3, :])
    rgb = np.arange(4 * 5 * 6 * 3).reshape(4, 5, 6, 3)
    assert s.take_plane(rgb, (1, None, None), rgb=True).shape == (5, 6, 3)
    labels = np.zeros((4, 5, 6), np.uint32)
    labels[s.plane_index((None, 3, None))][1, 2] = 7  # a view: writes go through
    assert labels[1, 3, 2] == 7
    assert s.plane_shape(vol.shape, (None, 3, None)) == (4, 6)


def test_take_plane_reads_dask_lazily():
    da = pytest.importorskip("dask.array")
    vol = da.from_array(np.arange(3 * 4 * 5).reshape(3, 4, 5), chunks=(1, 4, 5))
    out = s.take_plane(vol, (1, None, None))
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, np.arange(3 * 4 * 5).reshape(3, 4, 5)[1])


def test_lift_drop_and_on_plane():
    key = (None, 4, None)
    nd = s.lift_points([[1.0, 2.0], [3.0, 5.0]], key)
    np.testing.assert_array_equal(nd, [[1, 4, 2], [3, 4, 5]])
    np.testing.assert_array_equal(s.drop_to_plane(nd, key), [[1, 2], [3, 5]])
    pts = np.array([[0, 4.2, 1], [0, 4.6, 1], [0, 3.6, 1], [0, 3.4, 1]])
    np.testing.assert_array_equal(s.on_plane(pts, key), [True, False, True, False])


def test_plane_translate_puts_a_single_plane_layer_on_its_slice():
    scale, translate = (2.0, 0.5, 0.5), (10.0, -3.0, 1.0)
    t = s.plane_translate((3, None, None), scale, translate)
    np.testing.assert_allclose(t, [16.0, -3.0, 1.0])
    # world position of the single plane's pixel centre == image's plane 3
    assert 0 * scale[0] + t[0] == 3 * scale[0] + translate[0]
    assert s.plane_layer_shape((8, 30, 40), (3, None, None)) == (1, 30, 40)
    assert s.describe_key((3, None, None), "zyx") == "z=3"
    assert s.describe_key((None, None)) == "2D"


def test_check_key():
    with pytest.raises(ValueError, match="outside the image"):
        s.check_key((9, None, None), (8, 5, 5))
    with pytest.raises(ValueError, match="exactly two axes"):
        s.check_key((1, 2, None), (8, 5, 5))


def test_display_size_blocks_and_their_layer_offset():
    assert s.display_size((4096, 4096), 1024) == (1024, 1024)
    assert s.display_size((1024, 700), 1024) == (1024, 700)  # fits: unchanged
    assert s.display_size((3000, 2001), 1024) == (1000, 667)  # 3 x 3 blocks
    assert s.display_size((96, 128), 32) == (24, 32)
    assert s.display_size((5000, 1), 1000) == (1000, 1)
    assert s.display_size((4096, 4096), None) == (4096, 4096)
    assert s.display_size((4096, 4096), 0) == (4096, 4096)
    # a (z, x) plane of a stack held at 3 x 4 plane pixels per layer pixel
    key, scale, translate = (None, 7, None), (2.0, 0.5, 0.25), (10.0, -3.0, 1.0)
    block = (3.0, 4.0)
    t = s.plane_translate(key, scale, translate, block=block)
    layer_scale = np.array(scale) * [3.0, 1.0, 4.0]
    assert s.plane_layer_shape((30, 20, 40), key, (10, 10)) == (10, 1, 10)
    for i, j in [(0, 0), (2, 5), (9, 9)]:
        world = t + layer_scale * [i, 0, j]
        # the centre of the 3 x 4 block of plane pixels that layer pixel (i, j) covers
        centre = np.array([3 * i + 1.0, 7.0, 4 * j + 1.5])
        np.testing.assert_allclose(world, translate + np.array(scale) * centre)

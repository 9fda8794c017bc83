"""napari (row, col) <-> SAM (x, y): the one conversion, both ways."""

import numpy as np
import pytest

from napari_sam.prompts import box_rc_to_xyxy, rc_to_xy, xy_to_rc


def test_points_round_trip_and_axis_order():
    rc = np.array([[10.0, 3.0], [0.0, 7.5]])
    xy = rc_to_xy(rc)
    np.testing.assert_array_equal(xy, [[3.0, 10.0], [7.5, 0.0]])
    np.testing.assert_array_equal(xy_to_rc(xy), rc)


def test_pixel_of_a_point_is_the_same_in_both_frames():
    image = np.zeros((5, 9))
    image[4, 1] = 1  # row 4, col 1
    ((x, y),) = rc_to_xy([[4, 1]])
    assert image[int(y), int(x)] == 1


def test_box_corners_any_order():
    np.testing.assert_array_equal(box_rc_to_xyxy([[20, 30], [10, 5]]), [5, 10, 30, 20])


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="points"):
        rc_to_xy(np.zeros((2, 1)))
    with pytest.raises(ValueError, match="points"):
        xy_to_rc(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="box"):
        box_rc_to_xyxy(np.zeros((1, 2)))

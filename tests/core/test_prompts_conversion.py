"""napari (row, col) <-> SAM (x, y): the one conversion, both ways."""

import numpy as np
import pytest

from napari_sam.prompts import box_rc_to_xyxy, rc_to_xy, xy_to_rc, xyxy_to_box_rc


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
    np.testing.assert_array_equal(box_rc_to_xyxy([20, 30, 10, 5]), [5, 10, 30, 20])
    np.testing.assert_array_equal(xyxy_to_box_rc(box_rc_to_xyxy([10, 5, 20, 30])), [10, 5, 20, 30])


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((2, 3))])
def test_bad_shapes_are_named(bad):
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        rc_to_xy(bad)
    with pytest.raises(ValueError, match="box"):
        box_rc_to_xyxy(np.zeros(5))

"""napari (row, col) <-> SAM (x, y) conversion and prompt validation (napari_sam.prompts)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from napari_sam.prompts import (
    PromptWarning,
    box_rc_to_xyxy,
    check_boxes,
    check_points,
    points_on_slice,
    rc_to_xy,
    xy_to_rc,
    xyxy_to_box_rc,
)


def test_rc_to_xy_swaps_axes_and_indexes_the_same_pixel():
    img = np.zeros((20, 30))
    img[5, 17] = 1.0  # napari point (row=5, col=17)
    xy = rc_to_xy([[5, 17]])
    np.testing.assert_array_equal(xy, [[17, 5]])
    x, y = xy[0]
    assert img[int(y), int(x)] == 1.0  # SAM (x, y) indexes image[y, x]


def test_round_trip_both_ways():
    rng = np.random.default_rng(0)
    rc = rng.uniform(0, 100, (7, 2))
    np.testing.assert_array_equal(xy_to_rc(rc_to_xy(rc)), rc)
    xy = rng.uniform(0, 100, (7, 2))
    np.testing.assert_array_equal(rc_to_xy(xy_to_rc(xy)), xy)
    assert rc_to_xy(rc).dtype == np.float64


def test_nd_points_keep_the_last_two_axes():
    zrc = np.array([[3, 10, 20], [3, 11, 21.5]])
    np.testing.assert_array_equal(rc_to_xy(zrc), [[20, 10], [21.5, 11]])
    np.testing.assert_array_equal(rc_to_xy([4, 10, 20]), [[20, 10]])  # single point


def test_points_on_slice():
    pts = np.array([[3, 1, 1], [3.4, 2, 2], [4, 3, 3], [2.6, 4, 4]])
    np.testing.assert_array_equal(points_on_slice(pts, 3), [True, True, False, True])
    pts4 = np.array([[0, 3, 1, 1], [1, 3, 2, 2]])
    np.testing.assert_array_equal(points_on_slice(pts4, (1, 3)), [False, True])
    with pytest.raises(ValueError, match="leading coordinate"):
        points_on_slice(pts4, 3)


def test_bad_point_shapes():
    with pytest.raises(ValueError, match="row, col"):
        rc_to_xy(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="\\(x, y\\)"):
        xy_to_rc(np.zeros((3, 3)))
    with pytest.raises(TypeError, match="numeric"):
        rc_to_xy([["a", "b"]])


def test_box_from_napari_rectangle_vertices_in_any_order():
    # napari rectangle vertices (row, col): rows 10..40, cols 5..25
    verts = np.array([[10, 5], [40, 5], [40, 25], [10, 25]])
    expected = [5, 10, 25, 40]  # XYXY = (col_min, row_min, col_max, row_max)
    np.testing.assert_array_equal(box_rc_to_xyxy(verts), expected)
    np.testing.assert_array_equal(box_rc_to_xyxy(verts[[2, 0, 3, 1]]), expected)
    np.testing.assert_array_equal(box_rc_to_xyxy([[40, 25], [10, 5]]), expected)  # 2 corners
    with_z = np.column_stack([np.full(4, 7), verts])
    np.testing.assert_array_equal(box_rc_to_xyxy(with_z), expected)


def test_box_batch_and_round_trip():
    boxes = np.array([[5.0, 10, 25, 40], [0, 0, 3, 2]])
    verts = xyxy_to_box_rc(boxes)
    assert verts.shape == (2, 4, 2)
    np.testing.assert_array_equal(verts[0], [[10, 5], [10, 25], [40, 25], [40, 5]])
    np.testing.assert_array_equal(box_rc_to_xyxy(verts), boxes)
    np.testing.assert_array_equal(box_rc_to_xyxy(xyxy_to_box_rc(boxes[0])), boxes[0])
    with pytest.raises(ValueError, match="XYXY"):
        xyxy_to_box_rc([1, 2, 3])
    with pytest.raises(ValueError, match="K >= 2"):
        box_rc_to_xyxy([[1, 2]])


def test_napari_shapes_rectangle_converts_to_its_bounding_box():
    napari_layers = pytest.importorskip("napari.layers")
    layer = napari_layers.Shapes([[[12, 3], [30, 18]]], shape_type="rectangle")
    np.testing.assert_array_equal(box_rc_to_xyxy(layer.data[0]), [3, 12, 18, 30])
    # and back: our vertices make the same rectangle in napari
    layer2 = napari_layers.Shapes([xyxy_to_box_rc([3, 12, 18, 30])], shape_type="rectangle")
    np.testing.assert_array_equal(box_rc_to_xyxy(layer2.data[0]), [3, 12, 18, 30])


def test_check_points_accepts_good_prompts():
    c, lab = check_points([[1.0, 2.0], [3, 4]], [1, 0], (10, 10))
    assert c.shape == (2, 2) and lab.dtype == np.int64
    c, lab = check_points(np.zeros((3, 2, 2)), np.ones((3, 2)), (10, 10))
    assert c.shape == (3, 2, 2) and lab.shape == (3, 2)


@pytest.mark.parametrize(
    ("coords", "labels", "match"),
    [
        ([[1, 2]], None, "point_labels must be given"),
        ([1, 2], [1], "\\(N, 2\\)"),
        ([[1, 2, 3]], [1], "\\(N, 2\\)"),
        (np.zeros((0, 2)), [], "empty"),
        ([[1, 2], [3, 4]], [1], "one label per point"),
        ([[np.nan, 2]], [1], "NaN"),
        ([[1, 2]], [5], "foreground"),
    ],
)
def test_check_points_errors(coords, labels, match):
    with pytest.raises(ValueError, match=match):
        check_points(coords, labels, (10, 10))


def test_points_outside_the_image_warn():
    with pytest.warns(PromptWarning, match="outside"):
        check_points([[15.0, 2.0]], [1], (10, 10))  # x = 15 > W
    with pytest.warns(PromptWarning, match="outside"):
        check_points([[2.0, -3.0]], [0], (10, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_points([[9.4, 9.4], [-0.5, 0]], [1, 1], (10, 10))  # on the edge pixels: fine
        check_points([[50.0, 50.0]], [-1], (10, 10))  # padding points are ignored


def test_check_boxes():
    assert check_boxes([1, 2, 3, 4], (10, 10)).shape == (4,)
    assert check_boxes([[1, 2, 3, 4], [0, 0, 9, 9]], (10, 10)).shape == (2, 4)
    with pytest.raises(ValueError, match="zero area"):
        check_boxes([3, 2, 3, 8])
    with pytest.raises(ValueError, match="x_min <= x_max"):
        check_boxes([5, 2, 3, 8])
    with pytest.raises(ValueError, match="NaN"):
        check_boxes([0, 0, np.inf, 1])
    with pytest.raises(ValueError, match="XYXY"):
        check_boxes([[[0, 0, 1, 1]]])
    with pytest.raises(ValueError, match="empty"):
        check_boxes(np.zeros((0, 4)))
    with pytest.warns(PromptWarning, match="entirely outside"):
        check_boxes([20, 20, 30, 30], (10, 10))

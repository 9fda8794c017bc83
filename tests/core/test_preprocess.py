"""Contrast normalisation and resizing to the encoder input (napari_sam.preprocess)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam import preprocess
from napari_sam.preprocess import (
    CT_WINDOWS,
    Contrast,
    ResizeLongestSide,
    check_slice,
    intensity_limits,
    resize_to_input,
    to_uint8_rgb,
)


def _expected(x, lo, hi):
    y = np.clip((np.asarray(x, np.float64) - lo) / (hi - lo), 0, 1) * 255
    return np.rint(y).astype(np.uint8)


# ---------------------------------------------------------------- contrast modes
def test_auto_uint8_rgb_passes_through_unchanged():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    out = to_uint8_rgb(img)
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, img)


def test_auto_uint8_grey_is_repeated_into_three_channels():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = to_uint8_rgb(img)
    assert out.shape == (3, 4, 3) and out.flags.c_contiguous
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], img)


def test_auto_uint16_uses_percentiles():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 4096, (40, 50)).astype(np.uint16)
    img[0, 0] = 65535  # a hot pixel must not set the range
    lo, hi = np.percentile(img, [0.5, 99.5])
    out = to_uint8_rgb(img)
    np.testing.assert_array_equal(out[..., 0], _expected(img, lo, hi))
    assert out[0, 0, 0] == 255
    assert intensity_limits(img) == pytest.approx((lo, hi))


def test_percentile_mode_on_uint8_rescales():
    img = np.full((10, 10), 100, np.uint8)
    img[:5] = 110
    out = to_uint8_rgb(img, Contrast("percentile", low=0, high=100))
    assert set(np.unique(out)) == {0, 255}


def test_custom_percentiles():
    img = np.linspace(0, 1, 1000, dtype=np.float32).reshape(20, 50)
    c = Contrast("percentile", low=10, high=90)
    lo, hi = np.percentile(img, [10, 90])
    np.testing.assert_array_equal(to_uint8_rgb(img, c)[..., 1], _expected(img, lo, hi))


def test_window_ct_soft_tissue():
    hu = np.array([[-1000, -160, 40], [240, 1000, 3000]], dtype=np.int16)
    c = Contrast.from_window(40, 400)
    assert (c.vmin, c.vmax) == (-160, 240)
    assert Contrast.ct("soft_tissue") == c
    out = to_uint8_rgb(hu, c)[..., 0]
    np.testing.assert_array_equal(out, [[0, 0, 128], [255, 255, 255]])


def test_minmax():
    img = np.array([[-5.0, 0.0], [5.0, 15.0]])
    out = to_uint8_rgb(img, Contrast("minmax"))[..., 2]
    np.testing.assert_array_equal(out, _expected(img, -5, 15))
    assert out.min() == 0 and out.max() == 255


def test_rgb_float_shares_one_range_over_channels():
    img = np.zeros((4, 4, 3), np.float32)
    img[..., 0] = 1.0  # red channel brighter than green/blue
    img[..., 1] = 0.5
    out = to_uint8_rgb(img, Contrast("minmax"))
    assert out[0, 0].tolist() == [255, 128, 0]


def test_bool_maps_to_0_255():
    img = np.eye(3, dtype=bool)
    np.testing.assert_array_equal(to_uint8_rgb(img)[..., 0], np.eye(3, dtype=np.uint8) * 255)


# ---------------------------------------------------------------- NaN / inf / degenerate
def test_nan_and_inf_are_safe_and_ignored_by_percentiles():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(30, 30)).astype(np.float32)
    finite = img.copy()
    img[3, 4] = np.nan
    img[5, 6] = np.inf
    img[7, 8] = -np.inf
    lo, hi = np.percentile(
        np.delete(finite.ravel(), [3 * 30 + 4, 5 * 30 + 6, 7 * 30 + 8]), [0.5, 99.5]
    )
    out = to_uint8_rgb(img)[..., 0]
    assert out[3, 4] == 0 and out[5, 6] == 255 and out[7, 8] == 0
    mask = np.isfinite(img)
    np.testing.assert_array_equal(out[mask], _expected(img[mask], lo, hi))


@pytest.mark.parametrize(
    "img",
    [
        np.full((5, 6), np.nan, np.float32),
        np.full((5, 6), 7.0),
        np.full((5, 6, 3), 1000, np.uint16),
        np.array([[np.inf, -np.inf]]),
    ],
    ids=["all-nan", "constant-float", "constant-uint16-rgb", "only-inf"],
)
def test_degenerate_slices_give_zero_image(img):
    out = to_uint8_rgb(img)
    assert out.shape == (*img.shape[:2], 3) and out.dtype == np.uint8
    assert not out.any()


def test_large_slice_percentiles_use_regular_subsample(monkeypatch):
    monkeypatch.setattr(preprocess, "PERCENTILE_SAMPLE", 1000)
    rng = np.random.default_rng(3)
    img = rng.normal(size=(100, 100)).astype(np.float32)
    lo, hi = intensity_limits(img)
    sub = img.ravel()[::10]
    assert (lo, hi) == pytest.approx(tuple(np.percentile(sub, [0.5, 99.5])))
    exact = np.percentile(img, [0.5, 99.5])
    assert abs(lo - exact[0]) < 0.5 and abs(hi - exact[1]) < 0.5


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("shape", "hint"),
    [
        ((10,), "2D slice"),
        ((2, 3, 4, 5), "volume\\[z\\]"),
        ((8, 8, 2), "Pick one channel"),
        ((8, 8, 4), "alpha"),
        ((3, 8, 8), "channel-first"),
    ],
)
def test_unsupported_shapes_are_rejected_with_a_hint(shape, hint):
    with pytest.raises(ValueError, match=hint):
        to_uint8_rgb(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0, 3)])
def test_empty_images_are_rejected(shape):
    with pytest.raises(ValueError, match="empty"):
        check_slice(np.zeros(shape))


def test_non_numeric_images_are_rejected():
    with pytest.raises(TypeError, match="numeric"):
        check_slice(np.array([["a", "b"]]))
    with pytest.raises(TypeError, match="real-valued"):
        check_slice(np.ones((3, 3), np.complex64))


def test_hw1_is_read_as_grey():
    img = np.arange(6, dtype=np.uint8).reshape(2, 3, 1)
    np.testing.assert_array_equal(to_uint8_rgb(img)[..., 1], img[..., 0])


def test_invalid_contrast_settings():
    with pytest.raises(ValueError, match="mode"):
        Contrast("gamma")
    with pytest.raises(ValueError, match="low < high"):
        Contrast("percentile", low=50, high=50)
    with pytest.raises(ValueError, match="vmin and vmax"):
        Contrast("window")
    with pytest.raises(ValueError, match="vmin < vmax"):
        Contrast("window", vmin=5, vmax=1)
    with pytest.raises(ValueError, match="width"):
        Contrast.from_window(0, 0)
    with pytest.raises(ValueError, match="unknown CT window"):
        Contrast.ct("kidney-stone")


def test_contrast_key_is_stable_and_distinguishes_settings():
    keys = {
        Contrast().key(),
        Contrast("percentile").key(),
        Contrast("percentile", low=1).key(),
        Contrast("minmax").key(),
        Contrast.from_window(40, 400).key(),
        Contrast.from_window(40, 80).key(),
    }
    assert len(keys) == 6
    assert Contrast("percentile", 1, 99).key() == Contrast("percentile", 1.0, 99.0).key()
    assert Contrast.from_window(40, 400).key() == "window:-160.0:240.0"
    assert set(CT_WINDOWS) >= {"soft_tissue", "lung", "bone"}


# ---------------------------------------------------------------- resizing
@pytest.mark.parametrize(
    ("hw", "expected"),
    [
        ((1024, 1024), (1024, 1024)),
        ((600, 800), (768, 1024)),
        ((8, 8), (1024, 1024)),
        ((4000, 300), (1024, 77)),
        ((1, 37), (28, 1024)),
        ((1, 5000), (1, 1024)),  # 0.2 rounds to 0 -> clamped to 1
        ((3000, 1), (1024, 1)),
    ],
)
def test_preprocess_shape(hw, expected):
    assert ResizeLongestSide.get_preprocess_shape(*hw, 1024) == expected
    rgb = np.zeros((*hw, 3), np.uint8)
    t = resize_to_input(rgb, 1024)
    assert tuple(t.shape) == (1, 3, *expected)
    assert str(t.dtype) == "torch.uint8"


@pytest.mark.parametrize("hw", [(600, 800), (2000, 1500), (8, 8), (300, 500), (4000, 300)])
def test_resize_agrees_with_pil_bilinear(hw):
    from PIL import Image

    rng = np.random.default_rng(4)
    # smooth content plus noise, like a real image
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]]
    base = (np.sin(xx / 7.0) + np.cos(yy / 11.0) + 2) * 60
    img = np.clip(base[..., None] + rng.normal(0, 10, (*hw, 3)), 0, 255).astype(np.uint8)
    nh, nw = ResizeLongestSide.get_preprocess_shape(*hw, 1024)
    pil = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR)).astype(int)
    ours = ResizeLongestSide(1024).apply_image(img).astype(int)
    assert ours.shape == pil.shape
    assert np.abs(ours - pil).max() <= 1
    assert (ours != pil).mean() < 0.2


def test_coordinate_transform_scales_each_axis():
    t = ResizeLongestSide(1024)
    # (H, W) = (600, 800) -> (768, 1024): x * 1024/800, y * 768/600
    xy = t.apply_coords(np.array([[800.0, 600.0], [10.0, 20.0]]), (600, 800))
    np.testing.assert_allclose(xy, [[1024, 768], [12.8, 25.6]])
    boxes = t.apply_boxes(np.array([0, 0, 400, 300]), (600, 800))
    np.testing.assert_allclose(boxes, [[0, 0, 512, 384]])
    import torch

    xy_t = t.apply_coords_torch(torch.tensor([[800.0, 600.0]]), (600, 800))
    np.testing.assert_allclose(xy_t.numpy(), [[1024, 768]])
    b_t = t.apply_boxes_torch(torch.tensor([[0.0, 0, 400, 300]]), (600, 800))
    np.testing.assert_allclose(b_t.numpy(), [[0, 0, 512, 384]])


def test_coordinate_transform_matches_official(official_transform):
    ref = official_transform(1024)
    ours = ResizeLongestSide(1024)
    pts = np.array([[3.0, 7.0], [250.5, 11.25]])
    for size in [(600, 800), (4000, 300), (37, 1), (1024, 1024)]:
        np.testing.assert_allclose(ours.apply_coords(pts, size), ref.apply_coords(pts, size))
        box = np.array([[1.0, 2.0, 30.0, 40.0]])
        np.testing.assert_allclose(ours.apply_boxes(box, size), ref.apply_boxes(box, size))


@pytest.fixture
def official_transform():
    import sys
    from pathlib import Path

    tests = str(Path(__file__).resolve().parents[1])
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from reference.official import import_official, official_available

    if not official_available():
        pytest.skip("segment-anything not installed")
    return import_official().utils.transforms.ResizeLongestSide


def test_resize_longest_side_min_side():
    from napari_sam.preprocess import ResizeLongestSide, input_scale, resize_to_input

    sam = ResizeLongestSide(512)
    nsam = ResizeLongestSide(512, min_side=256)
    assert sam.input_size((256, 128)) == (512, 256)
    assert nsam.input_size((256, 128)) == (256, 128)  # kept: between min_side and 512
    assert nsam.input_size((400, 100)) == (400, 100)
    assert nsam.input_size((64, 32)) == (256, 128)  # tiny: enlarged to min_side only
    assert nsam.input_size((1024, 300)) == sam.input_size((1024, 300)) == (512, 150)
    assert input_scale(61, 57, 512, 256) == 256 / 61
    assert (sam.key(), nsam.key()) == ("S512", "S512m256")
    rgb = np.zeros((300, 30, 3), np.uint8)
    assert tuple(resize_to_input(rgb, 512, 256).shape) == (1, 3, 300, 30)
    assert tuple(resize_to_input(rgb, 512).shape) == (1, 3, 512, 51)
    assert ResizeLongestSide(96, min_side=256).min_side is None  # SAM's rule
    with pytest.raises(ValueError, match="min_side"):
        ResizeLongestSide(512, min_side=0)

"""Prompt simulation invariants on synthetic instance labels."""

import numpy as np
import pytest

from napari_sam.train import prompts as P
from napari_sam.train.synthetic import make_image


def _objects(seed, n=6):
    _, lab = make_image(seed, (96, 80), kind="mixed")
    ids = [i for i in np.unique(lab) if i]
    return [lab == i for i in ids[:n]]


@pytest.mark.parametrize("seed", range(4))
def test_first_point_inside_and_box_within_bounds(seed):
    rng = np.random.default_rng(seed)
    for mask in _objects(seed):
        for _ in range(5):
            ((x, y),) = P.first_point(mask, rng)
            assert mask[int(y), int(x)]
            box = P.noisy_box(mask, rng, noise=0.1, max_shift=20)
            tight = P.mask_box(mask)
            h, w = mask.shape
            assert 0 <= box[0] <= box[2] <= w - 1
            assert 0 <= box[1] <= box[3] <= h - 1
            assert np.all(np.abs(box - tight) <= 20 + 1e-4)
            # a huge noise is still bounded by max_shift and the image
            big = P.noisy_box(mask, rng, noise=10.0, max_shift=3)
            assert np.all(np.abs(big - tight) <= 3 + 1e-4)


def test_box_noise_is_proportional_to_side():
    rng = np.random.default_rng(0)
    small = np.zeros((200, 200), bool)
    small[100:110, 100:110] = True
    large = np.zeros((200, 200), bool)
    large[20:180, 20:180] = True
    d_small = np.std(
        [P.noisy_box(small, rng, max_shift=1e9) - P.mask_box(small) for _ in range(300)]
    )
    d_large = np.std(
        [P.noisy_box(large, rng, max_shift=1e9) - P.mask_box(large) for _ in range(300)]
    )
    assert d_small == pytest.approx(1.0, rel=0.25)  # 10 % of 10 px
    assert d_large == pytest.approx(16.0, rel=0.25)  # 10 % of 160 px, mostly unclipped


@pytest.mark.parametrize("mode", ["center", "uniform"])
def test_corrections_positive_in_missed_negative_in_extra(mode):
    rng = np.random.default_rng(1)
    for seed in range(3):
        for mask in _objects(seed):
            # prediction: the object shifted by a few pixels (both FN and FP regions)
            pred = np.roll(mask, (3, -2), axis=(0, 1))
            for _ in range(5):
                (xy, label) = P.correction_point(pred, mask, rng, mode)
                x, y = int(xy[0, 0]), int(xy[0, 1])
                if label == P.POSITIVE:
                    assert mask[y, x] and not pred[y, x]
                else:
                    assert label == P.NEGATIVE
                    assert pred[y, x] and not mask[y, x]


def test_center_click_is_farthest_inside_error():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    pred = np.zeros_like(mask)  # everything missed: click the object's centre
    (xy, label) = P.correction_point(pred, mask, mode="center")
    assert label == P.POSITIVE
    assert abs(xy[0, 0] - 19.5) <= 0.5 and abs(xy[0, 1] - 19.5) <= 0.5
    # a large false positive blob wins over a thin false-negative line
    pred = mask.copy()
    pred[:, 5] = False
    extra = np.zeros_like(mask)
    extra[0:4, 0:40] = False
    pred2 = pred | np.pad(np.ones((10, 10), bool), ((0, 30), (30, 0)))[:40, :40] & ~mask
    (xy, label) = P.correction_point(pred2, mask, mode="center")
    assert label == P.NEGATIVE and not mask[int(xy[0, 1]), int(xy[0, 0])]


def test_no_error_gives_none_and_bad_input_raises():
    mask = np.zeros((10, 10), bool)
    mask[2:5, 2:5] = True
    assert P.correction_point(mask, mask) is None
    with pytest.raises(ValueError, match="empty"):
        P.first_point(np.zeros((5, 5), bool), np.random.default_rng(0))
    with pytest.raises(ValueError, match="same shape"):
        P.correction_point(mask, mask[:5])
    with pytest.raises(ValueError, match="2D"):
        P.mask_box(np.zeros((2, 2, 2), bool))
    with pytest.raises(ValueError, match="rng"):
        P.correction_point(~mask, mask, mode="uniform")
    with pytest.raises(ValueError, match="mode"):
        P.correction_point(~mask, mask, mode="random")


def test_interaction_and_schedule():
    rng = np.random.default_rng(0)
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    it = P.start(mask, rng, "point")
    assert it.points.shape == (1, 2) and it.labels.tolist() == [1] and it.box is None
    it.add_point(np.array([1.0, 1.0]), P.NEGATIVE)
    assert it.points.shape == (2, 2) and it.labels.tolist() == [1, 0]
    it = P.start(mask, rng, "box")
    assert it.points.shape == (0, 2) and it.box.shape == (4,)
    assert P.round_schedule(2, 1) == ["first", "click", "click", "mask"]
    with pytest.raises(ValueError):
        P.start(mask, rng, "scribble")


def test_perturb_mask_is_a_nearby_nonempty_mask():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(1)
    mask = np.zeros((80, 80), bool)
    mask[30:50, 25:55] = True
    r = np.sqrt(mask.sum() / np.pi)
    ious = []
    for _ in range(50):
        out = P.perturb_mask(mask, rng)
        assert out.shape == mask.shape and out.dtype == bool and out.any()
        cy, cx = ndi.center_of_mass(out)
        # moved by at most r/3 per axis (plus the grow/shrink, which keeps the centre)
        assert abs(cy - 39.5) <= r / 3 + 1 and abs(cx - 39.5) <= r / 3 + 1
        ious.append((out & mask).sum() / (out | mask).sum())
    assert 0.4 < np.mean(ious) < 0.98  # changed, but still the same object
    assert np.std(ious) > 0.02  # and by varying amounts


def test_perturb_mask_of_a_tiny_object_never_empties_it():
    rng = np.random.default_rng(2)
    mask = np.zeros((20, 20), bool)
    mask[0, 0] = True  # one pixel in a corner: shifts and erosions could lose it
    for _ in range(30):
        assert P.perturb_mask(mask, rng).any()

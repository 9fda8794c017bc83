"""Clicked parts only: masks keep the connected parts that a positive click touches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_sam import load_model
from napari_sam._masks import keep_clicked_parts, upsample_binary
from napari_sam.predictor import SamPredictor
from napari_sam.train import prompts as P
from napari_sam.train.synthetic import make_image

EIGHT = np.ones((3, 3), bool)


def _component_at(mask: np.ndarray, xy) -> np.ndarray:
    parts, _ = ndimage.label(mask, structure=EIGHT)
    x, y = (int(round(v)) for v in xy)
    assert parts[y, x] > 0, "the click must lie on the mask in this test"
    return parts == parts[y, x]


@pytest.mark.parametrize(
    "geometry",
    [((64, 64), (64, 64), 64), ((46, 64), (50, 70), 64), ((64, 40), (200, 125), 64)],
    ids=["square", "wide", "tall-enlarged"],
)
def test_unclicked_parts_are_dropped_and_the_rest_is_unchanged(geometry):
    (ih, iw), (oh, ow), size = geometry
    low = torch.full((1, 2, 16, 16), -5.0)
    low[..., 1:4, 1:5] = 4.0  # part A
    low[..., 7:10, 6:9] = 2.5  # part B
    low[0, 1, 2, 10] = 1.0  # a one-cell part C, in the second mask only
    before = upsample_binary(low, (ih, iw), (oh, ow), size)[0].numpy()
    a_xy = np.argwhere(_component_at(before[0], _centre(before[0], low, geometry, (2, 2))))
    assert len(a_xy)
    click = _centre(before[0], low, geometry, (2, 2))
    out = keep_clicked_parts(low, np.array([click]), (ih, iw), (oh, ow), size)
    after = upsample_binary(out, (ih, iw), (oh, ow), size)[0].numpy()
    for m in range(2):
        expected = _component_at(before[m], click)
        np.testing.assert_array_equal(after[m], expected)
        assert before[m].sum() > expected.sum()  # something was dropped
    assert torch.equal(low, low.clone())  # input not modified
    # dropped logits are below the threshold, kept ones untouched
    assert (out[..., 1:4, 1:5] == 4.0).all() and (out[..., 7:10, 6:9] < 0).all()
    # clicks on both parts of the first mask keep it whole
    click_b = _centre(before[0], low, geometry, (8, 7))
    both = keep_clicked_parts(low[:, :1], np.array([click, click_b]), (ih, iw), (oh, ow), size)
    assert torch.equal(both, low[:, :1])
    # a click that touches no part leaves the masks whole
    far = np.array([[ow - 1.0, oh - 1.0]])
    assert torch.equal(keep_clicked_parts(low, far, (ih, iw), (oh, ow), size), low)


def _centre(mask, low, geometry, cell):
    """Slice (x, y) of a mask pixel inside low-res cell ``cell`` (row, col)."""
    (ih, iw), (oh, ow), size = geometry
    lh, lw = low.shape[-2:]
    sy, sx = oh * size / (ih * lh), ow * size / (iw * lw)
    y, x = (cell[0] + 0.5) * sy - 0.5, (cell[1] + 0.5) * sx - 0.5
    y, x = int(round(min(y, oh - 1))), int(round(min(x, ow - 1)))
    assert mask[y, x]
    return (float(x), float(y))


def test_per_row_clicks_of_a_batch():
    low = torch.full((2, 1, 16, 16), -5.0)
    low[..., 1:4, 1:4] = 3.0
    low[..., 10:13, 10:13] = 3.0
    geo = ((64, 64), (64, 64), 64)
    rows = [np.array([[9.0, 9.0]]), np.array([[45.0, 45.0]])]  # row 0: part 1, row 1: part 2
    out = keep_clicked_parts(low, rows, *geo)
    masks = upsample_binary(out, *geo)[:, 0].numpy()
    assert masks[0, 9, 9] and not masks[0, 45, 45]
    assert masks[1, 45, 45] and not masks[1, 9, 9]
    with pytest.raises(ValueError, match="point sets"):
        keep_clicked_parts(low, rows[:1], *geo)


@pytest.fixture(scope="module")
def nuclei():
    pred = SamPredictor(load_model())
    img, lab = make_image(3_000_000, (256, 256), "nuclei", 8)
    pred.set_image(img)
    return pred, lab


def test_bundled_model_clicks_lose_only_their_stray_parts(nuclei):
    pred, lab = nuclei
    split = 0
    for i in np.unique(lab)[1:60]:
        gt = lab == i
        if gt.sum() < 20:
            continue
        xy, _ = P.correction_point(np.zeros_like(gt), gt, mode="center")
        one = np.array([1])
        plain, s0, _ = pred.predict(point_coords=xy, point_labels=one)
        kept, s1, low = pred.predict(point_coords=xy, point_labels=one, clicked_parts_only=True)
        np.testing.assert_array_equal(s0, s1)  # predicted IoUs are the model's
        # the low-res logits returned give the same masks (commit, refinement)
        np.testing.assert_array_equal(pred.masks_from_logits(low), kept)
        for m in range(3):
            assert not (kept[m] & ~plain[m]).any()
            x, y = int(xy[0, 0]), int(xy[0, 1])
            if not plain[m][y, x]:
                continue
            assert kept[m][y, x]
            parts, n = ndimage.label(plain[m], structure=EIGHT)
            for p in range(1, n + 1):
                part = parts == p
                if p == parts[y, x]:
                    assert kept[m][part].all()  # the clicked region is whole
                elif not kept[m][part].all():
                    split += 1
                    assert not kept[m][part].any()  # stray parts go whole
    assert split >= 3  # the model does add stray parts here (measured: 6)
    # boxes alone and negative clicks alone are not affected
    gt = lab == np.unique(lab)[5]
    box = P.mask_box(gt)
    a = pred.predict(box=box)[0]
    b = pred.predict(box=box, clicked_parts_only=True)[0]
    np.testing.assert_array_equal(a, b)
    neg = {"point_coords": np.array([[5.0, 5.0]]), "point_labels": np.array([0]), "box": box}
    np.testing.assert_array_equal(
        pred.predict(**neg)[0], pred.predict(**neg, clicked_parts_only=True)[0]
    )


def test_annotator_candidates_follow_the_setting(nuclei):
    from napari_sam.annotator import Annotator

    pred, lab = nuclei
    img, _ = make_image(3_000_000, (256, 256), "nuclei", 8)
    found = None
    for i in np.unique(lab)[1:60]:  # a click whose plain candidates have stray parts
        gt = lab == i
        xy, _ = P.correction_point(np.zeros_like(gt), gt, mode="center")
        plain = pred.predict(point_coords=xy, point_labels=np.array([1]))[0]
        kept = pred.predict(point_coords=xy, point_labels=np.array([1]), clicked_parts_only=True)
        if (plain != kept[0]).any():
            found = xy[0], plain, kept[0]
            break
    assert found is not None
    (x, y), plain, kept = found
    ann = Annotator(pred, img)
    assert ann.clicked_parts_only  # the plugin's default
    ann.add_point((y, x))
    np.testing.assert_array_equal(ann.update().masks, kept)
    ann.clicked_parts_only = False
    assert not ann.up_to_date
    np.testing.assert_array_equal(ann.update().masks, plain)
    ann.clicked_parts_only = True
    sel = ann.update() and ann.selected
    record = ann.commit()
    np.testing.assert_array_equal(ann.labels == record.label_id, kept[sel])
    np.testing.assert_array_equal(ann.replay(record), kept[sel])


def test_grow_equals_binary_dilation_by_a_square():
    from napari_sam._masks import _grow

    rng = np.random.default_rng(0)
    m = rng.random((3, 17, 23)) > 0.95
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = True
    for d in (1, 2, 3):
        np.testing.assert_array_equal(_grow(m, d), ndimage.binary_dilation(m, plane, d))

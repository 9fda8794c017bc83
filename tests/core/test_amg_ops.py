"""Building blocks of automatic segmentation, against hand-computed cases."""

import numpy as np
import pytest
import torch

from napari_sam import amg_ops


def test_point_grid_cell_centres_row_major():
    g = amg_ops.point_grid(2)
    np.testing.assert_allclose(g, [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    assert amg_ops.point_grid(32).shape == (1024, 2)
    with pytest.raises(ValueError, match="positive integer"):
        amg_ops.point_grid(0)


def test_grid_levels_coarse_to_fine():
    lv = amg_ops.grid_levels(8).reshape(8, 8)
    assert np.flatnonzero(lv.ravel() == 0).tolist() == [0, 4, 32, 36]  # (0,0) (0,4) (4,0) (4,4)
    assert (lv == 1).sum() == 16 - 4 and (lv == 2).sum() == 64 - 16
    assert lv[2, 6] == 1 and lv[1, 0] == 2
    # too small for coarse levels: everything at the finest level
    assert set(amg_ops.grid_levels(2).tolist()) == {2}
    assert set(amg_ops.grid_levels(4).tolist()) == {1, 2}


def test_stability_score_hand_computed():
    logits = torch.tensor(
        [
            [[-2.0, -0.5, 0.5, 1.5], [3.0, -3.0, 0.9, -0.9]],  # > 1: {1.5, 3}; > -1: 6 values
            [[-5.0, -5.0, -5.0, -5.0], [-5.0, -5.0, -5.0, -5.0]],  # empty
            [[2.0, 2.0, 2.0, 2.0], [2.0, 2.0, -4.0, -4.0]],  # 6 / 6
        ]
    )
    s = amg_ops.stability_score(logits, 0.0, 1.0)
    torch.testing.assert_close(s, torch.tensor([2 / 6, 0.0, 1.0]))
    # around 0.5: > 1.5 is {3}; > -0.5 is {0.5, 1.5, 3, 0.9}
    torch.testing.assert_close(amg_ops.stability_score(logits[:1], 0.5, 1.0), torch.tensor([0.25]))


def test_boxes_from_masks_inclusive_and_empty():
    m = torch.zeros(2, 5, 6, dtype=torch.bool)
    m[0, 1:3, 2:5] = True
    m[0, 4, 0] = True
    assert amg_ops.boxes_from_masks(m).tolist() == [[0, 1, 4, 4], [0, 0, -1, -1]]


def test_box_iou_hand_computed():
    a = [[0, 0, 1, 1]]  # 2 x 2 pixels
    b = [[1, 1, 2, 2], [0, 0, 1, 1], [5, 5, 6, 6]]
    np.testing.assert_allclose(amg_ops.box_iou(a, b).numpy(), [[1 / 7, 1.0, 0.0]])


def test_box_nms_hand_computed():
    boxes = [[0, 0, 9, 9], [1, 1, 10, 10], [0, 0, 9, 8]]
    scores = [0.9, 0.8, 0.95]
    # visit 2 (.95) keep; 0: IoU(0,2) = 90/100 = .9 > .7 drop; 1: IoU(1,2) = 72/118 = .61 keep
    assert amg_ops.box_nms(boxes, scores, 0.7).tolist() == [2, 1]
    # IoU(1, 0) = 81/119 = .68: a looser threshold keeps it
    assert amg_ops.box_nms(boxes, scores, 0.95).tolist() == [2, 0, 1]
    # ties keep input order
    assert amg_ops.box_nms([[0, 0, 1, 1], [0, 0, 1, 1]], [0.5, 0.5], 0.5).tolist() == [0]


def test_mask_nms_where_boxes_mislead():
    n = 10
    diag = torch.eye(n, dtype=torch.bool)
    anti = torch.flip(diag, [1])
    blob = torch.zeros(n, n, dtype=torch.bool)
    blob[1:7, 1:7] = True  # 36 px
    blob_stray = blob.clone()
    blob_stray[9, 9] = True  # one stray pixel stretches the box
    masks = torch.stack([diag, anti, blob, blob_stray])
    scores = [0.9, 0.8, 0.7, 0.75]
    boxes = amg_ops.boxes_from_masks(masks)
    # boxes: the anti-diagonal (same box) and the stray blob (box IoU .81) go with the
    # diagonal, the blob's duplicate survives (box IoU 36/100 with the diagonal)
    assert amg_ops.box_nms(boxes, scores, 0.7).tolist() == [0, 2]
    # masks: the diagonals are disjoint, the blobs are duplicates (IoU 36/37)
    assert amg_ops.mask_nms(masks, scores, 0.7).tolist() == [0, 1, 3]
    assert amg_ops.mask_nms(masks, scores, 0.99).tolist() == [0, 1, 3, 2]


def test_mask_nms_matches_brute_force():
    rng = np.random.default_rng(0)
    masks = torch.zeros(40, 32, 32, dtype=torch.bool)
    for i in range(40):
        y, x = rng.integers(0, 24, 2)
        h, w = rng.integers(3, 9, 2)
        masks[i, y : y + h, x : x + w] = True
    scores = torch.from_numpy(rng.random(40))
    flat = masks.flatten(1).double()
    inter = flat @ flat.T
    area = flat.sum(1)
    iou = inter / (area[:, None] + area[None] - inter)
    keep, dead = [], set()
    for i in torch.argsort(scores, descending=True).tolist():
        if i in dead:
            continue
        keep.append(i)
        dead |= set(torch.nonzero(iou[i] > 0.5).flatten().tolist())
    assert amg_ops.mask_nms(masks, scores, 0.5).tolist() == keep


def test_interp_matrix_matches_torch_interpolate():
    x = torch.randn(1, 1, 7, 5, dtype=torch.float64)
    for out in [(13, 11), (3, 2), (7, 5), (64, 40)]:
        ref = torch.nn.functional.interpolate(x, out, mode="bilinear", align_corners=False)
        my = torch.from_numpy(amg_ops.interp_matrix(out[0], 7))
        mx = torch.from_numpy(amg_ops.interp_matrix(out[1], 5))
        torch.testing.assert_close(my @ x[0, 0] @ mx.T, ref[0, 0])


def _square_with_features():
    m = np.zeros((40, 40), dtype=bool)
    m[5:35, 5:35] = True
    m[10:12, 10:12] = False  # small hole (4 px)
    m[15:27, 15:27] = False  # large hole (144 px)
    m[38:40, 0:2] = True  # small island (4 px)
    return m


def test_remove_small_regions():
    m = _square_with_features()
    out = amg_ops.remove_small_regions(m, min_area=9)
    assert out[10:12, 10:12].all()  # small hole filled
    assert not out[15:27, 15:27].any()  # large hole kept
    assert not out[38:40, 0:2].any()  # island removed
    assert (out ^ m).sum() == 8
    assert (amg_ops.remove_small_regions(m, 0) == m).all()
    # background touching the border is never a hole
    edge = np.ones((10, 10), dtype=bool)
    edge[0, 4:6] = False
    assert (amg_ops.remove_small_regions(edge, 9) == edge).all()
    # all islands small: keep the largest
    tiny = np.zeros((10, 10), dtype=bool)
    tiny[0, 0] = True
    tiny[5, 5:7] = True
    assert amg_ops.remove_small_regions(tiny, 9).sum() == 2


def test_paint_labels_higher_score_wins_and_raster_ids():
    a = np.ones((4, 4), dtype=bool)
    b = np.ones((4, 4), dtype=bool)
    c = np.ones((1, 1), dtype=bool)
    windows = [(4, 4, a), (2, 2, b), (0, 9, c)]
    lab = amg_ops.paint_labels((10, 10), windows, [0.5, 0.9, 0.1])
    # b (score .9) owns the overlap; ids by first pixel: c at (0, 9) -> 1, b at (2, 2) -> 2
    assert lab[0, 9] == 1 and lab[2, 2] == 2 and lab[4, 4] == 2 and lab[7, 7] == 3
    assert (lab == 2).sum() == 16 and (lab == 3).sum() == 16 - 4
    # dropping small objects
    lab = amg_ops.paint_labels((10, 10), windows, [0.5, 0.9, 0.1], min_area=2)
    assert lab[0, 9] == 0 and lab.max() == 2 and lab[2, 2] == 1
    # input order does not change the ids
    lab2 = amg_ops.paint_labels((10, 10), windows[::-1], [0.1, 0.9, 0.5], min_area=2)
    assert (lab == lab2).all()


def test_crop_boxes_cover_image_with_overlap():
    boxes, layers = amg_ops.crop_boxes((100, 200), 1, 0.25)
    assert boxes[0] == (0, 0, 200, 100) and layers == [0, 1, 1, 1, 1]
    cover = np.zeros((100, 200), int)
    for x0, y0, x1, y1 in boxes[1:]:
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1 and cover.max() == 4  # overlapping centre

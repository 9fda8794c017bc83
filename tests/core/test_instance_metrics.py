"""Instance scores against hand-computed cases."""

import numpy as np
import pytest

from napari_sam.instance_metrics import instance_scores, pairwise_iou


def test_hand_computed_scores():
    gt = np.zeros((10, 10), int)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2  # 16 px, missed
    pred = np.zeros((10, 10), int)
    pred[0:4, 0:3] = 5  # 12 px inside object 1: IoU 12/16 = .75
    pred[0:2, 8:10] = 7  # false positive
    np.testing.assert_allclose(pairwise_iou(gt, pred), [[0.75, 0.0], [0.0, 0.0]])
    s = instance_scores(gt, pred)
    assert s["n_gt"] == 2 and s["n_pred"] == 2
    assert s["f1"] == pytest.approx(0.5) and s["precision"] == 0.5 and s["recall"] == 0.5
    # SA = 1/3 for t <= .75 (t = .5 .55 .6 .65 .7 .75), 0 above (.8 .85 .9 .95)
    assert s["msa"] == pytest.approx(6 / 3 / 10)
    perfect = instance_scores(gt, gt * 3)
    assert perfect["f1"] == 1.0 and perfect["msa"] == 1.0


def test_low_threshold_uses_one_to_one_assignment():
    gt = np.zeros((4, 8), int)
    gt[:, :4] = 1
    gt[:, 4:] = 2
    pred = np.ones((4, 8), int)  # one prediction covering both: IoU .5 with each
    s = instance_scores(gt, pred, thresholds=(0.3, 0.5))
    assert s["sa"][0.3] == pytest.approx(1 / 2)  # TP 1, FN 1, FP 0
    assert s["f1"] == pytest.approx(2 / 3)


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="differ in shape"):
        pairwise_iou(np.zeros((3, 3)), np.zeros((3, 4)))

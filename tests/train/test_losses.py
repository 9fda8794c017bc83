"""SAM losses against hand-computed values, and the min-over-3 rule."""

import math

import pytest
import torch

from napari_sam.train.losses import dice_loss, focal_loss, mask_iou, sam_loss


def test_focal_loss_hand_computed():
    # one mask of 2 pixels: logit 0 on a positive pixel, logit ln(3) on a negative one
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    # pixel 1: p = 0.5, p_t = 0.5, ce = ln 2, weight alpha = 0.25 -> 0.25 * 0.25 * ln 2
    # pixel 2: p = 0.75, p_t = 0.25, ce = -ln(0.25), weight 0.75 * 0.75^2
    expected = (0.25 * 0.25 * math.log(2) + 0.75 * 0.75**2 * math.log(4)) / 2
    assert focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    no_alpha = (0.25 * math.log(2) + 0.75**2 * math.log(4)) / 2
    assert focal_loss(logits, target, alpha=None).item() == pytest.approx(no_alpha, rel=1e-6)


def test_dice_loss_hand_computed():
    logits = torch.tensor([[[[0.0, math.log(3.0)]]]])  # p = 0.5, 0.75
    target = torch.tensor([[[[1.0, 0.0]]]])
    # 1 - (2 * 0.5 + 1) / (1.25 + 1 + 1)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 2 / 3.25, rel=1e-6)
    # a confident perfect prediction has dice loss ~0
    perfect = torch.tensor([[[[30.0, -30.0]]]])
    assert dice_loss(perfect, target).item() == pytest.approx(0, abs=1e-6)


def test_mask_iou():
    logits = torch.tensor([[[[1.0, 1.0, -1.0, -1.0]], [[-1.0, -1.0, -1.0, -1.0]]]])  # 1x2x1x4
    target = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
    iou = mask_iou(logits, target)
    assert iou.shape == (1, 2)
    assert iou[0, 0].item() == pytest.approx(1 / 3)
    assert iou[0, 1].item() == 0.0
    both_empty = mask_iou(torch.full((1, 1, 1, 2), -1.0), torch.zeros(1, 1, 1, 2))
    assert both_empty.item() == 1.0


def test_sam_loss_combines_20_to_1_and_iou_mse():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 4)
    target = (torch.rand(2, 1, 4, 4) > 0.5).float()
    iou_pred = torch.tensor([[0.3], [0.9]])
    out = sam_loss(logits, iou_pred, target)
    mask = (20 * focal_loss(logits, target) + dice_loss(logits, target)).mean()
    iou = ((iou_pred - mask_iou(logits, target)) ** 2).mean()
    assert out.total.item() == pytest.approx((mask + iou).item(), rel=1e-6)
    assert out.mask.item() == pytest.approx(mask.item(), rel=1e-6)


def test_min_over_three_backpropagates_only_lowest_loss_mask():
    target = torch.zeros(2, 1, 8, 8)
    target[:, :, 2:6, 2:6] = 1
    good = target[:, 0] * 20 - 10  # confident and right, 2 x 8 x 8
    bad = -good  # confident and wrong
    mid = torch.zeros(2, 8, 8)
    # prompt 0: best mask is index 1; prompt 1: best mask is index 2
    logits = torch.cat(
        [
            torch.stack([bad[0], good[0], mid[0]])[None],
            torch.stack([mid[1], bad[1], good[1]])[None],
        ]
    ).requires_grad_(True)  # 2 x 3 x 8 x 8
    iou_pred = torch.full((2, 3), 0.5, requires_grad=True)
    out = sam_loss(logits, iou_pred, target)
    assert out.selected.tolist() == [1, 2]
    out.total.backward()
    g = logits.grad.abs().flatten(2).sum(-1)  # 2 x 3
    for b, sel in enumerate([1, 2]):
        for m in range(3):
            if m == sel:
                assert g[b, m] > 0
            else:
                assert g[b, m] == 0
    # the IoU head is trained on all three masks, each against its own actual IoU
    assert (iou_pred.grad != 0).all()
    assert out.actual_iou[0].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_shape_errors():
    with pytest.raises(ValueError, match="iou_pred"):
        sam_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 2), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="same H x W"):
        sam_loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3), torch.zeros(1, 8, 8))

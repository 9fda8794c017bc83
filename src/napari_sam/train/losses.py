"""SAM's training losses.

- Mask loss: focal loss and dice loss combined 20:1 (SAM paper, section 3 "Losses and
  training"; the focal/dice pair as in DETR/MaskFormer).
- IoU loss: mean-squared error between the predicted IoU of each output mask and the IoU
  of that (thresholded at logit 0) mask with the ground truth.
- Ambiguity rule: with multimask output (3 masks) only the mask with the lowest mask loss
  is back-propagated, per prompt.

Shapes: mask logits ``(B, M, H, W)`` (M = 1, 3 or 4), predicted IoU ``(B, M)``,
targets ``(B, 1, H, W)`` or ``(B, H, W)`` in [0, 1] (soft targets from down-sampling are
allowed; the "actual IoU" binarises them at 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0
DICE_WEIGHT = 1.0


def _targets(targets: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if targets.ndim == 3:
        targets = targets[:, None]
    if targets.ndim != 4 or targets.shape[0] != like.shape[0]:
        raise ValueError(
            f"targets must be (B, 1, H, W) or (B, H, W) with B = {like.shape[0]}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.shape[-2:] != like.shape[-2:]:
        raise ValueError(
            f"targets {tuple(targets.shape[-2:])} and mask logits {tuple(like.shape[-2:])} "
            "must have the same H x W (down-sample the targets first)"
        )
    return targets.to(like.dtype).expand_as(like)


def focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float | None = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss averaged over pixels: ``(B, M, H, W) -> (B, M)``.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)``; ``alpha=None`` disables the class weight.
    """
    t = _targets(targets, logits)
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.flatten(2).mean(-1)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)``: ``(B, M, H, W) -> (B, M)``."""
    t = _targets(targets, logits).flatten(2)
    p = torch.sigmoid(logits).flatten(2)
    return 1 - (2 * (p * t).sum(-1) + smooth) / (p.sum(-1) + t.sum(-1) + smooth)


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with ``targets > 0.5``: ``(B, M, H, W) -> (B, M)``, no gradient.

    Both empty gives IoU 1.
    """
    with torch.no_grad():
        t = _targets(targets, logits).flatten(2) > 0.5
        p = logits.flatten(2) > 0
        inter = (p & t).sum(-1).float()
        union = (p | t).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class SamLoss:
    """Result of :func:`sam_loss`; ``total`` is the scalar to back-propagate."""

    total: torch.Tensor
    mask: torch.Tensor  # scalar: mean selected mask loss
    iou: torch.Tensor  # scalar: mean IoU MSE
    selected: torch.Tensor  # (B,) index of the back-propagated mask
    actual_iou: torch.Tensor  # (B, M) IoU of each mask with the target


def sam_loss(
    mask_logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    *,
    focal_weight: float = FOCAL_WEIGHT,
    dice_weight: float = DICE_WEIGHT,
    iou_weight: float = 1.0,
    alpha: float | None = 0.25,
    gamma: float = 2.0,
    iou_logits: torch.Tensor | None = None,
) -> SamLoss:
    """SAM's loss for one round of predictions.

    Args:
        mask_logits: (B, M, H, W) logits. With M > 1 (multimask output) only the mask with
            the lowest ``focal_weight * focal + dice_weight * dice`` contributes to the mask
            loss of each prompt (the ambiguity rule).
        iou_pred: (B, M) predicted IoU; regressed (MSE) to the actual IoU of every mask.
        targets: (B, 1, H, W) or (B, H, W) ground truth in [0, 1].
        iou_logits: (B, M, H, W) logits whose masks the IoU head learns to score, when
            the user sees other masks than the raw ones (e.g. after
            ``keep_clicked_parts``); default ``mask_logits``. Not differentiated.

    Returns:
        :class:`SamLoss` with ``total = mean(min mask loss) + iou_weight * mean(IoU MSE)``.
    """
    if mask_logits.ndim != 4:
        raise ValueError(f"mask_logits must be (B, M, H, W), got {tuple(mask_logits.shape)}")
    if tuple(iou_pred.shape) != tuple(mask_logits.shape[:2]):
        raise ValueError(
            f"iou_pred must be (B, M) = {tuple(mask_logits.shape[:2])}, got {tuple(iou_pred.shape)}"
        )
    per_mask = focal_weight * focal_loss(mask_logits, targets, alpha, gamma)
    per_mask = per_mask + dice_weight * dice_loss(mask_logits, targets)  # B x M
    selected = per_mask.detach().argmin(dim=1)  # B
    mask = per_mask.gather(1, selected[:, None]).mean()
    actual = mask_iou(mask_logits if iou_logits is None else iou_logits.detach(), targets)
    iou = F.mse_loss(iou_pred, actual.to(iou_pred.dtype))
    return SamLoss(mask + iou_weight * iou, mask.detach(), iou.detach(), selected, actual)

"""Instance segmentation scores: matching by IoU, F1, mean segmentation accuracy (numpy).

For an IoU threshold t, a predicted and a ground-truth instance match when their IoU is
>= t; for t > 0.5 such matches are necessarily one-to-one, below that a one-to-one
assignment maximising the number of matches is used. With TP matches, FP unmatched
predictions and FN unmatched ground-truth objects:

- F1(t) = 2 TP / (2 TP + FP + FN)
- segmentation accuracy SA(t) = TP / (TP + FP + FN)
- mean segmentation accuracy (mSA) = mean of SA(t) over t = 0.50, 0.55, ..., 0.95
  (the instance-segmentation metric used by micro-sam and the DSB 2018 challenge).
"""

from __future__ import annotations

import numpy as np

__all__ = ["instance_scores", "pairwise_iou"]

THRESHOLDS = tuple(np.round(np.arange(0.5, 0.96, 0.05), 2))


def pairwise_iou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(N_gt, N_pred) IoU between the nonzero instances of two label images (any ndim)."""
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {gt.shape} vs {pred.shape}")
    _, g = np.unique(gt.ravel(), return_inverse=True)
    _, p = np.unique(pred.ravel(), return_inverse=True)
    ng, npr = g.max(initial=0) + 1, p.max(initial=0) + 1
    inter = np.bincount(g * npr + p, minlength=ng * npr).reshape(ng, npr)
    area_g, area_p = inter.sum(1), inter.sum(0)
    union = area_g[:, None] + area_p[None, :] - inter
    iou = inter / np.maximum(union, 1)
    # drop background (label 0) rows/columns where present
    g0 = 1 if (gt == 0).any() else 0
    p0 = 1 if (pred == 0).any() else 0
    return iou[g0:, p0:]


def _n_matches(iou: np.ndarray, t: float) -> int:
    hit = iou >= t
    if not hit.any():
        return 0
    if t > 0.5:  # each object has at most one partner with IoU > 0.5
        return int(hit.any(1).sum())
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(hit, maximize=True)
    return int(hit[r, c].sum())


def instance_scores(gt: np.ndarray, pred: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """Scores of a predicted label image against ground truth (same shape, any ndim).

    Returns a dict: ``f1`` (at IoU 0.5), ``precision``, ``recall`` (at 0.5), ``msa`` (mean
    segmentation accuracy over ``thresholds``), ``sa`` ({t: SA(t)}), ``n_gt``, ``n_pred``.
    """
    iou = pairwise_iou(gt, pred)
    n_gt, n_pred = iou.shape
    sa = {}
    for t in thresholds:
        tp = _n_matches(iou, t)
        denom = n_gt + n_pred - tp
        sa[float(t)] = tp / denom if denom else 1.0
    tp = _n_matches(iou, 0.5)
    f1 = 2 * tp / (n_gt + n_pred) if n_gt + n_pred else 1.0
    return {
        "f1": f1,
        "precision": tp / n_pred if n_pred else float(n_gt == 0),
        "recall": tp / n_gt if n_gt else 1.0,
        "msa": float(np.mean(list(sa.values()))),
        "sa": sa,
        "n_gt": n_gt,
        "n_pred": n_pred,
    }

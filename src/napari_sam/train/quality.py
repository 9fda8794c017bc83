"""Interactive segmentation quality through the predictor, for any SAM model.

:func:`interactive_miou` runs the same protocol on every object of every image, through
:class:`napari_sam.predictor.SamPredictor` (so preprocessing, resizing and mask
up-sampling are those the plugin uses):

- ``box``: the object's tight box, ``multimask_output=False``;
- ``box3``: the tight box, the best of 3 masks by predicted IoU;
- ``point``: one positive click at the object's innermost pixel (the maximum of the
  distance transform), the best of 3 masks by predicted IoU (what the plugin shows);
- ``click1..k``: after the point, ``k`` corrective clicks at the innermost pixel of the
  largest error (false negative -> positive, false positive -> negative), each with all
  previous clicks and the previous low-res logits as mask prompt, single-mask output.

IoU is measured at the image's full resolution. Images are ``(H, W)`` (or ``(H, W, 3)``),
labels ``(H, W)`` int, 0 background.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from . import prompts as P


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def interactive_miou(
    predictor,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    n_clicks: int = 3,
    max_objects: int | None = None,
    min_area: int = 20,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    clicked_parts_only: bool = False,
) -> dict:
    """Mean IoU over objects for box, point and point + 1..n_clicks corrections.

    Args:
        predictor: a ``SamPredictor`` (any model).
        images, labels: equal-length sequences; labels are instance ids (0 background).
        n_clicks: corrective clicks after the first point.
        max_objects: at most this many objects per image (a seeded random subset).
        min_area: objects smaller than this (pixels) are skipped.
        progress: ``progress(done, total)`` after each image.
        clicked_parts_only: clicks keep only the mask parts they touch, as in the plugin
            (``SamPredictor.predict``); boxes are not affected.

    Returns:
        dict of mean IoUs (``box``, ``box3``, ``point``, ``click1``..) and ``objects``.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label images")
    rng = np.random.default_rng(seed)
    keys = ["box", "box3", "point"] + [f"click{c}" for c in range(1, n_clicks + 1)]
    res: dict[str, list] = {k: [] for k in keys}
    for n, (image, lab) in enumerate(zip(images, labels, strict=True)):
        lab = np.asarray(lab)
        if lab.shape != np.asarray(image).shape[:2]:
            raise ValueError(f"labels {lab.shape} do not match image {np.shape(image)[:2]}")
        ids, counts = np.unique(lab[lab > 0], return_counts=True)
        ids = ids[counts >= min_area]
        if max_objects is not None and ids.size > max_objects:
            ids = np.sort(rng.choice(ids, max_objects, replace=False))
        if ids.size == 0:
            continue
        predictor.set_image(image)
        for i in ids:
            gt = lab == i
            box = P.mask_box(gt)
            m, _, _ = predictor.predict(box=box, multimask_output=False)
            res["box"].append(_iou(m[0], gt))
            m, s, _ = predictor.predict(box=box, multimask_output=True)
            res["box3"].append(_iou(m[int(np.argmax(s))], gt))
            xy, _ = P.correction_point(np.zeros_like(gt), gt, mode="center")
            pts, lbl = xy, np.array([1])
            parts = {"clicked_parts_only": True} if clicked_parts_only else {}
            m, s, low = predictor.predict(point_coords=pts, point_labels=lbl, **parts)
            best = int(np.argmax(s))
            mask, logits = m[best], low[[best]]
            res["point"].append(_iou(mask, gt))
            for c in range(1, n_clicks + 1):
                nxt = P.correction_point(mask, gt, mode="center")
                if nxt is not None:
                    pts = np.concatenate([pts, nxt[0]])
                    lbl = np.concatenate([lbl, [nxt[1]]])
                    m, _, low = predictor.predict(
                        point_coords=pts,
                        point_labels=lbl,
                        mask_input=logits,
                        multimask_output=False,
                        **parts,
                    )
                    mask, logits = m[0], low[[0]]
                res[f"click{c}"].append(_iou(mask, gt))
        if progress:
            progress(n + 1, len(images))
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in res.items()}
    out["objects"] = len(res["box"])
    return out

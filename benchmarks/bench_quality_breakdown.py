"""Where a model's interactive-segmentation errors are, on bench_quality's synthetic set.

Four tables, all on the held-out set of ``benchmarks/bench_quality.py`` (same seeds):

1. per object kind: box mIoU against the *output-resolution ceiling* (the ground truth
   block-averaged onto the decoder's low-res grid, then up-sampled by the predictor
   exactly as its own logits are);
2. per kind: wrong pixels of the box masks by distance to the true boundary, as a share of
   the union (<= 1 px is boundary placement; farther is leaks and missing parts);
3. per object-area bin: box mIoU, single-click mIoU (best of 3 by predicted IoU) and the
   oracle (best of 3 by true IoU), and the median size ratio of the chosen click mask;
4. how the click's mask is chosen: predicted IoU, stability score, their product, oracle.

    python benchmarks/bench_quality_breakdown.py [--model default] [--images 20]
        [--input-min-side 512]   # slices enlarged 2x: does a larger view help?
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import KINDS, load, synthetic_set  # noqa: E402

AREA_BINS = [(20, 100), (100, 300), (300, 1000), (1000, None)]


def _iou(a, b) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _ceiling_mask(pred, gt):
    """The predictor's mask for logits that are the ground truth on its low-res grid."""
    import torch
    import torch.nn.functional as F

    ih, iw = pred.input_size
    side = pred.model.image_encoder.img_size
    low = int(pred.model.prompt_encoder.mask_input_size[0])
    g = torch.from_numpy(gt.astype(np.float32))[None, None]
    frame = torch.zeros(1, 1, side, side)
    frame[..., :ih, :iw] = F.interpolate(g, size=(ih, iw), mode="bilinear", align_corners=False)
    soft = F.avg_pool2d(frame, side // low)[0, 0].numpy()
    return pred.masks_from_logits((soft - 0.5) * 20)


def collect(pred, images, labels, max_objects: int) -> list[dict]:
    from scipy import ndimage as ndi

    from napari_sam.train import prompts as P

    rows = []
    for n, (img, lab) in enumerate(zip(images, labels, strict=True)):
        pred.set_image(img)
        ids = [i for i in np.unique(lab)[1:] if (lab == i).sum() >= 20][:max_objects]
        for i in ids:
            gt = lab == i
            box = pred.predict(box=P.mask_box(gt), multimask_output=False)[0][0]
            xy, _ = P.correction_point(np.zeros_like(gt), gt, mode="center")
            logits, scores, _ = pred.predict(
                point_coords=xy, point_labels=np.array([1]), return_logits=True
            )
            masks = logits > 0
            stab = [(lg > 1).sum() / max((lg > -1).sum(), 1) for lg in logits]
            dist = np.where(gt, ndi.distance_transform_edt(gt), ndi.distance_transform_edt(~gt))
            d = dist[box ^ gt]
            rows.append(
                {
                    "kind": KINDS[n % len(KINDS)],
                    "area": int(gt.sum()),
                    "box": _iou(box, gt),
                    "ceiling": _iou(_ceiling_mask(pred, gt), gt),
                    "err": np.array([(d <= 1).sum(), (d > 1).sum(), (box | gt).sum()], float),
                    "click_ious": np.array([_iou(m, gt) for m in masks]),
                    "scores": np.asarray(scores, float),
                    "stability": np.asarray(stab, float),
                    "click_area": np.array([m.sum() for m in masks], float),
                }
            )
    return rows


def report(name: str, rows: list[dict]) -> None:
    print(f"\n### {name}: {len(rows)} objects\n")
    print("| kind | objects | box mIoU | output-resolution ceiling | wrong px <= 1 px from the "
          "boundary | wrong px > 1 px |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for k in KINDS:
        rs = [r for r in rows if r["kind"] == k]
        if not rs:
            continue
        err = np.sum([r["err"] for r in rs], axis=0)
        print(
            f"| {k} | {len(rs)} | {np.mean([r['box'] for r in rs]):.3f} | "
            f"{np.mean([r['ceiling'] for r in rs]):.3f} | {err[0] / err[2]:.3f} | "
            f"{err[1] / err[2]:.3f} |"
        )
    print("\n| object area (px) | objects | box mIoU | click mIoU | click oracle | "
          "click mask / object area (median) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    for lo, hi in AREA_BINS:
        rs = [r for r in rows if r["area"] >= lo and (hi is None or r["area"] < hi)]
        if not rs:
            continue
        pick = [int(np.argmax(r["scores"])) for r in rs]
        click = [r["click_ious"][j] for r, j in zip(rs, pick, strict=True)]
        ratio = [r["click_area"][j] / r["area"] for r, j in zip(rs, pick, strict=True)]
        label = f"{lo}-{hi}" if hi else f">= {lo}"
        print(
            f"| {label} | {len(rs)} | {np.mean([r['box'] for r in rs]):.3f} | "
            f"{np.mean(click):.3f} | {np.mean([r['click_ious'].max() for r in rs]):.3f} | "
            f"{np.median(ratio):.2f} |"
        )
    print("\n| click mask chosen by | mIoU |")
    print("| --- | --- |")
    rules = {
        "predicted IoU (what the plugin does)": lambda r: r["scores"],
        "stability score": lambda r: r["stability"],
        "predicted IoU x stability": lambda r: r["scores"] * r["stability"],
        "true IoU (oracle)": lambda r: r["click_ious"],
    }
    for label, key in rules.items():
        print(f"| {label} | {np.mean([r['click_ious'][np.argmax(key(r))] for r in rows]):.3f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model spec (repeatable; default: default)")
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--objects", type=int, default=8, help="objects per image")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--input-min-side",
        type=int,
        help="override the model's input_min_side (e.g. 512: 256 px slices enlarged 2x)",
    )
    args = p.parse_args(argv)

    import torch

    from napari_sam.predictor import SamPredictor

    torch.set_num_threads(args.threads)
    images, labels = synthetic_set(args.images)
    for spec in args.model or ["default"]:
        name, model = load(spec)
        if model is None:
            continue
        if args.input_min_side:
            model.input_min_side = args.input_min_side
            name = f"{name}, input_min_side {args.input_min_side}"
        report(name, collect(SamPredictor(model), images, labels, args.objects))
    return 0


if __name__ == "__main__":
    sys.exit(main())

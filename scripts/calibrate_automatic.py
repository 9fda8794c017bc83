"""Calibrate the automatic-segmentation thresholds of an nsam model (e.g. the bundled one).

Official SAM's predicted IoUs are calibrated for its defaults (predicted IoU >= 0.88,
stability >= 0.95); a small model trained here predicts lower IoUs, so with those
defaults "Segment all" keeps nothing. This script runs automatic segmentation on
held-out synthetic scenes (``napari_sam.train.synthetic``, seeds 3,200,000+, never used in
training; the quality tests and benchmarks use other seeds) for a grid of thresholds,
prints instance F1 at IoU 0.5 for each, and with ``--write`` stores the best pair in the
``"automatic"`` entry of the model's JSON sidecar, which
``napari_sam.automatic.AutomaticParams.for_model`` then uses as the model's defaults.

    python scripts/calibrate_automatic.py [--weights src/napari_sam/weights/nsam_s.pt]
        [--images 3] [--write]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

KINDS = ("nuclei", "cells", "mixed")
IOU = (0.2, 0.3, 0.45, 0.6, 0.75, 0.88)
STABILITY = (0.6, 0.75, 0.9)


def main(argv=None) -> int:
    import torch

    from napari_sam import SamPredictor
    from napari_sam.automatic import AutomaticParams, segment_slice
    from napari_sam.instance_metrics import instance_scores
    from napari_sam.model.small_encoder import default_weights, load_nsam
    from napari_sam.train.synthetic import make_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, default=default_weights())
    ap.add_argument("--images", type=int, default=3, help="scenes per kind")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="store the best pair in the JSON")
    ap.add_argument("--iou", type=float, nargs="+", default=IOU, help="pred_iou_thresh grid")
    ap.add_argument("--stability", type=float, nargs="+", default=STABILITY, help="stability grid")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    predictor = SamPredictor(load_nsam(args.weights))
    scenes = [
        make_image(3_200_000 + i, (256, 256), kind, (8, 16)[i % 2])
        for kind in KINDS
        for i in range(args.images)
    ]
    t0 = time.perf_counter()
    rows = []
    for iou, stab in itertools.product(args.iou, args.stability):
        params = AutomaticParams(pred_iou_thresh=iou, stability_score_thresh=stab)
        f1 = []
        for img, gt in scenes:  # the embedding is cached after the first pair
            f1.append(instance_scores(gt, segment_slice(predictor, img, params))["f1"])
        rows.append((float(np.mean(f1)), iou, stab))
        print(f"pred_iou >= {iou:.2f}, stability >= {stab:.2f}: F1 {np.mean(f1):.3f}", flush=True)
    best = max(rows)
    print(
        f"best: F1 {best[0]:.3f} at pred_iou_thresh {best[1]}, stability_score_thresh {best[2]} "
        f"({len(scenes)} scenes, {time.perf_counter() - t0:.0f} s)"
    )
    if args.write:
        sidecar = args.weights.with_suffix(".json")
        info = json.loads(sidecar.read_text())
        info["automatic"] = {
            "pred_iou_thresh": best[1],
            "stability_score_thresh": best[2],
            "calibration": f"scripts/calibrate_automatic.py: synthetic {'/'.join(KINDS)}, "
            f"{len(scenes)} held-out scenes 256 x 256, instance F1 at IoU 0.5 = {best[0]:.3f}",
        }
        sidecar.write_text(json.dumps(info, indent=2) + "\n")
        print(f"wrote {sidecar}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

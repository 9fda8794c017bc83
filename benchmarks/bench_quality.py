"""Interactive segmentation quality on a fixed held-out synthetic set (and optional real data).

Prints one table row per model: mean IoU for 1 box, 1 point, and after 1/3/5 corrective
clicks, measured through the predictor (see napari_sam.train.quality). The synthetic set
(seeds 3,000,000+, never used in training: training seeds are < 1,000,000) cycles through
the generator's scene kinds at 256 x 256 (8- and 16-bit); the predictor resizes to the
model's input size like in the plugin.

    python benchmarks/bench_quality.py                       # the bundled default model
    python benchmarks/bench_quality.py --model runs/x/best.pt --model vit_b
    python benchmarks/bench_quality.py --real img.tif mask.tif   # add a real labelled image
    python benchmarks/bench_quality.py --real3d stack.tif labels.tif  # and a real stack

3D rows: propagation from one box per object (``propagation_dice``) on held-out synthetic
stacks (nuclei, tubes, dense = packed nuclei touching in z) and the optional real stack:
3D Dice, mean first / last slice error (negative: starts / ends too early) and the median
volume ratio segmented / true.

Clicks keep only the mask parts they touch, as the plugin does by default
(``clicked_parts_only``); ``--parts whole clicked`` measures both (boxes and the 3D rows are
the same either way).

``--model`` takes the bundled default ("default"), an nsam training checkpoint or exported
weights (.pt with .json), a registry name or an official checkpoint path (skipped with a
note when it is not available offline).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

KINDS = ("nuclei", "cells", "membrane", "elongated", "mixed")


def synthetic_set(n: int, size: int = 256):
    from napari_sam.train.synthetic import make_image

    images, labels = [], []
    for i in range(n):
        img, lab = make_image(3_000_000 + i, (size, size), KINDS[i % 5], (8, 16)[i % 2])
        images.append(img)
        labels.append(lab)
    return images, labels


def propagation_dice(model, img, lab, max_objects: int | None = None, tta: int = 1) -> list[dict]:
    """Propagation from one box per object through stack ``img`` with instance labels
    ``lab``: objects spanning >= 3 slices and >= 200 voxels (the first ``max_objects``);
    the object's tight box on its middle slice (single-mask output) is the anchor, then
    :func:`napari_sam.propagate.propagate` with default settings walks the stack. Per
    object: 3D Dice, first/last slice errors (negative: starts/ends too early) and the
    volume ratio segmented / true."""
    import numpy as np

    from napari_sam.embeddings import EmbeddingStore
    from napari_sam.predictor import SamPredictor
    from napari_sam.propagate import PropagationState, propagate
    from napari_sam.train import prompts as P

    state = PropagationState(img.shape[0], img.shape[1:])
    gts = {}
    pred = SamPredictor(model, tta=tta)
    for obj in np.unique(lab)[1:]:
        gt = lab == obj
        zs = np.flatnonzero(gt.any(axis=(1, 2)))
        if zs.size < 3 or gt.sum() < 200:
            continue
        mid = int(zs[len(zs) // 2])
        pred.set_image(img[mid], key=mid)
        box = np.asarray(P.mask_box(gt[mid]), float)
        masks, _, _ = pred.predict(box=box, multimask_output=False)
        if masks[0].any():
            state.add_anchor(int(obj), mid, masks[0])
        gts[int(obj)] = (gt, zs)
        if max_objects is not None and len(gts) >= max_objects:
            break
    store = EmbeddingStore(img, SamPredictor(model, tta=tta))
    list(propagate(store, SamPredictor(model, tta=tta), state))
    rows = []
    for obj, (gt, zs) in gts.items():
        seg = state.object_volume(obj) if obj in state.objects else np.zeros_like(gt)
        got = np.flatnonzero(seg.any(axis=(1, 2)))
        rows.append(
            {
                "dice": 2 * (seg & gt).sum() / (seg.sum() + gt.sum()),
                "start": int(got[0] - zs[0]) if got.size else 0,
                "end": int(got[-1] - zs[-1]) if got.size else 0,
                "volume_ratio": float(seg.sum() / gt.sum()),
            }
        )
    return rows


def summarize_3d(rows: list[dict]) -> dict:
    import numpy as np

    return {
        "dice": float(np.mean([r["dice"] for r in rows])),
        "start_error": float(np.mean([r["start"] for r in rows])),
        "end_error": float(np.mean([r["end"] for r in rows])),
        "volume_ratio_median": float(np.median([r["volume_ratio"] for r in rows])),
        "objects": len(rows),
    }


def dice_from_one_box(model, n: int, real=None, tta: int = 1) -> dict:
    """3D Dice of :func:`propagation_dice` on held-out stacks ``make_volume(3_100_000 +
    i)``, 24 x 128 x 128, for nuclei, tubes and dense (packed nuclei touching in z; the
    first 40 objects of each stack), and on ``real = (stack, labels)`` if given."""
    from napari_sam.train.synthetic import make_volume

    out = {}
    for kind in ("nuclei", "tubes", "dense"):
        rows = []
        for i in range(n):
            img, lab = make_volume(3_100_000 + i, shape=(24, 128, 128), kind=kind)
            rows += propagation_dice(model, img, lab, max_objects=40, tta=tta)
        out[kind] = summarize_3d(rows)
    if real is not None:
        out["real"] = summarize_3d(propagation_dice(model, *real, tta=tta))
    return out


def load(spec: str):
    """Model from a spec (see module docstring); returns (name, model) or (name, None)."""
    import torch

    from napari_sam.model.small_encoder import build_nsam, load_nsam

    if spec == "default":
        return "nsam_s (bundled)", load_nsam()
    path = Path(spec)
    if path.is_file():
        if path.with_suffix(".json").is_file():
            return path.name, load_nsam(path)
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(ck, dict) and "model_config" in ck:
            return path.name, build_nsam(ck["model_config"], checkpoint=ck["model"])
    try:
        from napari_sam.model.registry import load_model

        return spec, load_model(spec, device="cpu")
    except Exception as e:  # not downloadable offline, unknown name, ...
        print(f"# skipped {spec}: {e}", file=sys.stderr)
        return spec, None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="model spec (repeatable)")
    p.add_argument("--images", type=int, default=20, help="synthetic images")
    p.add_argument("--objects", type=int, default=8, help="objects per image")
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--real", nargs=2, metavar=("IMAGE", "LABELS"), help="a real labelled image")
    p.add_argument("--real-objects", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--volumes", type=int, default=2, help="synthetic stacks per kind for 3D Dice (0: none)"
    )
    p.add_argument(
        "--real3d", nargs=2, metavar=("STACK", "LABELS"), help="a real labelled stack (z, y, x)"
    )
    p.add_argument(
        "--tta",
        type=int,
        nargs="+",
        help="test-time views to measure, e.g. 1 4 (rows then name them; default 1)",
    )
    p.add_argument(
        "--parts",
        nargs="+",
        choices=("clicked", "whole"),
        help="click masks: only the clicked parts (the plugin's default) and/or whole",
    )
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    sets = {"synthetic": synthetic_set(args.images)}
    if args.real:
        import tifffile

        sets["real"] = ([tifffile.imread(args.real[0])], [tifffile.imread(args.real[1])])
    cols = ["box", "point"] + [f"click{c}" for c in (1, 3, 5) if c <= args.clicks]
    print(f"| model | set | objects | {' | '.join(cols)} | seconds |")
    print("|" + " --- |" * (len(cols) + 4))
    results = []
    for spec in args.model or ["default"]:
        name0, model = load(spec)
        if model is None:
            continue
        for tta in args.tta or [1]:
            name = name0 if not args.tta else f"{name0}, tta {tta}"
            results += measure(model, name, tta, sets, cols, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(model, name, tta, sets, cols, args) -> list[dict]:
    """Print and return the rows of one model with ``tta`` test-time views."""
    from napari_sam.predictor import SamPredictor
    from napari_sam.train.quality import interactive_miou

    results = []
    pred = SamPredictor(model, tta=tta)
    for parts in args.parts or ["clicked"]:
        label = name if not args.parts else f"{name}, {parts} parts"
        for set_name, (images, labels) in sets.items():
            t0 = time.perf_counter()
            max_obj = args.objects if set_name == "synthetic" else args.real_objects
            r = interactive_miou(
                pred,
                images,
                labels,
                args.clicks,
                max_objects=max_obj,
                clicked_parts_only=parts == "clicked",
            )
            dt = time.perf_counter() - t0
            vals = " | ".join(f"{r[c]:.3f}" for c in cols)
            print(f"| {label} | {set_name} | {r['objects']} | {vals} | {dt:.0f} |", flush=True)
            results.append(
                {
                    "model": name,
                    "tta": pred.tta,
                    "parts": parts,
                    "set": set_name,
                    **r,
                    "seconds": dt,
                }
            )
    if args.volumes:
        t0 = time.perf_counter()
        real = None
        if args.real3d:
            import tifffile

            real = (tifffile.imread(args.real3d[0]), tifffile.imread(args.real3d[1]))
        for kind, r in dice_from_one_box(model, args.volumes, real, tta).items():
            print(
                f"| {name} | 3D {kind}: box on the middle slice, then propagation | "
                f"{r['objects']} | 3D Dice {r['dice']:.3f} | first / last slice "
                f"{r['start_error']:+.1f} / {r['end_error']:+.1f} | volume x "
                f"{r['volume_ratio_median']:.2f} |"
                + " |" * (len(cols) - 3)
                + f" {time.perf_counter() - t0:.0f} |",
                flush=True,
            )
            results.append({"model": name, "tta": pred.tta, "set": f"3d-{kind}", **r})
    return results


if __name__ == "__main__":
    sys.exit(main())

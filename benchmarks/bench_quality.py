"""Interactive segmentation quality on a fixed held-out synthetic set (and optional real data).

Prints one table row per model: mean IoU for 1 box, 1 point, and after 1/3/5 corrective
clicks, measured through the predictor (see napari_sam.train.quality). The synthetic set
(seeds 3,000,000+, never used in training: training seeds are < 1,000,000) cycles through
the generator's scene kinds at 256 x 256 (8- and 16-bit); the predictor resizes to the
model's input size like in the plugin.

    python benchmarks/bench_quality.py                       # the bundled default model
    python benchmarks/bench_quality.py --model runs/x/best.pt --model vit_b
    python benchmarks/bench_quality.py --real img.tif mask.tif   # add a real labelled image

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
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)

    import torch

    from napari_sam.predictor import SamPredictor
    from napari_sam.train.quality import interactive_miou

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
        name, model = load(spec)
        if model is None:
            continue
        pred = SamPredictor(model)
        for set_name, (images, labels) in sets.items():
            t0 = time.perf_counter()
            max_obj = args.objects if set_name == "synthetic" else args.real_objects
            r = interactive_miou(pred, images, labels, args.clicks, max_objects=max_obj)
            dt = time.perf_counter() - t0
            vals = " | ".join(f"{r[c]:.3f}" for c in cols)
            print(f"| {name} | {set_name} | {r['objects']} | {vals} | {dt:.0f} |", flush=True)
            results.append({"model": name, "set": set_name, **r, "seconds": dt})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

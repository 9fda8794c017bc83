"""``napari-sam train``: train or fine-tune a SAM model with simulated interactive prompts.

Data: synthetic microscopy images (default, :mod:`napari_sam.train.synthetic`) or your own
annotated images (``--images`` / ``--labels``, TIFF or .npy, one labels file per image).
The run writes ``last.pt`` (resumable), ``best.pt``, ``log.jsonl`` into ``--out`` and, with
``--export``, the best weights as a float16 state_dict plus a JSON of config and metrics.
Cheap to import: torch is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (checkpoints, log)")
    p.add_argument("--recipe", help="run a named recipe (e.g. nsam_s2, the default model)")
    p.add_argument("--steps", type=int, help="length of the learning-rate schedule")
    p.add_argument("--stop-at", type=int, help="stop this run at this step")
    p.add_argument("--canvas", type=int, help="training frame side in pixels (multiple of 32)")
    p.add_argument("--images-per-step", type=int)
    p.add_argument("--objects-per-image", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-rounds", type=int, help="interactive correction rounds (0..N)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (0: never)")
    p.add_argument("--eval-images", type=int)
    p.add_argument("--patience", type=int, help="early stop after N evaluations w/o gain")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int)
    p.add_argument("--kind", help="synthetic scene kind (mixed, nuclei, cells, ...)")
    p.add_argument("--model-config", help="JSON dict of model settings (nsam_s keys)")
    p.add_argument("--init", help="state_dict (.pt) to start from (fine-tuning)")
    p.add_argument(
        "--from-phase",
        type=int,
        default=0,
        help="with --recipe: start at this phase (from --init, or from the previous "
        "phase's best weights in --out)",
    )
    p.add_argument("--frozen-encoder", action="store_true", help="train only prompt+decoder")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing last.pt")
    p.add_argument("--images", nargs="+", help="training images (TIFF/.npy)")
    p.add_argument("--labels", nargs="+", help="instance labels, one per image")
    p.add_argument("--export", help="write the best weights here (.pt, float16) + .json")
    p.add_argument("--quiet", action="store_true")


_FIELDS = {
    "steps": "steps",
    "stop_at": "stop_at",
    "canvas": "canvas",
    "images_per_step": "images_per_step",
    "objects_per_image": "objects_per_image",
    "lr": "lr",
    "max_rounds": "max_rounds",
    "eval_every": "eval_every",
    "eval_images": "eval_images",
    "patience": "patience",
    "threads": "threads",
    "seed": "seed",
    "kind": "kind",
    "init": "init",
}


def _read(path: str):
    import numpy as np

    if path.endswith(".npy"):
        return np.load(path)
    import tifffile

    return tifffile.imread(path)


def _overrides(args) -> dict:
    kw = {f: getattr(args, a) for a, f in _FIELDS.items() if getattr(args, a) is not None}
    if args.model_config:
        try:
            kw["model"] = json.loads(args.model_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--model-config is not valid JSON: {e}") from None
    if args.frozen_encoder:
        kw["train_encoder"] = False
    if args.no_resume:
        kw["resume"] = False
    return kw


def run(args) -> int:
    from napari_sam.train import loop
    from napari_sam.train.recipes import recipe

    if bool(args.images) != bool(args.labels):
        raise ValueError("--images and --labels must be given together")
    if args.images and len(args.images) != len(args.labels):
        raise ValueError(f"{len(args.images)} images but {len(args.labels)} labels files")
    for f in (args.images or []) + (args.labels or []) + ([args.init] if args.init else []):
        if not Path(f).exists():
            raise FileNotFoundError(f"no such file: {f}")
    overrides = _overrides(args)
    phases = recipe(args.recipe) if args.recipe else [{}]
    t0 = time.time()

    def progress(ev):
        if args.quiet:
            return
        if ev["kind"] == "step" and ev["step"] % 10 == 0:
            print(
                f"[{time.time() - t0:7.0f}s] step {ev['step']} loss {ev['loss']:.3f} "
                f"iou {ev['iou0']:.3f} lr {ev['lr']:.2e}",
                flush=True,
            )
        elif ev["kind"] == "eval":
            keys = ["box", "point"] + [k for k in ev if k.startswith("click")]
            vals = " ".join(f"{k} {ev[k]:.3f}" for k in keys)
            print(f"[{time.time() - t0:7.0f}s] eval step {ev['step']}: {vals}", flush=True)
        elif ev["kind"] == "done":
            print(f"done at step {ev['step']} ({ev['reason']})", flush=True)

    out = Path(args.out)
    prev = None
    model = None
    start = args.from_phase
    if not 0 <= start < len(phases):
        raise ValueError(f"--from-phase {start}: the run has phases 0 to {len(phases) - 1}")
    if start and not args.init:
        prev = loop.weights_path(loop.TrainConfig(out_dir=str(out / f"phase{start - 1}")))
        if not prev.is_file():
            raise FileNotFoundError(
                f"--from-phase {start} needs phase {start - 1}'s weights ({prev}) or --init"
            )
    for i, phase in enumerate(phases):
        if i < start:
            continue
        fields = {**phase, **overrides}
        if len(phases) > 1:
            fields["out_dir"] = str(out / f"phase{i}")
            if prev is not None:
                fields["init"] = str(prev)
        else:
            fields["out_dir"] = str(out)
        cfg = loop.TrainConfig(**fields)
        source = None
        if args.images:
            source = loop.ArraySource(
                [_read(f) for f in args.images], [_read(f) for f in args.labels], cfg.canvas
            )
        model, _ = loop.train(cfg, callback=progress, source=source)
        prev = loop.weights_path(cfg)
    if args.export:
        best = loop.load_best(prev)
        info = loop.export_weights(best["model"], args.export, best["metrics"])
        print(f"exported {info['file']} ({info['bytes'] / 1e6:.1f} MB) sha256 {info['sha256']}")
    return 0

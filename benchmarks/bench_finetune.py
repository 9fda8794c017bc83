"""Fine-tuning benchmark: a model before/after fine-tuning on synthetic annotations.

Fine-tunes a base model (default: the bundled nsam_s) on ``--images`` annotated synthetic
images of one object type (napari_sam.train.synthetic, seeds 7,000,000+; never used in
training or other evaluations) with :func:`napari_sam.finetune.finetune` and prints the
held-out mean IoU before and after (box, point, corrections), the split and the time.

    python benchmarks/bench_finetune.py --kind membrane --images 20 --steps 100
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model name or path (default nsam_s)")
    ap.add_argument("--kind", default="membrane", help="synthetic object type")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--train", default="decoder", help="decoder | decoder+prompt | all")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--held-out", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--canvas", type=int, default=256, help="training frame (nsam models)")
    args = ap.parse_args(argv)

    import torch

    from napari_sam.finetune import FinetuneConfig, finetune
    from napari_sam.model.registry import load_model
    from napari_sam.model.small_encoder import default_weights
    from napari_sam.train.synthetic import make_image

    torch.set_num_threads(args.threads)
    base_name = args.model or "nsam_s"
    base = load_model(args.model or default_weights(), device="cpu")
    data = [
        make_image(7_000_000 + i, (args.size, args.size), args.kind, [8, 16][i % 2])
        for i in range(args.images)
    ]
    cfg = FinetuneConfig(
        steps=args.steps,
        train=args.train,
        lr=args.lr,
        held_out=args.held_out,
        seed=args.seed,
        threads=args.threads,
        canvas=args.canvas,
    )
    t0 = time.perf_counter()
    last = {"stage": None}

    def progress(ev):
        if ev["stage"] != last["stage"]:
            last["stage"] = ev["stage"]
            print(f"[{time.perf_counter() - t0:7.1f} s] {ev['stage']}", flush=True)

    r = finetune(base, [d[0] for d in data], [d[1] for d in data], cfg, progress=progress)
    print()
    print(
        f"base {base_name}, {args.images} x {args.size}^2 '{args.kind}' images, "
        f"{r.split['by']} split: {r.split['train_objects']} training objects, "
        f"{r.split['test_objects']} held out; train {args.train}, {r.steps} steps, "
        f"lr {args.lr}, canvas {args.canvas}, {args.threads} thread(s), {r.seconds:.0f} s"
    )
    print()
    print("| held-out mIoU | before | after | change |")
    print("| --- | --- | --- | --- |")
    for k in r.before:
        if k == "objects":
            continue
        b, a = r.before[k], r.after[k]
        print(f"| {k} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    print(f"| objects | {r.before['objects']} | {r.after['objects']} | |")


if __name__ == "__main__":
    main()

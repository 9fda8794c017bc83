"""Speed of the default model (nsam_s): image encoder per 512 x 512 slice and one click.

Prints a table with the median over repeats, and TinyViT (MobileSAM's ``vit_t``, random
weights: speed does not depend on them) as the reference in the same run. The row "tta 4"
is nsam_s with its four flipped test-time views (``SamPredictor(tta=4)``): the encoder runs
once per view and a click decodes every view. "set_image" is the whole slice preparation
(contrast, resize, every encoder run).

    python benchmarks/bench_nsam_speed.py [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000, min(ts) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from napari_sam.model.small_encoder import build_nsam, count_parameters
    from napari_sam.predictor import SamPredictor

    torch.set_num_threads(args.threads)
    models = {"nsam_s": build_nsam()}
    try:
        from napari_sam.model.build import build_sam

        models["vit_t (reference)"] = build_sam("vit_t")
    except Exception as e:  # noqa: BLE001
        print(f"# vit_t reference unavailable: {e}", file=sys.stderr)
    image = (np.random.default_rng(0).random((512, 512)) * 255).astype(np.uint8)
    print(f"threads: {args.threads}, repeats: {args.repeats}")
    print(
        "| model | params (M) | input | encoder median ms | encoder min ms | "
        "set_image median ms | click median ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = [(name, model, 1) for name, model in models.items()]
    rows.insert(1, ("nsam_s, tta 4", models["nsam_s"], 4))
    for name, model, tta in rows:
        model.eval()
        s = model.image_encoder.img_size
        x = torch.randn(1, 3, s, s)

        def encode(m=model, x=x, views=tta):
            for _ in range(views):
                m.image_encoder(x)

        with torch.inference_mode():
            med, mn = _time(encode, args.repeats)
        pred = SamPredictor(model, cache_bytes=0, tta=tta)
        prep, _ = _time(lambda p=pred: p.set_image(image), args.repeats)
        click, _ = _time(
            lambda p=pred: p.predict(
                point_coords=np.array([[200.0, 300.0]]), point_labels=np.array([1])
            ),
            args.repeats,
        )
        n = count_parameters(model) / 1e6
        print(
            f"| {name} | {n:.1f} | {s} | {med:.0f} | {mn:.0f} | {prep:.0f} | {click:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

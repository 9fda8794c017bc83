"""Model speed: our SAM modules vs the official segment-anything 1.0, same weights, same run.

Prints a markdown table (min and median seconds over --repeat runs after one warm-up).

    PYTHONPATH=src python benchmarks/bench_model.py [--model vit_b]
        [--repeat 3] [--clicks 30] [--threads N] [--skip-encoder]

Results of a run are recorded in docs/model.md.

The official package is imported from tests/reference (needs the [parity] extra).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from napari_sam.model.build import build_sam  # noqa: E402
from reference.official import import_official  # noqa: E402


def timed_pair(fns: dict, repeat: int) -> dict[str, tuple[float, float]]:
    """Time several callables, alternating them each round so that load from other
    processes affects all alike. Returns ``{name: (min s, median s)}``."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clicks", type=int, default=30, help="repeats for prompt+decoder")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--skip-encoder", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    sa = import_official()
    ref = sa.sam_model_registry[args.model]().eval()
    ours = build_sam(args.model, ref.state_dict())
    rows = []
    torch.manual_seed(0)

    if not args.skip_encoder:
        x = torch.randn(1, 3, 1024, 1024)
        with torch.inference_mode():
            a, b = ref.image_encoder(x), ours.image_encoder(x)
            diff = (a - b).abs().max().item()
            res = timed_pair(
                {
                    "official": lambda: ref.image_encoder(x),
                    "ours": lambda: ours.image_encoder(x),
                },
                args.repeat,
            )
            for name, (best, med) in res.items():
                rows.append((f"image encoder {args.model} 1024", name, best, med, diff))
            # MobileSAM has no installable reference: ours only, for scale.
            tiny = build_sam("vit_t").image_encoder
            best, med = timed_pair({"ours": lambda: tiny(x)}, args.repeat)["ours"]
            rows.append(("image encoder vit_t 1024 (no reference)", "ours", best, med, None))

    # One ViT block of the model, windowed and global, on the 64 x 64 token grid.
    tokens = torch.randn(1, 64, 64, ref.image_encoder.blocks[0].norm1.normalized_shape[0])
    glob = next(i for i, b in enumerate(ref.image_encoder.blocks) if b.window_size == 0)
    with torch.inference_mode():
        for label, i in (("windowed", 0), ("global", glob)):
            rb, ob = ref.image_encoder.blocks[i], ours.image_encoder.blocks[i]
            d = (rb(tokens) - ob(tokens)).abs().max().item()
            res = timed_pair(
                {"official": lambda rb=rb: rb(tokens), "ours": lambda ob=ob: ob(tokens)},
                3 * args.repeat,
            )
            for name, (best, med) in res.items():
                rows.append((f"one {label} {args.model} block, 64x64 tokens", name, best, med, d))

    emb = torch.randn(1, 256, 64, 64)
    pts = torch.tensor([[[400.0, 300.0], [600.0, 500.0]]])
    lbl = torch.tensor([[1, 0]])
    mask = torch.randn(1, 1, 256, 256)
    cases = {
        "2 points": {"points": (pts, lbl), "boxes": None, "masks": None},
        "box + mask": {
            "points": None,
            "boxes": torch.tensor([[100.0, 100.0, 700.0, 800.0]]),
            "masks": mask,
        },
    }
    with torch.inference_mode():
        for case, prompts in cases.items():

            def click(m, prompts=prompts):
                sparse, dense = m.prompt_encoder(**prompts)
                return m.mask_decoder(emb, m.prompt_encoder.get_dense_pe(), sparse, dense, True)

            d = (click(ref)[0] - click(ours)[0]).abs().max().item()
            res = timed_pair(
                {"official": lambda: click(ref), "ours": lambda: click(ours)}, args.clicks
            )
            for name, (best, med) in res.items():
                rows.append((f"prompt enc + decoder, {case}", name, best, med, d))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, CPU\n")
    print("| step | impl | min s | median s | max abs diff |")
    print("| --- | --- | --- | --- | --- |")
    for step, name, best, med, d in rows:
        dd = "" if d is None else f"{d:.1e}"
        print(f"| {step} | {name} | {best:.4f} | {med:.4f} | {dd} |")


if __name__ == "__main__":
    main()

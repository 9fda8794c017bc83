"""Design study for propagation stop rules on volumes whose true extent is known.

    python benchmarks/bench_stop_rules.py [--model default|PATH] [--volumes 8]
        [--shape 32 128 128] [--out FILE]

A front's masks do not depend on the stop rule until the rule fires, so each object is
propagated once with every data-driven stop off (fronts walk until the mask is empty or
the stack ends) and every rule is then evaluated by truncating the recorded trajectories
at the first slice where it fires. Objects come from ``napari_sam.train.synthetic
.make_volume`` (ellipsoids, tubes, mixed and dense = packed nuclei touching in z, two
stacks of each kind, seeds 2,000,000+, at most 40 objects per stack; training uses seeds
below 1,000,000) plus the test suite's ellipsoid/tube; the anchor is the middle slice of
each object's true z range, annotated with its true mask.

Rules are ranked on a design set (objects of the even-numbered stacks) and reported on
the design and a validation set (odd-numbered stacks): mean 3D Dice and the mean error of
the first/last slice, with references: "oracle" (the same masks kept exactly over the
true z range), "no stop" (until an empty mask or the stack end), the issue's pitfall
(stop on predicted IoU < 0.5), the geometry-only rules, and the default.
"""

from __future__ import annotations

import argparse
import itertools
import pickle
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


@dataclass
class Trajectory:
    gt: np.ndarray  # (Z, H, W) bool, the object's true voxels
    anchor_z: int
    anchor: np.ndarray
    fronts: dict  # direction -> [(z, mask, StepMetrics)]
    volume: int  # index of the volume it came from (design/validation split)


def volumes(n: int, shape):
    from napari_sam.train.synthetic import make_volume
    from volume_helpers import ellipsoid_volume, tube_volume

    for i in range(n):
        # stacks 2k (design) and 2k + 1 (validation) are of the same kind
        kind = ("nuclei", "tubes", "mixed", "dense")[(i // 2) % 4]
        img, lab = make_volume(2_000_000 + i, shape=tuple(shape), kind=kind)
        yield f"make_volume({2_000_000 + i}, {kind})", img, lab
    z, h, w = shape
    img, m = ellipsoid_volume(shape=(z, h, w), center=(z // 2, h // 2, w // 2),
                              radii=(z / 3.5, h / 4, w / 5))  # fmt: skip
    yield "ellipsoid (tests)", img, m.astype(np.int32)
    img, m = tube_volume(shape=(z, h, w), radius=h / 10)
    m[: z // 5], m[-z // 5 :] = False, False
    yield "tube (tests)", img, m.astype(np.int32)


def collect(enc, dec, n_volumes: int, shape, min_voxels: int = 200, prompts=None,
            max_objects: int = 40):  # fmt: skip
    """Walk every object's fronts until an empty mask, measuring every stop metric."""
    from napari_sam.embeddings import EmbeddingStore
    from napari_sam.propagate import PropagationState, StopCriteria, propagate

    never = -float("inf")  # measured, never fires
    walk = StopCriteria(min_area=1, min_score=None, min_iou_prev=None, max_area_growth=None,
                        min_contrast=never, contrast="both")  # fmt: skip
    out = []
    for v, (name, img, lab) in enumerate(volumes(n_volumes, shape)):
        ids = [i for i in np.unique(lab) if i and (lab == i).sum() >= min_voxels]
        ids = ids[:max_objects]  # dense stacks hold hundreds
        state = PropagationState(img.shape[0], img.shape[1:])
        gts = {}
        for i in ids:
            gt = lab == i
            zs = np.flatnonzero(gt.any(axis=(1, 2)))
            if zs.size < 3:
                continue
            mid = int(zs[len(zs) // 2])
            state.add_anchor(int(i), mid, gt[mid])
            gts[int(i)] = (gt, mid)
        fronts = {i: {1: [], -1: []} for i in gts}
        store = EmbeddingStore(img, enc)
        for step in propagate(store, dec, state, criteria=walk, prompts=prompts):
            if step.mask is not None and step.accepted:
                fronts[step.obj_id][step.direction].append((step.z, step.mask, step.metrics))
        for i, (gt, mid) in gts.items():
            out.append(Trajectory(gt, mid, gt[mid], fronts[i], v))
        print(f"{name}: {len(gts)} objects", file=sys.stderr, flush=True)
    return out


def run_rule(rule, t: Trajectory, true_range: bool = False):
    """Segmentation volume (bool) of trajectory ``t`` truncated where ``rule`` fires."""
    seg = np.zeros_like(t.gt)
    seg[t.anchor_z] = t.anchor
    zs = np.flatnonzero(t.gt.any(axis=(1, 2)))
    for steps in t.fronts.values():
        for z, mask, metrics in steps:
            if true_range:
                if not zs[0] <= z <= zs[-1]:
                    break
            elif rule is not None:
                used = rule.combine(metrics.intensity_contrast, metrics.feature_contrast)
                if rule.check(replace(metrics, contrast=used)) is not None:
                    break
            seg[z] = mask
    return seg


def score(seg, gt):
    dice = 2 * (seg & gt).sum() / max(seg.sum() + gt.sum(), 1)
    zs, got = np.flatnonzero(gt.any(axis=(1, 2))), np.flatnonzero(seg.any(axis=(1, 2)))
    err = (abs(int(got[0]) - int(zs[0])) + abs(int(got[-1]) - int(zs[-1]))) / 2
    return dice, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--volumes", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--prompts", default="", help="PromptOptions fields, e.g. box=0,multimask=1")
    ap.add_argument("--save", type=Path, help="pickle the trajectories here")
    ap.add_argument("--load", type=Path, help="evaluate pickled trajectories (no model run)")
    args = ap.parse_args()

    from bench_volume import make_predictors

    from napari_sam.propagate import StopCriteria

    if args.load:
        with open(args.load, "rb") as fh:
            label, trajs = pickle.load(fh)
    else:
        enc, dec, label = make_predictors(args.model)
        trajs = collect(enc, dec, args.volumes, args.shape, prompts=_prompts(args.prompts))
        label += f"; prompts: {args.prompts or 'defaults'}"
    if args.save:
        with open(args.save, "wb") as fh:
            pickle.dump((label, trajs), fh)
    n_vol = args.volumes + 2
    design = [t for t in trajs if t.volume % 2 == 0]
    valid = [t for t in trajs if t.volume % 2 == 1]

    def evaluate(rule, subset, **kw):
        s = np.array([score(run_rule(rule, t, **kw), t.gt) for t in subset])
        return float(s[:, 0].mean()), float(s[:, 1].mean())

    grid = itertools.product(
        (None, 0.3, 0.5),  # min_score
        (None, 0.3, 0.5, 0.7, 0.8),  # min_iou_prev
        (None, 2.5),  # max_area_growth
        (None, 0.2, 0.3, 0.4, 0.5),  # min_contrast
        ("auto", "intensity", "embedding", "both"),  # contrast
        (None, 0.2, 0.3, 0.4, 0.5),  # min_anchor_area
    )
    rows = []
    for ms, mi, mg, mc, mode, ma in grid:
        if mc is None and mode != "auto":
            continue
        rule = StopCriteria(min_area=1, min_score=ms, min_iou_prev=mi, max_area_growth=mg,
                            min_contrast=mc, contrast=mode, min_anchor_area=ma)  # fmt: skip
        rows.append((rule, evaluate(rule, design)))
    rows.sort(key=lambda r: -r[1][0])
    no_intensity = [r for r in rows if r[0].min_contrast is None or r[0].contrast == "embedding"]
    default = StopCriteria()
    pitfall = StopCriteria(min_area=1, min_score=0.5, min_iou_prev=None, max_area_growth=None,
                           min_contrast=None)  # fmt: skip
    old = StopCriteria(min_iou_prev=0.2, max_area_growth=2.5, min_contrast=None)
    ref = [
        ("oracle: masks over the true z range", None, {"true_range": True}),
        ("no stop (until empty mask / stack end)", None, {}),
        ("pitfall: predicted IoU < 0.5 only", pitfall, {}),
        (f"geometry only: {_fmt(old)}", old, {}),
        (f"**default**: {_fmt(default)}", default, {}),
    ]

    def line(name, rule, **kw):
        d, e = evaluate(rule, design, **kw)
        v, ve = evaluate(rule, valid, **kw)
        return f"| {name} | {d:.3f} | {e:.1f} | {v:.3f} | {ve:.1f} |"

    lines = [
        f"Stop rules, model: {label}; {len(trajs)} objects from {n_vol} stacks "
        f"{tuple(args.shape)} (make_volume seeds 2,000,000+ and the tests' ellipsoid/tube); "
        f"design set: {len(design)} objects of the even-numbered stacks, validation: "
        f"{len(valid)} of the odd ones. Anchor: true mask on the middle slice of each object.",
        "",
        "| rule | 3D Dice (design) | z-end error | 3D Dice (validation) | z-end error |",
        "|---|---|---|---|---|",
        *[line(name, rule, **kw) for name, rule, kw in ref],
        "| *best rules on the design set:* | | | | |",
        *[line(_fmt(r[0]), r[0]) for r in rows[: args.top]],
        "| *best using the embedding only (objects that do not stand out in brightness):* "
        "| | | | |",
        *[line(_fmt(r[0]), r[0]) for r in no_intensity[: max(3, args.top // 3)]],
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


def _prompts(text: str):
    """``"box=0,multimask=1"`` -> PromptOptions(box=False, multimask=True)."""
    from napari_sam.propagate import PromptOptions

    kw = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        default = getattr(PromptOptions, key)
        kw[key] = bool(int(value)) if isinstance(default, bool) else type(default)(value)
    return PromptOptions(**kw)


def _fmt(rule) -> str:
    parts = [f"area<{rule.min_area}"]
    for attr, text in (
        ("min_score", "score<{}"),
        ("min_iou_prev", "IoU_prev<{}"),
        ("max_area_growth", "growth>{}"),
        ("max_area_shrink", "shrink>{}"),
        ("min_anchor_area", "area<{} x anchor"),
    ):
        value = getattr(rule, attr)
        if value is not None:
            parts.append(text.format(value))
    if rule.min_contrast is not None:
        parts.append(f"{rule.contrast} contrast<{rule.min_contrast}")
    return " or ".join(parts)


if __name__ == "__main__":
    main()

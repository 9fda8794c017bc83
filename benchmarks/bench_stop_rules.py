"""Design study for propagation stop rules on volumes whose true extent is known.

    python benchmarks/bench_stop_rules.py [--model default|PATH] [--volumes 8]
        [--shape 32 128 128] [--out FILE]

A front's masks do not depend on the stop rule until the rule fires, so each object is
propagated once with every data-driven stop off (fronts walk until the mask is empty or
the stack ends) and every rule is then evaluated by truncating the recorded trajectories
at the first slice where it fires. Objects come from ``napari_sam.train.synthetic
.make_volume`` (ellipsoids and tubes with a finite z extent, seeds 2,000,000+; the default model is
trained on 2D make_image only) plus the test suite's ellipsoid/tube; the anchor is the middle slice of each
object's true z range, annotated with its true mask.

Printed: mean 3D Dice per rule, the rules' mean absolute error of the first/last slice,
and two references: "oracle range" (the same masks kept exactly over the true z range)
and "no stop" (until empty/stack end). The issue's pitfall (stop on predicted IoU < 0.5)
is one of the rows.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


@dataclass
class Trajectory:
    gt: np.ndarray  # (Z, H, W) bool, the object's true voxels
    anchor_z: int
    anchor: np.ndarray
    fronts: dict  # direction -> [(z, mask, score)]


def volumes(n: int, shape):
    from napari_sam.train.synthetic import make_volume
    from volume_helpers import ellipsoid_volume, tube_volume

    for i in range(n):
        kind = ("nuclei", "tubes", "mixed")[i % 3]
        img, lab = make_volume(2_000_000 + i, shape=tuple(shape), kind=kind)
        yield f"make_volume({2_000_000 + i}, {kind})", img, lab
    z, h, w = shape
    img, m = ellipsoid_volume(shape=(z, h, w), center=(z // 2, h // 2, w // 2),
                              radii=(z / 3.5, h / 4, w / 5))  # fmt: skip
    yield "ellipsoid (tests)", img, m.astype(np.int32)
    img, m = tube_volume(shape=(z, h, w), radius=h / 10)
    m[: z // 5], m[-z // 5 :] = False, False
    yield "tube (tests)", img, m.astype(np.int32)


def collect(enc, dec, n_volumes: int, shape, min_voxels: int = 200, prompts=None):
    from napari_sam.embeddings import EmbeddingStore
    from napari_sam.propagate import PropagationState, StopCriteria, propagate

    walk = StopCriteria(min_area=1, min_score=None, min_iou_prev=None, max_area_growth=None)
    out = []
    for name, img, lab in volumes(n_volumes, shape):
        ids = [i for i in np.unique(lab) if i and (lab == i).sum() >= min_voxels]
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
        for step in propagate(
            EmbeddingStore(img, enc), dec, state, criteria=walk, prompts=prompts
        ):
            if step.mask is not None:
                fronts[step.obj_id][step.direction].append((step.z, step.mask, step.score))
        for i, (gt, mid) in gts.items():
            out.append(Trajectory(gt, mid, gt[mid], fronts[i]))
        print(f"{name}: {len(gts)} objects", file=sys.stderr, flush=True)
    return out


def run_rule(rule, t: Trajectory, true_range: bool = False):
    """Segmentation volume (bool) of trajectory ``t`` truncated by ``rule``."""
    seg = np.zeros_like(t.gt)
    seg[t.anchor_z] = t.anchor
    zs = np.flatnonzero(t.gt.any(axis=(1, 2)))
    for steps in t.fronts.values():
        prev = t.anchor
        for z, mask, score in steps:
            if true_range:
                if not zs[0] <= z <= zs[-1]:
                    break
            elif rule is not None:
                area, prev_area = int(mask.sum()), int(prev.sum())
                union = (mask | prev).sum()
                iou_prev = (mask & prev).sum() / union if union else 1.0
                if rule.check(area, score, iou_prev, prev_area) is not None:
                    break
            seg[z] = mask
            prev = mask
    return seg


def score(seg, gt):
    dice = 2 * (seg & gt).sum() / max(seg.sum() + gt.sum(), 1)
    zs, got = np.flatnonzero(gt.any(axis=(1, 2))), np.flatnonzero(seg.any(axis=(1, 2)))
    err = (abs(int(got[0]) - int(zs[0])) + abs(int(got[-1]) - int(zs[-1]))) / 2
    return dice, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--volumes", type=int, default=9)
    ap.add_argument("--shape", type=int, nargs=3, default=(32, 128, 128))
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from bench_volume import make_predictors

    from napari_sam.propagate import StopCriteria

    enc, dec, label = make_predictors(args.model)
    trajs = collect(enc, dec, args.volumes, args.shape)

    def evaluate(rule, **kw):
        s = np.array([score(run_rule(rule, t, **kw), t.gt) for t in trajs])
        return s[:, 0].mean(), np.median(s[:, 0]), s[:, 1].mean()

    rows = []
    grid = itertools.product(
        (None, 0.3, 0.5, 0.7),  # min_score
        (None, 0.1, 0.2, 0.3, 0.5),  # min_iou_prev
        (None, 1.5, 2.0, 2.5, 4.0),  # max_area_growth
        (None, 4.0),  # max_area_shrink
        (1, 10),  # min_area
    )
    for ms, mi, mg, mk, ma in grid:
        rule = StopCriteria(min_area=ma, min_score=ms, min_iou_prev=mi, max_area_growth=mg,
                            max_area_shrink=mk)  # fmt: skip
        rows.append((rule, *evaluate(rule)))
    rows.sort(key=lambda r: -r[1])
    default = StopCriteria()
    pitfall = StopCriteria(min_area=1, min_score=0.5, min_iou_prev=None, max_area_growth=None)
    ref = [
        ("oracle: masks over the true z range", *evaluate(None, true_range=True)),
        ("no stop (until empty mask / stack end)", *evaluate(None)),
        ("pitfall: predicted IoU < 0.5 only", *evaluate(pitfall)),
        (f"default {_fmt(default)}", *evaluate(default)),
    ]

    def line(name, mean, med, err):
        return f"| {name} | {mean:.3f} | {med:.3f} | {err:.2f} |"

    lines = [
        f"Stop rules, model: {label}; {len(trajs)} objects in {args.volumes} make_volume "
        f"stacks {tuple(args.shape)} + 2 test volumes; anchor = true mask on the middle slice.",
        "",
        "| rule | mean 3D Dice | median | mean z-end error (slices) |",
        "|---|---|---|---|",
        *[line(*r) for r in ref],
        *[line(_fmt(r[0]), *r[1:]) for r in rows[: args.top]],
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


def _fmt(rule) -> str:
    parts = [f"area<{rule.min_area}"]
    if rule.min_score is not None:
        parts.append(f"score<{rule.min_score}")
    if rule.min_iou_prev is not None:
        parts.append(f"IoU_prev<{rule.min_iou_prev}")
    if rule.max_area_growth is not None:
        parts.append(f"growth>{rule.max_area_growth}")
    if rule.max_area_shrink is not None:
        parts.append(f"shrink>{rule.max_area_shrink}")
    return " or ".join(parts)


if __name__ == "__main__":
    main()

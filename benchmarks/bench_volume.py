"""Benchmark whole-stack embeddings and z-propagation; prints a Markdown table.

    python benchmarks/bench_volume.py [--model default|tiny|vit_t|vit_b|PATH]
        [--slices 64] [--size 512] [--budget-mb 32] [--out FILE] [--real IMG LABELS]

Sections (each timed in a fresh subprocess so that peak RSS is per section):

1. precompute: embeddings of all slices of a ``slices x size x size`` uint16 stack kept in
   an on-disk zarr (read one slice at a time), into a float16 zarr embedding store;
   total and per-slice time, encoder runs.
2. reopen: open the store again (signature + per-slice content hashes) and read every
   slice's embedding; encoder runs must be 0.
3. propagation per slice from one anchor in the middle, two objects in one pass:
   warm (store already filled) and cold (empty store) with prefetch on and off.
4. peak RSS of precompute + cold propagation with an in-memory LRU budget far below the
   size of all embeddings (``--budget-mb``), against the size of all embeddings.
5. 3D Dice on synthetic volumes (ellipsoid, tube) when the default model is available,
   and on a real labelled stack given with ``--real IMAGE LABELS`` (same protocol).

``--model``: ``default`` = ``napari_sam.load_model()``; ``nsam_s`` = the default model's
architecture with random weights (same speed); ``tiny`` = a small random-weight SAM from
tests/volume_helpers.py; ``vit_t``/``vit_b`` = random weights via ``napari_sam.build_sam``;
or a checkpoint path. Timing sections walk every slice (stop criteria off), so random
weights time the same work as trained ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


# ----------------------------------------------------------------------------- setup
def make_predictors(model_name: str):
    """(encoding predictor, decoding predictor) sharing one model, and a label."""
    if model_name == "tiny":
        from volume_helpers import tiny_predictor, twin_predictor

        p = tiny_predictor()
        return p, twin_predictor(p), "tiny random SAM (tests)"
    import torch

    import napari_sam

    torch.manual_seed(0)  # random-weight models must be the same in every section
    if model_name == "default":
        model = napari_sam.load_model()
        label = "default model"
    elif model_name == "nsam_s":
        from napari_sam.model.small_encoder import build_nsam

        model = build_nsam()
        label = "nsam_s (default-model architecture, random weights)"
    elif model_name in ("vit_t", "vit_b", "vit_l", "vit_h"):
        model = napari_sam.build_sam(model_name)
        label = f"{model_name} (random weights)"
    elif Path(model_name).with_suffix(".json").is_file():  # nsam weights + config sidecar
        from napari_sam.model.small_encoder import load_nsam

        model = load_nsam(model_name)
        label = f"{Path(model_name).name} (nsam)"
    else:
        model = napari_sam.load_model(model_name)
        label = str(model_name)
    try:
        enc = napari_sam.SamPredictor(model, cache_bytes=0)
    except TypeError:
        enc = napari_sam.SamPredictor(model)
    return enc, napari_sam.SamPredictor(model), label


def synthetic_stack(n: int, size: int, seed: int = 0):
    """uint16 stack with two objects: an ellipsoid and a drifting tube; (image, labels)."""
    rng = np.random.default_rng(seed)
    img = np.empty((n, size, size), np.uint16)
    lab = np.zeros((n, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    for z in range(n):
        dz = (z - n / 2) / (0.4 * n)
        r1 = 0.22 * size * np.sqrt(max(0.0, 1 - dz**2))
        m1 = (yy - 0.45 * size) ** 2 + ((xx - 0.4 * size) / 1.2) ** 2 <= r1**2
        cy = c + 0.15 * size * np.sin(z / n * np.pi * 2)
        m2 = (yy - cy) ** 2 + (xx - 0.78 * size) ** 2 <= (0.07 * size) ** 2
        m2 &= ~m1
        bg = 800 + 200 * np.sin(xx / size * 3) + rng.normal(0, 60, (size, size))
        im = bg + 1500 * m1 * (1 + 0.2 * np.sin(yy / 9)) + 1100 * m2
        img[z] = np.clip(im, 0, 65535).astype(np.uint16)
        lab[z][m1], lab[z][m2] = 1, 2
    return img, lab


def stack_on_disk(n: int, size: int, folder: Path):
    import zarr

    img, lab = synthetic_stack(n, size)
    arr = zarr.create_array(folder / "image.zarr", shape=img.shape, chunks=(1, size, size),
                            dtype=img.dtype, overwrite=True)  # fmt: skip
    arr[:] = img
    np.save(folder / "labels.npy", lab)
    return folder / "image.zarr", folder / "labels.npy"


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- sections
def run_section(name: str, args, folder: Path) -> dict:
    """Run one section in a fresh interpreter; returns its JSON result."""
    cmd = [sys.executable, __file__, "--section", name, "--folder", str(folder),
           "--model", args.model, "--budget-mb", str(args.budget_mb)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.real:
        cmd += ["--real", *map(str, args.real)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"section {name} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(name: str, folder: Path, model_name: str, budget_mb: float, real=None) -> dict:
    import torch
    import zarr

    from napari_sam.embeddings import EmbeddingStore
    from napari_sam.propagate import PropagationState, StopCriteria, propagate

    # Timing sections walk every slice whatever the model predicts (random weights give
    # arbitrary masks); stop criteria are exercised by the Dice section.
    walk = StopCriteria(min_area=0, min_iou_prev=None, max_area_growth=None, min_contrast=None)
    enc, dec, label = make_predictors(model_name)
    image = zarr.open_array(folder / "image.zarr", mode="r")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    n = image.shape[0]
    store_path = folder / "emb.zarr"
    result: dict = {"model": label, "torch_threads": torch.get_num_threads()}

    def new_store(path=store_path, **kw):
        return EmbeddingStore(image, enc, path, cache_bytes=int(budget_mb * 2**20), **kw)

    def run_propagation(store, prefetch, on_slice=None):
        """Returns (total s, median s per slice, CPU s, slices visited, state)."""
        mid = n // 2
        state = PropagationState(n, image.shape[1:])
        for obj in (1, 2):
            state.add_anchor(obj, mid, np.asarray(labels[mid]) == obj)
        t0, c0 = time.perf_counter(), time.process_time()
        marks, last_z = [t0], None
        for step in propagate(store, dec, state, prefetch=prefetch, criteria=walk):
            if step.mask is not None and step.z != last_z:
                marks.append(time.perf_counter())
                last_z = step.z
                if on_slice is not None:
                    on_slice(len(marks) - 1)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        # Per-slice time: between the first results of consecutive slices (robust median).
        per = float(np.median(np.diff(marks))) if len(marks) > 1 else float("nan")
        return dt, per, cpu, len(marks) - 1, state

    if name == "precompute":
        store = new_store(overwrite=True)
        times = []
        t0 = time.perf_counter()
        for ev in store.iter_precompute():
            times.append(ev.seconds)
        result.update(total_s=time.perf_counter() - t0, per_slice_s=float(np.median(times)),
                      encoder_runs=store.encoder_runs, slices=n)  # fmt: skip
        result["store_mb"] = (
            sum(p.stat().st_size for p in store_path.rglob("*") if p.is_file()) / 2**20
        )
    elif name == "reopen":
        t0 = time.perf_counter()
        store = new_store()
        t_open = time.perf_counter() - t0
        for z in range(n):
            store.get(z)
        result.update(open_s=t_open, read_all_s=time.perf_counter() - t0 - t_open,
                      encoder_runs=store.encoder_runs)  # fmt: skip
    elif name in ("warm", "cold_prefetch", "cold_noprefetch"):
        store = new_store() if name == "warm" else new_store(path=None)
        dt, per, cpu, k, _ = run_propagation(store, prefetch=name != "cold_noprefetch")
        result.update(total_s=dt, per_slice_s=per, cpu_s=cpu, slices=k,
                      encoder_runs=store.encoder_runs)  # fmt: skip
    elif name == "rss":
        base = current_rss_mb()
        marks = {}

        def mark(key, i, total):
            if i in (total // 4, total):
                marks[f"{key}_{'quarter' if i < total else 'end'}"] = current_rss_mb()

        store = new_store(path=folder / "emb_rss.zarr", overwrite=True)
        for ev in store.iter_precompute():
            mark("precompute", ev.done, n)
        store.clear_memory()
        store2 = new_store(path=folder / "emb_rss2.zarr", overwrite=True)
        run_propagation(store2, prefetch=True, on_slice=lambda i: mark("propagate", i, n - 1))
        feat = store.get(0).features
        all_mb = n * feat.numel() * 4 / 2**20
        result.update(peak_rss_mb=peak_rss_mb(), rss_before_mb=base, budget_mb=budget_mb,
                      all_embeddings_f32_mb=all_mb, image_mb=image.nbytes / 2**20,
                      **marks)  # fmt: skip
    elif name == "dice":
        result.update(dice_sections(enc, dec, real))
    print(json.dumps(result))
    return result


def dice_sections(enc, dec, real=None) -> dict:
    """3D Dice with default settings on make_volume stacks (one anchor per object: the
    ground truth on the object's middle slice), and on ``real`` = (image, labels) files."""
    from napari_sam.embeddings import EmbeddingStore
    from napari_sam.propagate import PropagationState, propagate
    from napari_sam.train.synthetic import make_volume

    def stacks(kind):
        if kind == "real":
            import tifffile

            yield tifffile.imread(real[0]), tifffile.imread(real[1])
            return
        for seed in (2_200_000, 2_200_001):
            yield make_volume(seed, shape=(32, 128, 128), kind=kind)

    out = {}
    for kind in ("nuclei", "tubes", "mixed", *(["real"] if real else [])):
        dice, err, n = [], [], 0
        for img, lab in stacks(kind):
            state = PropagationState(img.shape[0], img.shape[1:])
            gts = {}
            for i in np.unique(lab)[1:]:
                gt = lab == i
                zs = np.flatnonzero(gt.any(axis=(1, 2)))
                if zs.size >= 3 and gt.sum() >= 200:
                    state.add_anchor(int(i), int(zs[len(zs) // 2]), gt[zs[len(zs) // 2]])
                    gts[int(i)] = (gt, zs)
            list(propagate(EmbeddingStore(img, enc), dec, state))
            for i, (gt, zs) in gts.items():
                seg = state.object_volume(i)
                dice.append(2 * (seg & gt).sum() / (seg.sum() + gt.sum()))
                got = np.flatnonzero(seg.any(axis=(1, 2)))
                err += [abs(int(got[0]) - int(zs[0])), abs(int(got[-1]) - int(zs[-1]))]
                n += 1
        out[kind] = {"dice": float(np.mean(dice)), "z_err": float(np.mean(err)), "objects": n}
    return out


# ------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--slices", type=int, default=64)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--budget-mb", type=float, default=32.0)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--real", nargs=2, type=Path, metavar=("IMAGE", "LABELS"),
                    help="a labelled 3D stack (TIFF) for the 3D Dice section")  # fmt: skip
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        section(args.section, args.folder, args.model, args.budget_mb, args.real)
        return

    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_volume_") as tmp:
        folder = Path(tmp)
        stack_on_disk(args.slices, args.size, folder)
        r = {}
        for name in ("precompute", "reopen", "warm", "cold_prefetch", "cold_noprefetch", "rss"):
            print(f"running {name} ...", file=sys.stderr, flush=True)
            r[name] = run_section(name, args, folder)
        dice = None
        if args.model == "default" or Path(args.model).exists():
            print("running dice ...", file=sys.stderr, flush=True)
            dice = run_section("dice", args, folder)

    n = args.slices
    lines = [
        f"Stack {n} x {args.size} x {args.size} uint16 (zarr on disk), model: "
        f"{r['precompute']['model']}; {platform.processor() or platform.machine()}, "
        f"torch threads {r['precompute']['torch_threads']}; LRU budget {args.budget_mb:g} MB; "
        f"load average at start {load[0]:.1f} (machine shared with other jobs).",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| precompute all {n} slices | {r['precompute']['total_s']:.2f} s "
        f"({r['precompute']['per_slice_s'] * 1e3:.0f} ms/slice median, "
        f"{r['precompute']['encoder_runs']} encoder runs) |",
        f"| embedding store on disk (float16) | {r['precompute']['store_mb']:.1f} MB |",
        f"| re-open store (signature + content hash of {n} slices) | "
        f"{r['reopen']['open_s'] * 1e3:.0f} ms |",
        f"| read all {n} embeddings after re-open | {r['reopen']['read_all_s'] * 1e3:.0f} ms, "
        f"**{r['reopen']['encoder_runs']} encoder runs** |",
    ]
    for key, text in (("warm", "warm embeddings"), ("cold_prefetch", "cold, prefetch on"),
                      ("cold_noprefetch", "cold, prefetch off")):  # fmt: skip
        x = r[key]
        lines.append(
            f"| propagation, 2 objects, {text} | {x['per_slice_s'] * 1e3:.0f} ms/slice median "
            f"({x['slices']} slices in {x['total_s']:.1f} s, CPU {x['cpu_s']:.1f} s, "
            f"{x['encoder_runs']} encoder runs) |"
        )
    x = r["rss"]
    lines.append(
        f"| RSS, precompute then cold propagation | start {x['rss_before_mb']:.0f} MB; "
        f"precompute at 1/4: {x['precompute_quarter']:.0f} MB, end: {x['precompute_end']:.0f} MB; "
        f"propagation at 1/4: {x['propagate_quarter']:.0f} MB, end: {x['propagate_end']:.0f} MB; "
        f"peak {x['peak_rss_mb']:.0f} MB (all embeddings as float32: "
        f"{x['all_embeddings_f32_mb']:.0f} MB; image {x['image_mb']:.0f} MB, on disk) |"
    )
    if dice is not None:
        for key, d in dice.items():
            if key in ("model", "torch_threads"):
                continue
            what = (
                f"real stack {args.real[0].name} (1 stack" if key == "real"
                else f"make_volume {key} (2 stacks 32 x 128 x 128"
            )  # fmt: skip
            lines.append(
                f"| 3D Dice, {what}, {d['objects']} objects, 1 anchor each, default "
                f"settings) | {d['dice']:.3f} (first/last slice off by {d['z_err']:.1f} "
                "on average) |"
            )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

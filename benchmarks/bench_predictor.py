"""Benchmark: napari_sam.SamPredictor vs the official segment-anything SamPredictor.

Both predictors wrap the SAM model (random weights: timings do not depend on them) in the
same process; each measurement alternates ours / official so that machine load hits both
alike. Measured:

- encoder: ``set_image`` on a new image (resize + normalise + image encoder);
- cached set_image (ours): returning to a slice whose embedding is in the LRU cache;
- per click: ``predict(...)`` numpy in -> masks at the slice resolution, multimask, for a
  point, a box, and a box + mask prompt (the low-res logits of the box call fed back);
- peak RSS above the process's RSS before the step (sampled every 2 ms).

Run from the repository root::

    PYTHONPATH=src:tests python benchmarks/bench_predictor.py [--models vit_b vit_t]
        [--size 1024] [--clicks 15] [--encoder-reps 3] [--bf16] [--write-docs]

``--write-docs`` replaces the predictor section of docs/performance.md. ``vit_t`` runs
when ``napari_sam.build_sam("vit_t")`` exists (the official package has no vit_t; the
reference predictor then wraps our vit_t model).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT / "src", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from napari_sam.predictor import SamPredictor  # noqa: E402
from reference.official import import_official  # noqa: E402

DOC = ROOT / "docs" / "performance.md"
START, END = "<!-- bench_predictor:start -->", "<!-- bench_predictor:end -->"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager: peak RSS above the value at entry, sampled in a thread."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def build_models(name: str):
    """(model for ours, model for the official predictor, description)."""
    sa = import_official()
    torch.manual_seed(0)
    try:
        from napari_sam.model import build_sam

        ours = build_sam(name).eval()
        if name in sa.sam_model_registry:
            ref = sa.sam_model_registry[name]().eval()
            ref.load_state_dict(ours.state_dict())
            return ours, ref, "napari_sam.build_sam vs segment_anything model, same weights"
        return ours, ours, "napari_sam.build_sam model in both predictors"
    except (ImportError, AttributeError, KeyError, ValueError, NotImplementedError):
        if name not in sa.sam_model_registry:
            return None
        m = sa.sam_model_registry[name]().eval()
        return m, m, "segment_anything model in both predictors"


def image(size: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([np.sin(xx / 40.0), np.cos(yy / 55.0), np.sin((xx + yy) / 70.0)], -1)
    img = (base + 1) * 110 + rng.normal(0, 8, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def stats(ts):
    """(median, min, max) wall ms and median CPU ms (None unless torch runs 1 thread)."""
    wall = [t[0] * 1e3 for t in ts]
    cpu = [t[1] * 1e3 for t in ts if t[1] is not None]
    med_cpu = statistics.median(cpu) if cpu else None
    return statistics.median(wall), min(wall), max(wall), med_cpu


def timed(fn):
    """((wall s, CPU s of this thread or None), result).

    With one torch thread all compute runs on the calling thread, so its CPU time is the
    work done, unaffected by other processes competing for the cores.
    """
    one = torch.get_num_threads() == 1
    c, t = time.thread_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - t, time.thread_time() - c
    return (wall, cpu if one else None), out


def bench_model(name, args, rows, notes):
    built = build_models(name)
    if built is None:
        notes.append(f"{name}: skipped (no builder for it yet)")
        return
    m_ours, m_ref, how = built
    sa = import_official()
    notes.append(f"{name}: {how}")
    img = image(args.size)
    ref = sa.SamPredictor(m_ref)
    variants = {"ours": {"encoder_dtype": "float32"}}
    if args.bf16:
        variants["ours bf16-enc"] = {"encoder_dtype": "bfloat16"}

    # ---- encoder: alternate official / ours on the same image (ours with the cache off)
    enc = {"official": [], **{k: [] for k in variants}}
    preds = {k: SamPredictor(m_ours, cache_bytes=0, **kw) for k, kw in variants.items()}
    for rep in range(args.encoder_reps):
        enc["official"].append(timed(lambda: ref.set_image(img))[0])
        for k, p in preds.items():
            enc[k].append(timed(lambda p=p, r=rep: p.set_image(img, key=r))[0])
    for k, ts in enc.items():
        rows.append((name, k, "encoder (set_image)", *stats(ts)))

    ours = SamPredictor(m_ours)
    ours.set_embedding(preds["ours"].get_embedding())
    if args.bf16:  # agreement of bf16-encoder masks with float32 masks
        b = preds["ours bf16-enc"]
        f32, f16 = ours.features, b.features
        rel = ((f16 - f32).norm() / f32.norm()).item()
        box = np.array([args.size * 0.2, args.size * 0.25, args.size * 0.7, args.size * 0.8])
        m32, m16 = ours.predict(box=box)[0], b.predict(box=box)[0]
        iou = (m32 & m16).sum() / max(1, (m32 | m16).sum())
        notes.append(
            f"{name}: bf16 encoder vs float32: relative L2 error of the embedding {rel:.3g}, "
            f"box masks IoU {iou:.4f}, differing pixels {(m32 != m16).mean():.3%} "
            "(random weights; check with trained weights before relying on it)"
        )

    # ---- returning to a cached slice
    ours.set_image(img)
    ts = [timed(lambda: ours.set_image(img))[0] for _ in range(args.clicks)]
    rows.append((name, "ours", "set_image, cached", *stats(ts)))

    # ---- per click, alternating ours / official
    s = args.size
    point = {"point_coords": np.array([[s * 0.45, s * 0.4]]), "point_labels": np.array([1])}
    box = {"box": np.array([s * 0.2, s * 0.25, s * 0.7, s * 0.8])}
    low = ours.predict(**box)[2]
    boxmask = {"box": box["box"], "mask_input": low[[0]]}
    for pname, kw in (("point", point), ("box", box), ("box+mask", boxmask)):
        for _ in range(2):  # warm-up
            ours.predict(**kw)
            ref.predict(**kw)
        t_ours, t_ref = [], []
        for _ in range(args.clicks):
            t_ours.append(timed(lambda kw=kw: ours.predict(**kw))[0])
            t_ref.append(timed(lambda kw=kw: ref.predict(**kw))[0])
        rows.append((name, "official", f"click: {pname}", *stats(t_ref)))
        rows.append((name, "ours", f"click: {pname}", *stats(t_ours)))


def bench_masks(args, rows) -> None:
    """Low-res logits -> bool masks at the slice size for smooth (trained-like) logits.

    Random-weight decoders give rough logits, the worst case for our outline-only
    threshold; this times the step alone on three nested discs (like SAM's multimask
    output): ours (one interpolation, outline-only threshold) vs the official
    ``postprocess_masks`` + threshold.
    """
    from napari_sam._masks import upsample_binary

    sa = import_official()
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    low = torch.stack([8 - ((yy - 100) ** 2 + (xx - 120) ** 2).sqrt() / r for r in (3, 5, 8)])[
        None
    ]
    post = sa.modeling.Sam.postprocess_masks

    class _S:  # postprocess_masks only reads image_encoder.img_size
        image_encoder = type("E", (), {"img_size": 1024})()

    for h, w in ((1024, 1024), (2048, 2048), (4000, 3000)):
        scale = 1024 / max(h, w)
        inp = (int(h * scale + 0.5), int(w * scale + 0.5))
        t_o, t_r = [], []
        with torch.inference_mode():
            for _ in range(max(3, args.clicks // 3)):
                t_o.append(
                    timed(lambda h=h, w=w, inp=inp: upsample_binary(low, inp, (h, w), 1024))[0]
                )
                t_r.append(timed(lambda h=h, w=w, inp=inp: post(_S, low, inp, (h, w)) > 0)[0])
        rows.append(("any", "official", f"masks only {h}x{w}", *stats(t_r)))
        rows.append(("any", "ours", f"masks only {h}x{w}", *stats(t_o)))


def memory_child(name: str, who: str, size: int) -> None:
    """In a fresh process: peak RSS above the loaded-model baseline for set_image + clicks."""
    m_ours, m_ref, _ = build_models(name)
    img = image(size)
    if who == "official":
        p = import_official().SamPredictor(m_ref)
    else:
        p = SamPredictor(
            m_ours, encoder_dtype="bfloat16" if who.endswith("bf16-enc") else "float32"
        )
    box = np.array([size * 0.2, size * 0.25, size * 0.7, size * 0.8])
    with PeakRSS() as enc:
        p.set_image(img)
    with PeakRSS() as clicks:
        low = p.predict(box=box)[2]
        for _ in range(3):
            p.predict(np.array([[size * 0.45, size * 0.4]]), np.array([1]))
            p.predict(box=box, mask_input=low[[0]])
    print(f"MEM {enc.mib:.1f} {clicks.mib:.1f}")


def memory_rows(models, whos, size, threads) -> list[tuple]:
    import subprocess

    out = []
    for name in models:
        for who in whos:
            cmd = [sys.executable, __file__, "--memory-child", name, who, "--size", str(size)]
            cmd += ["--threads", str(threads)] if threads else []
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            line = [ln for ln in res.stdout.splitlines() if ln.startswith("MEM ")]
            if res.returncode or not line:
                continue
            enc, clicks = map(float, line[0].split()[1:])
            out.append((name, who, enc, clicks))
    return out


def table(rows) -> str:
    head = "| model | predictor | step | median ms | min ms | max ms | median CPU ms |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|"]
    for name, who, step, med, lo, hi, cpu in rows:
        c = "" if cpu is None else f"{cpu:.1f}"
        lines.append(f"| {name} | {who} | {step} | {med:.1f} | {lo:.1f} | {hi:.1f} | {c} |")
    return "\n".join(lines)


def mem_table(mrows) -> str:
    lines = [
        "| model | predictor | peak RSS +MiB, set_image | peak RSS +MiB, clicks |",
        "|---|---|---:|---:|",
    ]
    for name, who, enc, clicks in mrows:
        lines.append(f"| {name} | {who} | {enc:.0f} | {clicks:.0f} |")
    return "\n".join(lines)


def ratios(rows) -> list[str]:
    out = []
    med = {(r[0], r[1], r[2]): (r[3], r[6]) for r in rows}
    for (name, who, step), (v, c) in med.items():
        if who.startswith("ours") and (name, "official", step) in med:
            rv, rc = med[(name, "official", step)]
            line = f"{name} {step}: {who} / official = {v / rv:.2f} (wall)"
            if c is not None and rc:
                line += f", {c / rc:.2f} (CPU)"
            out.append(line)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        for line in lines:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def write_docs(text: str, tag: str = "") -> None:
    """Replace the section between this run's markers in docs/performance.md."""
    start, end = (START, END) if not tag else (m.replace(":", f":{tag}:", 1) for m in (START, END))
    section = f"{start}\n{text}\n{end}"
    if DOC.exists():
        doc = DOC.read_text()
        if start in doc and end in doc:
            doc = doc[: doc.index(start)] + section + doc[doc.index(end) + len(end) :]
        else:
            doc = doc.rstrip() + "\n\n" + section + "\n"
    else:
        doc = "# Performance\n\n" + section + "\n"
    DOC.write_text(doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["vit_t", "vit_b"])
    ap.add_argument("--size", type=int, default=1024, help="square uint8 RGB test image side")
    ap.add_argument("--clicks", type=int, default=15, help="timed calls per prompt type")
    ap.add_argument("--encoder-reps", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="also time a bfloat16-autocast encoder")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--memory-child", nargs=2, metavar=("MODEL", "WHO"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.size)
        return 0

    rows, notes = [], []
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    for name in args.models:
        bench_model(name, args, rows, notes)
    bench_masks(args, rows)
    whos = ["official", "ours"] + (["ours bf16-enc"] if args.bf16 else [])
    done = [m for m in args.models if any(r[0] == m for r in rows)]
    mrows = [] if args.no_memory else memory_rows(done, whos, args.size, args.threads)
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()
    cmd = "PYTHONPATH=src:tests python benchmarks/bench_predictor.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    text = "\n".join(
        [
            f"Image {args.size} x {args.size} uint8 RGB; {args.clicks} clicks per prompt type, "
            f"{args.encoder_reps} encoder runs; multimask output; random weights.",
            f"Machine: {machine()}.",
            f"Load average at start / end: {load0[0]:.2f} / {load1[0]:.2f}; "
            f"benchmark wall time {wall:.0f} s.",
            f"Command: `{cmd.strip()}`",
            "",
            "Wall times include waiting for the CPU when other processes compete for it; "
            "with `--threads 1` the CPU column (this thread's CPU time, all of torch's work) "
            "is the load-independent cost.",
            "",
            table(rows),
            "",
            *(
                [
                    "Peak memory, each predictor alone in a fresh process, above the RSS "
                    "with the model loaded:",
                    "",
                    mem_table(mrows),
                    "",
                ]
                if mrows
                else []
            ),
            *[f"- {r}" for r in ratios(rows)],
            *[f"- {n}" for n in notes],
        ]
    )
    print(text)
    if args.write_docs:
        write_docs(text, f"threads{args.threads}" if args.threads else "")
        print(f"\nwrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

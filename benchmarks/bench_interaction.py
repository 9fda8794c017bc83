"""Prompt event -> updated candidate layers, in the real napari viewer with the real widget.

For a 1024 x 1024 and a 4096 x 4096 slice whose embedding is already cached, a point is
added to the widget's Points layer through the layer API (what a mouse click in add mode
calls) and the clock runs until the three candidate Labels layers hold the new masks.
Reported: median and 90th percentile over the events, and a breakdown measured in the
same run: the decoder call (``SamPredictor.predict``: prompt encoder, mask decoder, mask
upsampling; worker thread) and writing the three candidate layers (Qt thread). A direct
``predict`` call without napari is the reference.

Models (``--models``): ``sam``: SAM's real prompt encoder and mask decoder (the same sizes
in ViT-B/L/H, so the timing is that of any official SAM) with a single patch-embedding
convolution as image encoder, since the embedding is cached and the encoder never runs
during the events (random weights: timings do not depend on them); ``default``: the
bundled default model (napari_sam/weights/nsam_s.pt), what the widget starts with.

Run (needs a display; on a headless machine use Xvfb):

    xvfb-run -a python benchmarks/bench_interaction.py [--events 30] [--sizes 1024 4096]
        [--canvas shown hidden] [--modes adaptive worker qt] [--write-docs]

``--write-docs`` replaces the table between the bench_interaction markers in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def build_model():
    import torch
    from torch import nn

    from napari_sam.model.build import build_sam_from_parts

    class _PatchEncoder(nn.Module):
        img_size = 1024

        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 256, kernel_size=16, stride=16)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    return build_sam_from_parts(_PatchEncoder()).eval()


def test_image(size, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.normal(300, 30, (size, size)).astype(np.float32)
    rr, cc = np.ogrid[:size, :size]
    for _ in range(40):
        r, c = rng.uniform(0.1, 0.9, 2) * size
        rad = rng.uniform(0.02, 0.06) * size
        img[(rr - r) ** 2 + (cc - c) ** 2 <= rad**2] += rng.uniform(1000, 3000)
    return img.astype(np.uint16)


def wait_until(cond, timeout=600.0):
    """Run the Qt event loop until ``cond()`` holds (checked every millisecond), as napari
    runs it: the main thread sleeps between events. A busy ``processEvents`` loop would
    instead hold the GIL and slow the worker thread down many times over."""
    from qtpy.QtCore import QEventLoop, QTimer

    if cond():
        return
    loop = QEventLoop()
    t0 = time.perf_counter()

    def check():
        if cond() or time.perf_counter() - t0 > timeout:
            loop.quit()

    timer = QTimer()
    timer.setInterval(1)
    timer.timeout.connect(check)
    timer.start()
    loop.exec()
    timer.stop()
    if not cond():
        raise TimeoutError("condition not met")


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


MODES = {
    "adaptive": "adaptive (widget default)",
    "worker": "worker thread",
    "qt": "Qt thread",
}


def bench_size(viewer, widget_cls, choice, size, events, mode, flips="off", parts="clicked"):
    import threading

    from qtpy.QtWidgets import QApplication

    img = test_image(size)
    viewer.add_image(img, name=f"{size}")
    w = widget_cls(viewer, models=[choice], threaded=mode != "qt")
    w.flips_combo.setCurrentText(flips)
    w.parts_check.setChecked(parts == "clicked")
    if mode == "worker":
        w.inline_decode_ms = 0.0  # never on the Qt thread
    viewer.window.add_dock_widget(w, name=f"SAM {size}")
    wait_until(lambda: w.is_idle() and w.annotator is not None and w.annotator.has_embedding())
    ann = w.annotator

    decode_ms, show_ms, on_qt = [], [], []
    run, show = ann.run, w._show_candidates

    def timed_run(req):
        t = time.perf_counter()
        out = run(req)
        decode_ms.append(1e3 * (time.perf_counter() - t))
        on_qt.append(threading.current_thread() is threading.main_thread())
        return out

    def timed_show():
        t = time.perf_counter()
        show()
        show_ms.append(1e3 * (time.perf_counter() - t))

    ann.run = timed_run
    w._show_candidates = timed_show

    rng = np.random.default_rng(1)
    total_ms = []
    native = viewer.window._qt_viewer.canvas.native
    shown = native.isVisible()
    draw_ms = []

    def flush():
        """Let napari finish the previous event (slicing, painting) before the clock runs."""
        app = QApplication.instance()
        for _ in range(3):
            app.processEvents()
        if shown:
            native.update()
            app.processEvents()

    for i in range(events + 3):  # 3 warm-up events
        if i % 5 == 0:
            w.clear()
            wait_until(w.is_idle)
        pt = rng.uniform(0.1, 0.9, 2) * size
        before = ann.candidates
        if i < 3:
            decode_ms.clear()
            on_qt.clear()
        flush()
        t = time.perf_counter()
        w.points_layer.add([pt])
        wait_until(lambda b=before: w.is_idle() and ann.up_to_date and ann.candidates is not b)
        dt = 1e3 * (time.perf_counter() - t)
        if shown:  # then draw the canvas with the new candidates (what the user sees)
            t = time.perf_counter()
            native.update()
            QApplication.instance().processEvents()
            if i >= 3:
                draw_ms.append(1e3 * (time.perf_counter() - t))
        if i >= 3:
            total_ms.append(dt)
    decode_ms = decode_ms[-events:]
    show_ms = show_ms[-events:]

    # reference: the predictor alone, same prompts kind (one point, cached embedding)
    ref = []
    p = ann.predictor
    for _ in range(min(events, 15)):
        xy = rng.uniform(0.1, 0.9, (1, 2)) * size
        t = time.perf_counter()
        p.predict(point_coords=xy, point_labels=np.array([1]))
        ref.append(1e3 * (time.perf_counter() - t))
    viewer.window.remove_dock_widget(w)
    viewer.layers.clear()
    return {
        "size": size,
        "mode": MODES[mode],
        "inline": 100.0 * float(np.mean(on_qt)) if on_qt else float("nan"),
        "median": statistics.median(total_ms),
        "p90": pct(total_ms, 90),
        "decode": statistics.median(decode_ms) if decode_ms else float("nan"),
        "layers": statistics.median(show_ms) if show_ms else float("nan"),
        "predict_only": statistics.median(ref),
        "draw": statistics.median(draw_ms) if draw_ms else float("nan"),
    }


DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
START, END = "<!-- bench_interaction:start -->", "<!-- bench_interaction:end -->"


def table(rows) -> list[str]:
    out = [
        "| model | slice | canvas | decoder runs in | event -> candidate layers, median (ms) "
        "| p90 (ms) | decoder call (ms) | write 3 layers (ms) | then draw (ms) "
        "| predictor.predict alone (ms) | decoder calls on the Qt thread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['size']} x {r['size']} | {r['canvas']} | {r['mode']} | "
            f"{r['median']:.0f} | "
            f"{r['p90']:.0f} | {r['decode']:.0f} | {r['layers']:.0f} | "
            f"{'-' if r['draw'] != r['draw'] else format(r['draw'], '.0f')} | "
            f"{r['predict_only']:.0f} | {r['inline']:.0f} % |"
        )
    return out


def write_docs(text: str) -> None:
    section = f"{START}\n{text}\n{END}"
    if DOC.exists():
        doc = DOC.read_text()
        if START in doc and END in doc:
            doc = doc[: doc.index(START)] + section + doc[doc.index(END) + len(END) :]
        else:
            doc = doc.rstrip() + "\n\n" + section + "\n"
    else:
        doc = "# Performance\n\n" + section + "\n"
    DOC.write_text(doc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["adaptive", "worker", "qt"],
        choices=list(MODES),
        help="adaptive: the widget's default (cheap decoder calls on the Qt thread, others "
        "in the worker); worker: always the worker thread (inline_decode_ms = 0); qt: all "
        "torch work on the Qt thread (NAPARI_SAM_NO_THREADS=1)",
    )
    ap.add_argument(
        "--canvas",
        nargs="+",
        default=["shown"],
        choices=["shown", "hidden"],
        help="hidden: the window is not shown, so nothing is rendered (software OpenGL "
        "under Xvfb renders on the same CPU cores as the decoder)",
    )
    ap.add_argument("--models", nargs="+", default=["sam", "default"], choices=["sam", "default"])
    ap.add_argument(
        "--flips",
        default="off",
        help="the dock's Flips setting (off, or '4 views (slice + 3 flips)'); rows name it "
        "when it is not off",
    )
    ap.add_argument(
        "--parts",
        nargs="+",
        default=["clicked"],
        choices=["clicked", "whole"],
        help="the dock's 'only the parts you clicked' (clicked, the default) and/or whole "
        "masks; rows name it when not the default",
    )
    ap.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    args = ap.parse_args(argv)

    import napari

    from napari_sam._qt.widget import FLIPS, SamWidget

    if args.flips not in FLIPS:
        ap.error(f"--flips must be one of {list(FLIPS)}")
    from napari_sam.model_choices import ModelChoice

    # torch is first imported when the widget loads the model, as in napari
    cache = {}

    def loader(name):
        def load(device):
            if name not in cache:
                if name == "sam":
                    cache[name] = build_model()
                else:
                    from napari_sam.model.registry import load_model

                    cache[name] = load_model(None, device="cpu")
            return cache[name]

        return load

    choices = {
        "sam": ModelChoice("sam", "SAM decoder, patch encoder", loader("sam"), trained=False),
        "default": ModelChoice("default", "bundled default model", loader("default")),
    }
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = []
    for canvas in args.canvas:
        viewer = napari.Viewer(show=canvas == "shown")
        for name in args.models:
            for s in args.sizes:
                for mode in args.modes:
                    for parts in args.parts:
                        r = bench_size(
                            viewer,
                            SamWidget,
                            choices[name],
                            s,
                            args.events,
                            mode,
                            args.flips,
                            parts,
                        )
                        r["canvas"] = canvas
                        label = name if args.flips == "off" else f"{name}, flips {args.flips}"
                        r["model"] = label if parts == "clicked" else f"{label}, whole masks"
                        rows.append(r)
        viewer.close()
    import torch

    env = (
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
        f"load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after, "
        f"{time.perf_counter() - t0:.0f} s, python {sys.version.split()[0]}, "
        f"napari {napari.__version__}, Qt platform {os.environ.get('QT_QPA_PLATFORM', 'xcb')}"
    )
    cmd = "xvfb-run -a python benchmarks/bench_interaction.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    lines = [
        f"`{cmd}` ({args.events} point events per row, embedding cached; {env})",
        "",
        *table(rows),
    ]
    print("\n".join(lines))
    if args.write_docs:
        write_docs("\n".join(lines))


if __name__ == "__main__":
    main()

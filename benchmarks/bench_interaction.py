"""Prompt event -> updated candidate layers, in the real napari viewer with the real widget.

For a 1024 x 1024 and a 4096 x 4096 slice whose embedding is already cached, a point is
added to the widget's Points layer through the layer API (what a mouse click in add mode
calls) and the clock runs until the three candidate Labels layers hold the new masks.
Reported: median and 90th percentile over the events, and a breakdown measured in the
same run: the decoder call (``SamPredictor.predict``: prompt encoder, mask decoder, mask
upsampling; worker thread) and writing the three candidate layers (Qt thread). A direct
``predict`` call without napari is the reference.

The model has SAM's real prompt encoder and mask decoder (the same sizes in ViT-B/L/H, so
the timing is that of any official SAM); its image encoder is a single patch-embedding
convolution, since the embedding is cached and the encoder never runs during the events.
Weights are random: timings do not depend on them.

Run (needs a display; on a headless machine use Xvfb):

    xvfb-run -a python benchmarks/bench_interaction.py [--events 30] [--sizes 1024 4096]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

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


def wait_for_events(app):
    """Sleep until Qt has an event (a worker's result arrives as one) and process it, as
    the napari event loop does; a busy loop would take the GIL from the worker."""
    from qtpy.QtCore import QEventLoop

    app.processEvents(QEventLoop.ProcessEventsFlag.WaitForMoreEvents, 50)


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def bench_size(viewer, widget_cls, choice, size, events, app):
    img = test_image(size)
    viewer.add_image(img, name=f"{size}")
    w = widget_cls(viewer, models=[choice])
    viewer.window.add_dock_widget(w, name=f"SAM {size}")
    t0 = time.perf_counter()
    while not w.is_idle() or w.annotator is None or not w.annotator.has_embedding():
        app.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - t0 > 600:
            raise RuntimeError("embedding did not finish")
    ann = w.annotator

    decode_ms, show_ms = [], []
    run, show = ann.run, w._show_candidates

    def timed_run(req):
        t = time.perf_counter()
        out = run(req)
        decode_ms.append(1e3 * (time.perf_counter() - t))
        return out

    def timed_show():
        t = time.perf_counter()
        show()
        show_ms.append(1e3 * (time.perf_counter() - t))

    ann.run = timed_run
    w._show_candidates = timed_show

    rng = np.random.default_rng(1)
    total_ms = []
    for i in range(events + 3):  # 3 warm-up events
        if i % 5 == 0:
            w.clear()
            while not w.is_idle():
                wait_for_events(app)
        pt = rng.uniform(0.1, 0.9, 2) * size
        before = ann.candidates
        decode_ms.clear() if i < 3 else None
        t = time.perf_counter()
        w.points_layer.add([pt])
        while not (w.is_idle() and ann.up_to_date and ann.candidates is not before):
            wait_for_events(app)
        dt = 1e3 * (time.perf_counter() - t)
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
        "median": statistics.median(total_ms),
        "p90": pct(total_ms, 90),
        "decode": statistics.median(decode_ms) if decode_ms else float("nan"),
        "layers": statistics.median(show_ms) if show_ms else float("nan"),
        "predict_only": statistics.median(ref),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096])
    args = ap.parse_args(argv)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_sam._qt.widget import SamWidget
    from napari_sam.model_choices import ModelChoice

    model = build_model()
    choice = ModelChoice(
        "bench",
        "SAM decoder, patch encoder: untrained (testing)",
        lambda device: model,
        trained=False,
    )
    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    rows = [bench_size(viewer, SamWidget, choice, s, args.events, app) for s in args.sizes]
    viewer.close()

    print(f"# bench_interaction: {args.events} point events per size, embedding cached")
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}"
    )
    print(
        "| slice | event -> candidate layers, median (ms) | p90 (ms) | decoder call (ms) "
        "| write 3 layers (ms) | predictor.predict alone (ms) | target |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        target = "< 50 ms" if r["size"] <= 1024 else "-"
        print(
            f"| {r['size']} x {r['size']} | {r['median']:.1f} | {r['p90']:.1f} | "
            f"{r['decode']:.1f} | {r['layers']:.1f} | {r['predict_only']:.1f} | {target} |"
        )


if __name__ == "__main__":
    main()

"""Screenshot of the real napari window with the SAM annotator: prompts, the three
candidates and a committed object (docs/images/annotator.png).

It opens the ``napari-sam demo`` window (2D synthetic nuclei), commits one nucleus from a
single click, then puts a box and a point on a second nucleus so that the three candidate
layers show, and saves the whole window.

    xvfb-run -a python scripts/screenshot.py [--model NAME_OR_FILE] [--out PATH]

The model is the widget's default (a cached trained model, else the untrained testing
model, which the window then says in its model note); pass ``--model`` to choose.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def wait(app, widget, timeout=600):
    from qtpy.QtCore import QEventLoop

    t0 = time.perf_counter()
    while not widget.is_idle() or widget.annotator is None:
        app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.01)
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"the widget did not become idle: {widget.banner_text}")
    for _ in range(5):
        app.processEvents()


def nuclei():
    """Label image of the 2D sample (same seed as the sample image)."""
    from napari_sam._sample_data import _blobs

    _, labels = _blobs((512, 512), 40, seed=0)
    return labels


def centroid(mask):
    rr, cc = np.nonzero(mask)
    return np.array([rr.mean(), cc.mean()])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model name or checkpoint file (default: widget's)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "annotator.png"))
    args = ap.parse_args(argv)
    # autosave into a throw-away folder: a second run must not find the first run's
    # objects (the widget would offer to restore them instead of committing)
    import os
    import tempfile

    os.environ["NAPARI_SAM_RECOVERY"] = tempfile.mkdtemp(prefix="napari-sam-recovery-")

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_sam._cli_demo import open_demo

    viewer = napari.Viewer(title="napari-sam: SAM annotator", show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer, widget = open_demo(viewer, model=args.model)
    app = QApplication.instance()
    wait(app, widget)

    labels = nuclei()
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    big = ids[np.argsort(counts)[::-1]]
    first = labels == big[0]
    # the second object: the large nucleus nearest to the first, so both are in view
    c0 = centroid(first)
    second = min((labels == i for i in big[1:6]), key=lambda m: np.linalg.norm(centroid(m) - c0))

    def box_of(mask):
        rr, cc = np.nonzero(mask)
        return np.array([[rr.min() - 4, cc.min() - 4], [rr.max() + 4, cc.max() + 4]])

    # the first object from a box (the bundled model's strongest prompt), committed
    widget.box_layer.add_rectangles(box_of(first))
    wait(app, widget)
    widget.commit()
    wait(app, widget)

    widget.box_layer.add_rectangles(box_of(second))
    wait(app, widget)
    widget.points_layer.add([centroid(second)])
    wait(app, widget)
    viewer.layers.selection.active = widget.points_layer

    for _ in range(10):  # let the dock settle before placing the camera
        app.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    viewer.camera.center = tuple((centroid(first) + centroid(second)) / 2)
    viewer.camera.zoom *= 2.5
    for _ in range(10):
        app.processEvents()
        time.sleep(0.05)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(out), canvas_only=False, flash=False)
    print(f"wrote {out} ({widget.model_combo.currentText()})")
    viewer.close()


if __name__ == "__main__":
    main()

"""``napari-sam demo``: napari with a synthetic sample image and the SAM annotator docked."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stack", action="store_true", help="open the 3D sample stack instead of the 2D image"
    )
    parser.add_argument(
        "--model",
        metavar="NAME_OR_FILE",
        help="model to start with: a name from `napari-sam models`, or a checkpoint file "
        "(default: a cached trained model, else the untrained testing model)",
    )


def open_demo(viewer=None, stack: bool = False, model: str | None = None):
    """Add the sample image to ``viewer`` (a new one by default) and dock the annotator.

    Returns ``(viewer, widget)``.
    """
    import napari

    from napari_sam._sample_data import sample_cells_2d, sample_cells_3d

    if viewer is None:
        viewer = napari.Viewer(title="napari-sam demo")
    ((data, meta, _),) = (sample_cells_3d if stack else sample_cells_2d)()
    viewer.add_image(data, **meta)
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    if model:
        widget.select_model(model)
    return viewer, widget


def run(args: argparse.Namespace) -> int:
    import napari

    open_demo(stack=args.stack, model=args.model)
    napari.run()
    return 0

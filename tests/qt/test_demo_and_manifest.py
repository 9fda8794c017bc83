"""The widget as napari opens it (manifest) and the ``napari-sam demo`` command."""

import numpy as np

from napari_sam._cli_demo import open_demo
from napari_sam._qt.widget import SamWidget
from napari_sam.cli import build_parser
from napari_sam.model_choices import (
    UNTRAINED_TAG,
    _bundled_choices,
    default_choices,
    preferred_index,
)

from .conftest import wait_idle


def test_demo_opens_sample_and_docked_widget(make_napari_viewer, qtbot):
    viewer, widget = open_demo(make_napari_viewer())
    assert isinstance(widget, SamWidget)
    assert viewer.layers[0].name == "nuclei (synthetic)"
    wait_idle(qtbot, widget, timeout=60000)
    if preferred_index(default_choices()) is None:
        assert "No model available offline" in widget.banner_text
        return
    assert widget.annotator is not None and widget.annotator.has_embedding()
    if _bundled_choices():  # the project's default model is what a user starts with
        assert widget.model_combo.currentData() == "default"
        assert widget.model_note.isHidden()
    if UNTRAINED_TAG in widget.model_combo.currentText():
        assert "UNTRAINED" in widget.model_note.text() and not widget.model_note.isHidden()
    widget.points_layer.add([[100, 100]])
    wait_idle(qtbot, widget)
    assert any(np.asarray(c.data).any() for c in widget.candidate_layers)


def test_demo_command_line():
    args = build_parser().parse_args(["demo", "--stack", "--model", "vit_b"])
    assert args.stack and args.model == "vit_b" and callable(args._run)


def test_widget_is_first_in_manifest_and_opens_without_image(make_napari_viewer, qtbot):
    import yaml

    from napari_sam import _qt

    manifest = yaml.safe_load(
        (__import__("pathlib").Path(_qt.__file__).parents[1] / "napari.yaml").read_text()
    )
    first = manifest["contributions"]["widgets"][0]
    assert first["display_name"] == "SAM annotator"
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-sam", "SAM annotator")
    assert isinstance(widget, SamWidget)
    assert "No image layer" in widget.banner_text
    widget.select_model("no-such-model")
    assert "Unknown model 'no-such-model'" in widget.banner_text


def test_every_key_is_documented():
    from pathlib import Path

    from napari_sam._qt.widget import KEYS

    usage = (Path(__file__).parents[2] / "docs" / "usage.md").read_text()
    for k, what in KEYS:
        assert f"| {k} | {what} |" in usage

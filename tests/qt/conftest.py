import numpy as np
import pytest

from napari_sam.model_choices import UNTRAINED_TAG, ModelChoice
from tiny_sam import EncoderCounter, make_predictor, tiny_model

_MODELS = {}


def _model(seed):
    if seed not in _MODELS:
        _MODELS[seed] = tiny_model(seed)
        _MODELS[seed].counter = EncoderCounter(_MODELS[seed])
    return _MODELS[seed]


@pytest.fixture(autouse=True)
def recovery_dir(tmp_path, monkeypatch):
    """Each test autosaves into its own recovery folder (never the user's cache)."""
    path = tmp_path / "recovery"
    monkeypatch.setenv("NAPARI_SAM_RECOVERY", str(path))
    return path


@pytest.fixture(autouse=True)
def embeddings_dir(tmp_path, monkeypatch):
    """Each test keeps stack embeddings in its own folder (never the user's cache)."""
    path = tmp_path / "embeddings"
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", str(path))
    return path


@pytest.fixture
def choices():
    """Two real tiny SAMs (different random weights), labelled untrained like the GUI's."""
    return [
        ModelChoice(
            "tiny-a",
            f"tiny A: {UNTRAINED_TAG}",
            lambda device: _model(0),
            False,
            make_predictor=make_predictor,
        ),
        ModelChoice(
            "tiny-b",
            f"tiny B: {UNTRAINED_TAG}",
            lambda device: _model(1),
            False,
            make_predictor=make_predictor,
        ),
    ]


@pytest.fixture
def models():
    return _model


def wait_idle(qtbot, widget, timeout=30000):
    qtbot.waitUntil(widget.is_idle, timeout=timeout)


@pytest.fixture
def open_widget(make_napari_viewer, qtbot, choices):
    """``open_widget(image, **layer_kwargs) -> (viewer, widget)``, docked and idle."""

    def make(image=None, show=False, threaded=True, **layer_kwargs):
        from napari_sam._qt.widget import SamWidget

        viewer = make_napari_viewer(show=show)
        if image is not None:
            viewer.add_image(image, **layer_kwargs)
        widget = SamWidget(viewer, models=choices, threaded=threaded)
        viewer.window.add_dock_widget(widget, name="SAM annotator")
        wait_idle(qtbot, widget)
        return viewer, widget

    return make


def masks_of(widget):
    return np.stack(
        [np.asarray(c.data).reshape(c.data.shape[-2:]) for c in widget.candidate_layers]
    ).astype(bool)

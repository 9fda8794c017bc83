"""Propagation in a real napari viewer: the labels layer grows, cancel, undo/redo."""

from __future__ import annotations

import time

import numpy as np
import pytest

from napari_sam.embeddings import EmbeddingStore
from napari_sam.propagate import PropagationState, StopCriteria
from volume_helpers import (  # noqa: F401 (torch_one_thread: autouse fixture)
    ellipsoid_volume,
    tiny_predictor,
    torch_one_thread,
    twin_predictor,
)

pytestmark = pytest.mark.gui

WALK = StopCriteria(min_area=0, min_iou_prev=None, max_area_growth=None, min_contrast=None)


@pytest.fixture
def setup(make_napari_viewer):
    viewer = make_napari_viewer()
    img, gt = ellipsoid_volume(shape=(12, 40, 40), center=(6, 20, 20), radii=(5, 12, 10))
    viewer.add_image(img)
    labels = np.zeros(img.shape, np.uint32)
    labels[6][gt[6]] = 4  # the committed anchor slice
    layer = viewer.add_labels(labels, name="objects")
    pred = tiny_predictor()
    store = EmbeddingStore(img, pred)
    state = PropagationState(img.shape[0], img.shape[1:])
    state.add_anchor(4, 6, gt[6])
    return viewer, layer, store, twin_predictor(pred), state


def test_job_grows_layer_and_undoes(setup, qtbot):
    from napari_sam._qt.propagation import PropagationJob

    viewer, layer, store, decoder, state = setup
    before = layer.data.copy()
    messages = []
    job = PropagationJob(layer, store, decoder, state, obj_id=4, criteria=WALK,
                         on_status=messages.append)  # fmt: skip
    worker = job.start()
    assert worker is not None
    qtbot.waitUntil(lambda: job.finished, timeout=60_000)
    assert job.error is None
    for z in range(12):
        assert np.array_equal(layer.data[z] == 4, state.mask(4, z)), z
    assert np.array_equal(layer.data[6], before[6])  # anchor untouched
    assert messages[-1].startswith("propagation done") and "stopped at" in messages[-1]
    after = layer.data.copy()
    job.undo()
    assert np.array_equal(layer.data, before)
    job.redo()
    assert np.array_equal(layer.data, after)


def test_cancel_leaves_layer_consistent(setup, qtbot):
    from napari_sam._qt.propagation import PropagationJob

    viewer, layer, store, decoder, state = setup
    before = layer.data.copy()
    original = decoder.predict_torch

    def slow_decode(*args, **kwargs):  # leaves the GUI time to handle each step
        time.sleep(0.2)
        return original(*args, **kwargs)

    decoder.predict_torch = slow_decode
    job = PropagationJob(layer, store, decoder, state, obj_id=4, criteria=WALK)
    job._on_step_orig = job._on_step

    def step_then_cancel(step):
        job._on_step_orig(step)
        if len(job.steps) == 3:
            job.cancel()

    job._on_step = step_then_cancel
    job.start()
    qtbot.waitUntil(lambda: job.finished, timeout=60_000)
    assert job.cancelled and job.error is None
    written = {z for z in range(12) if not np.array_equal(layer.data[z], before[z])}
    kept = {s.z for s in job.steps if s.accepted}
    assert written == kept  # the layer shows exactly what the state kept
    assert 3 <= len(kept) < 11
    for z in kept:
        assert np.array_equal(layer.data[z] == 4, state.mask(4, z))
    job.undo()
    assert np.array_equal(layer.data, before)

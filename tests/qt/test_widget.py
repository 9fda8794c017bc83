"""The real dock widget in a real viewer, driven through layers, mouse and keys."""

import threading

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt

from napari_sam.model_choices import UNTRAINED_TAG, ModelChoice
from tiny_sam import blob_image, make_predictor

from .conftest import masks_of, wait_idle


def reference(model, plane, **kw):
    p = make_predictor(model)
    p.set_image(plane)
    return p.predict(multimask_output=True, **kw)


def canvas_point(viewer, data_point, layer):
    """Screen position (QPoint) of a data point of ``layer`` on the 2D canvas."""
    world = np.asarray(layer.data_to_world(data_point))[list(viewer.dims.displayed)]
    canvas = viewer.window._qt_viewer.canvas
    center = np.asarray(viewer.camera.center)[-2:]
    size = canvas.native.size()
    yx = (world - center) * viewer.camera.zoom + np.array([size.height(), size.width()]) / 2
    return QPoint(int(round(yx[1])), int(round(yx[0])))


def click(
    qtbot,
    viewer,
    data_point,
    layer,
    button=Qt.MouseButton.LeftButton,
    modifier=Qt.KeyboardModifier.NoModifier,
):
    native = viewer.window._qt_viewer.canvas.native
    pos = canvas_point(viewer, data_point, layer)
    qtbot.mouseMove(native, pos)
    qtbot.mouseClick(native, button, modifier, pos)


def key(qtbot, viewer, k, modifier=Qt.KeyboardModifier.NoModifier):
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, k, modifier)


def test_point_and_box_by_layer_api_give_the_predictors_masks(open_widget, qtbot, models):
    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    w.points_layer.add([[40, 50]])
    wait_idle(qtbot, w)
    first = masks_of(w)
    np.testing.assert_array_equal(
        first,
        reference(
            models(0), img, point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1])
        )[0],
    )
    w.box_layer.add_rectangles(np.array([[20, 25], [60, 80]]))
    wait_idle(qtbot, w)
    # a point plus a box; the point was added first, so the box is a fresh prediction
    masks, ious, _ = reference(
        models(0),
        img,
        point_coords=np.array([[50.0, 40.0]]),
        point_labels=np.array([1]),
        box=np.array([25.0, 20, 80, 60]),
    )
    np.testing.assert_array_equal(masks_of(w), masks)
    assert not np.array_equal(masks_of(w), first)
    sel = int(np.argmax(ious))
    assert f"IoU {ious[sel]:.2f}" in w.candidate_layers[sel].name
    assert w.candidate_layers[sel].opacity > w.candidate_layers[(sel + 1) % 3].opacity
    order = [viewer.layers.index(c) for c in w.candidate_layers]
    assert order[sel] == max(order)  # drawn above the other candidates
    w.select_candidate((sel + 1) % 3)
    order = [viewer.layers.index(c) for c in w.candidate_layers]
    assert order[(sel + 1) % 3] == max(order)
    # moving the point (a 'changed' data event) predicts from the new prompts, fresh
    w.points_layer.data = np.array([[30.0, 60.0]])
    wait_idle(qtbot, w)
    masks, _, _ = reference(
        models(0),
        img,
        point_coords=np.array([[60.0, 30.0]]),
        point_labels=np.array([1]),
        box=np.array([25.0, 20, 80, 60]),
    )
    np.testing.assert_array_equal(masks_of(w), masks)
    # a second rectangle replaces the first (one box per object)
    w.box_layer.add_rectangles(np.array([[10, 10], [30, 40]]))
    wait_idle(qtbot, w)
    assert len(w.box_layer.data) == 1
    np.testing.assert_array_equal(w.annotator.prompts.box, [10, 10, 30, 40])


def test_mouse_clicks_keys_commit_undo_redo(open_widget, qtbot, models):
    img = blob_image((64, 96))
    viewer, w = open_widget(img, show=True)
    layer = viewer.layers[0]
    click(qtbot, viewer, (40, 50), layer)
    wait_idle(qtbot, w)
    assert len(w.points_layer.data) == 1
    ((r, c),) = w.annotator.prompts.points
    assert abs(r - 40) < 0.6 and abs(c - 50) < 0.6
    click(qtbot, viewer, (60, 95), layer, modifier=Qt.KeyboardModifier.ShiftModifier)
    qtbot.wait(20)
    wait_idle(qtbot, w)
    np.testing.assert_array_equal(w.annotator.prompts.labels, [1, 0])
    assert list(w.points_layer.features["label"]) == ["positive", "negative"]
    click(qtbot, viewer, (30, 30), layer, button=Qt.MouseButton.RightButton)
    qtbot.wait(20)
    wait_idle(qtbot, w)
    np.testing.assert_array_equal(w.annotator.prompts.labels, [1, 0, 0])
    assert w.points_layer.feature_defaults["label"][0] == "positive"  # restored
    # candidates hold the predictor's masks for these prompts (the 2nd and 3rd click
    # refine with the previous candidate's logits, so compare through the annotator)
    ann = w.annotator
    cands = ann.candidates
    np.testing.assert_array_equal(masks_of(w), cands.masks)

    key(qtbot, viewer, Qt.Key.Key_2)
    assert ann.selected == 1 and w.candidate_buttons[1].isChecked()
    expected = cands.masks[1]
    key(qtbot, viewer, Qt.Key.Key_C)
    objects = w.objects_layer
    np.testing.assert_array_equal(objects.data == 1, expected)
    assert len(w.points_layer.data) == 0 and ann.prompts.is_empty
    assert not masks_of(w).any()
    key(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    wait_idle(qtbot, w)
    assert not objects.data.any()
    assert len(w.points_layer.data) == 3  # the object's prompts are back
    assert ann.selected == 1
    key(
        qtbot,
        viewer,
        Qt.Key.Key_Z,
        Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier,
    )
    np.testing.assert_array_equal(objects.data == 1, expected)
    # toggle key: the next point is negative
    key(qtbot, viewer, Qt.Key.Key_T)
    click(qtbot, viewer, (10, 10), layer)
    wait_idle(qtbot, w)
    np.testing.assert_array_equal(ann.prompts.labels, [0])
    key(qtbot, viewer, Qt.Key.Key_C, Qt.KeyboardModifier.ShiftModifier)  # clear
    assert ann.prompts.is_empty and len(w.points_layer.data) == 0
    # with the image layer active, C still commits (not napari's auto-contrast)
    viewer.layers.selection.active = layer
    w.points_layer.add([[40, 50]])
    wait_idle(qtbot, w)
    limits = tuple(layer.contrast_limits)
    key(qtbot, viewer, Qt.Key.Key_C)
    assert (objects.data == 2).any() and tuple(layer.contrast_limits) == limits


def test_stack_slices_embed_once_and_commit_on_the_plane(open_widget, qtbot, models):
    vol = blob_image((4, 48, 64))
    viewer, w = open_widget(vol, scale=(3.0, 0.5, 0.5), translate=(-6.0, 10.0, 20.0))
    counter = models(0).counter
    ann = w.annotator
    assert ann.key == (viewer.dims.current_step[0], None, None)
    viewer.dims.set_current_step(0, 1)
    wait_idle(qtbot, w)
    assert ann.key == (1, None, None)
    w.points_layer.add([[1, 24, 30]])
    wait_idle(qtbot, w)
    np.testing.assert_array_equal(
        masks_of(w),
        reference(
            models(0), vol[1], point_coords=np.array([[30.0, 24.0]]), point_labels=np.array([1])
        )[0],
    )
    # the candidate layers sit on plane 1 in the world
    cand = w.candidate_layers[0]
    np.testing.assert_allclose(
        cand.data_to_world([0, 0, 0]), viewer.layers[0].data_to_world([1, 0, 0])
    )
    viewer.dims.set_current_step(0, 3)
    wait_idle(qtbot, w)
    assert not masks_of(w).any()  # no prompts on plane 3
    runs = counter.count
    viewer.dims.set_current_step(0, 1)
    wait_idle(qtbot, w)
    assert counter.count == runs  # back on plane 1: cached, no encoder run
    assert masks_of(w).any()
    w.commit()
    objects = w.objects_layer.data
    assert objects[1].any() and not objects[[0, 2, 3]].any()
    assert w.objects_layer.scale[0] == 3.0


def test_change_model_recomputes_with_the_new_weights(open_widget, qtbot, models):
    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    w.points_layer.add([[40, 50]])
    wait_idle(qtbot, w)
    w.model_combo.setCurrentIndex(1)  # tiny B
    wait_idle(qtbot, w)
    assert w.annotator.model_name == "tiny-b"
    assert len(w.annotator.prompts.points) == 1  # prompts carried over
    np.testing.assert_array_equal(
        masks_of(w),
        reference(
            models(1), img, point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1])
        )[0],
    )
    assert UNTRAINED_TAG in w.model_combo.currentText()
    # contrast from the layer's contrast limits: a window for the predictors, new embedding
    layer = viewer.layers[0]
    layer.contrast_limits = (150.0, 900.0)
    runs = models(1).counter.count
    w.contrast_combo.setCurrentText("layer contrast limits")
    wait_idle(qtbot, w)
    c = w.annotator.predictor.contrast
    assert (c.mode, c.vmin, c.vmax) == ("window", 150.0, 900.0)
    assert w.annotator.encoder.contrast.vmax == 900.0
    assert models(1).counter.count == runs + 1
    assert len(w.annotator.prompts.points) == 1 and masks_of(w).any()
    w.device_combo.setCurrentText("cpu")
    wait_idle(qtbot, w)
    assert w._model[:2] == ("tiny-b", "cpu") and w.annotator.has_embedding()


def test_rgb_image(open_widget, qtbot, models):
    img = blob_image((40, 50), rgb=True)
    viewer, w = open_widget(img, rgb=True)
    w.points_layer.add([[20, 25]])
    wait_idle(qtbot, w)
    np.testing.assert_array_equal(
        masks_of(w),
        reference(
            models(0), img, point_coords=np.array([[25.0, 20.0]]), point_labels=np.array([1])
        )[0],
    )
    w.commit()
    assert w.objects_layer.data.shape == (40, 50)


def test_bad_inputs_end_in_messages(open_widget, qtbot, tmp_path):
    viewer, w = open_widget(None)
    assert "No image layer" in w.banner_text and w.annotator is None
    viewer.add_image(np.zeros((2, 3, 16, 16)), name="4d")
    wait_idle(qtbot, w)
    assert "4D images are not supported" in w.banner_text and w.annotator is None
    viewer.add_image(blob_image((32, 32)), name="ok")
    w.image_combo.setCurrentIndex(w.image_combo.findText("ok"))
    wait_idle(qtbot, w)
    assert w.annotator is not None and not w.banner_text
    w.points_layer.add([[100, 5]])  # outside the image
    wait_idle(qtbot, w)
    assert "outside the image" in w.banner_text
    assert len(w.points_layer.data) == 0  # the bad point is taken back
    w.commit()
    assert "nothing to commit" in w.status_text
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    w.add_model_file(bad)
    wait_idle(qtbot, w)
    assert "Could not load the model" in w.banner_text and "broken.pth" in w.banner_text


class Gated:
    """The real predictor, whose encoder waits for a gate (to act mid-embedding)."""

    gate = threading.Event()

    def __init__(self, predictor):
        self._p = predictor

    def set_image(self, image, key=None):
        assert self.gate.wait(30)
        self._p.set_image(image, key)

    def __getattr__(self, name):
        return getattr(self._p, name)


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_image_removed_or_replaced_while_embedding(make_napari_viewer, qtbot, models, how):
    from napari_sam._qt.widget import SamWidget

    Gated.gate.clear()
    gated = ModelChoice(
        "gated",
        f"gated: {UNTRAINED_TAG}",
        lambda d: models(0),
        False,
        make_predictor=lambda m, c: Gated(make_predictor(m, c)),
    )
    viewer = make_napari_viewer()
    layer = viewer.add_image(blob_image((48, 64)), name="cells")
    w = SamWidget(viewer, models=[gated])
    viewer.window.add_dock_widget(w)
    qtbot.waitUntil(lambda: w.annotator is not None, timeout=10000)
    assert "embedding" in w.status_text and not w.is_idle()
    if how == "removed":
        viewer.layers.remove(layer)
        assert "was removed" in w.banner_text
    else:
        new = blob_image((48, 64), centers=((10, 10, 5),), seed=3)
        layer.data = new
        assert "image data changed" in w.banner_text
    Gated.gate.set()
    wait_idle(qtbot, w)
    if how == "removed":
        assert w.annotator is None and w.points_layer is None
    else:
        ann = w.annotator
        assert ann.image is new and ann.has_embedding()
        w.points_layer.add([[10, 10]])
        wait_idle(qtbot, w)
        np.testing.assert_array_equal(
            masks_of(w),
            reference(
                models(0), new, point_coords=np.array([[10.0, 10.0]]), point_labels=np.array([1])
            )[0],
        )


def test_scrolling_skips_stale_slices_and_commit_waits_for_the_decoder(open_widget, qtbot):
    vol = blob_image((6, 48, 64))
    viewer, w = open_widget(vol)
    ann = w.annotator
    first = ann.key[0]
    zs = [z for z in range(6) if z != first][:4]
    start = ann.encoder_runs
    for z in zs:  # fast scrolling: no event loop between the steps
        viewer.dims.set_current_step(0, z)
    wait_idle(qtbot, w)
    assert ann.key == (zs[-1], None, None) and ann.has_embedding()
    assert not any(ann.has_embedding((z, None, None)) for z in zs[1:3])
    assert ann.encoder_runs - start == 2  # the first step (already running) and the last
    viewer.dims.set_current_step(0, 4)
    wait_idle(qtbot, w)
    w.points_layer.add([[4, 24, 30]])
    w.commit()  # before the decoder has delivered
    assert "as soon as" in w.status_text and not w.objects_layer.data[4].any()
    wait_idle(qtbot, w)
    assert w.objects_layer.data[4].any() and ann.prompts.is_empty


def test_cheap_decoder_calls_run_inline_after_two_measured_in_the_worker(
    open_widget, qtbot, models, monkeypatch
):
    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    threads = []
    run = w.annotator.run

    def spy(req):
        threads.append(threading.current_thread() is threading.main_thread())
        return run(req)

    monkeypatch.setattr(w.annotator, "run", spy)
    for i in range(4):
        w.points_layer.add([[20 + 8 * i, 30 + 10 * i]])
        wait_idle(qtbot, w)
    # no measurement yet for the first two calls: worker; then the tiny decoder's measured
    # cost (a few ms of CPU) is under the budget: Qt thread, same masks as the predictor
    assert threads == [False, False, True, True]
    assert len(w._decode_ms) == 4 and max(w._decode_ms) < w.inline_decode_ms
    assert w.annotator.up_to_date
    ann = w.annotator
    masks, _, _ = reference(
        models(0),
        img,
        point_coords=ann.prompts.points[:, ::-1].astype(float),
        point_labels=ann.prompts.labels,
        mask_input=ann.prompts.refine.logits,
    )
    np.testing.assert_array_equal(masks_of(w), masks)
    # a budget of 0 (or a decoder slower than the budget) keeps every call in the worker
    threads.clear()
    w.inline_decode_ms = 0.0
    w.points_layer.add([[50, 80]])
    wait_idle(qtbot, w)
    assert threads == [False]


@pytest.mark.parametrize(
    "shape, layer_kw, key",
    [
        ((96, 128), {"scale": (0.5, 2.0), "translate": (10.0, -5.0), "rotate": 30}, ()),
        ((3, 96, 128), {"scale": (3.0, 0.5, 2.0), "translate": (-6.0, 10.0, 20.0)}, (1,)),
    ],
    ids=["2d-rotated", "stack"],
)
def test_capped_candidates_overlay_the_image_and_commit_full_resolution(
    open_widget, qtbot, monkeypatch, tmp_path, shape, layer_kw, key
):
    """display_max_side = 32 on 96 x 128 planes: candidates are 24 x 32 (4 x 4 blocks),
    placed on the image in the world; the commit writes what an uncapped widget writes."""
    img = blob_image(shape)
    results = []
    for cap in ("32", "0"):
        monkeypatch.setenv("NAPARI_SAM_DISPLAY_MAX_SIDE", cap)
        monkeypatch.setenv("NAPARI_SAM_RECOVERY", str(tmp_path / f"recovery{cap}"))
        viewer, w = open_widget(img, **layer_kw)
        image = viewer.layers[0]
        if key:
            viewer.dims.set_current_step(0, key[0])
            wait_idle(qtbot, w)
        ann = w.annotator
        w.points_layer.add([[*key, 40, 50]])
        wait_idle(qtbot, w)
        w.points_layer.add([[*key, 60, 95]])  # refines with the selected candidate
        wait_idle(qtbot, w)
        cands = ann.candidates
        assert ann.up_to_date and cands.prompts.refine is not None
        np.testing.assert_array_equal(masks_of(w), cands.masks)
        if cap == "32":
            assert w.display_max_side == 32 and cands.masks.shape == (3, 24, 32)
            for layer in w.candidate_layers:
                assert layer.data.shape == (*[1] * len(key), 24, 32)
                # display pixel (i, j) sits on the centre of image pixels 4i..4i+3, 4j..4j+3
                for i, j in [(0, 0), (5, 17), (23, 31)]:
                    np.testing.assert_allclose(
                        layer.data_to_world([*[0] * len(key), i, j]),
                        image.data_to_world([*key, 4 * i + 1.5, 4 * j + 1.5]),
                        atol=1e-9,
                    )
                # ... and its outer edge on the image's outer edge
                np.testing.assert_allclose(
                    layer.data_to_world([*[0] * len(key), -0.5, -0.5]),
                    image.data_to_world([*key, -0.5, -0.5]),
                    atol=1e-9,
                )
                np.testing.assert_allclose(
                    layer.data_to_world([*[0] * len(key), 23.5, 31.5]),
                    image.data_to_world([*key, 95.5, 127.5]),
                    atol=1e-9,
                )
        else:
            assert cands.masks.shape == (3, 96, 128)
        before = np.array(w.objects_layer.data)
        w.commit()
        if cap == "32":
            # the full-resolution mask is computed on the torch thread: nothing is written
            # before the worker delivers
            assert not w.is_idle() and np.array_equal(w.objects_layer.data, before)
        wait_idle(qtbot, w)
        labels = np.array(w.objects_layer.data)
        assert labels.shape == shape and labels.any(), (cap, w.status_text)
        results.append(labels)
    np.testing.assert_array_equal(results[0], results[1])


def test_flips_setting_sets_the_predictors_test_time_views(open_widget, qtbot, models):
    """Flips are off by default; "4 views" gives the masks of a tta=4 predictor (prompts
    kept), on 2D images and stacks; propagation decodes one view."""
    from napari_sam.predictor import SamPredictor

    img = blob_image((64, 96))
    model = models(0)
    viewer, w = open_widget(img)
    assert w.flips_combo.currentText() == "off"
    assert w.annotator.predictor.tta == 1 and w.annotator.encoder.tta == 1
    w.points_layer.add([[40, 50]])
    wait_idle(qtbot, w)
    plain = masks_of(w)
    w.flips_combo.setCurrentText("4 views (slice + 3 flips)")
    wait_idle(qtbot, w)
    assert w.annotator.predictor.tta == 4 and w.annotator.encoder.tta == 4
    assert len(w.annotator.prompts.points) == 1  # prompts carried over
    p = SamPredictor(model, tta=4)
    p.set_image(img)
    want = p.predict(np.array([[50.0, 40.0]]), np.array([1]))[0]
    np.testing.assert_array_equal(masks_of(w), want)
    assert not np.array_equal(plain, want)  # the views changed the masks

    vol = blob_image((3, 48, 64))
    viewer2, w2 = open_widget(vol)
    w2.flips_combo.setCurrentText("4 views (slice + 3 flips)")
    wait_idle(qtbot, w2)
    assert w2.annotator.predictor.tta == 4 and w2.annotator.encoder.tta == 4
    assert w2._decoder().tta == 1  # propagation decodes view 0 of the stored views


def test_clicked_parts_setting(open_widget, qtbot, models):
    """On by default: the candidates are the predictor's clicked_parts_only masks;
    unticking shows the whole masks for the same click."""
    from napari_sam.predictor import SamPredictor

    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    assert w.parts_check.isChecked() and w.annotator.clicked_parts_only
    w.model_combo.setCurrentIndex(w.model_combo.findData("tiny-b"))
    wait_idle(qtbot, w)
    w.points_layer.add([[10, 80]])  # a click whose third candidate has a stray part
    wait_idle(qtbot, w)
    p = SamPredictor(models(1))
    p.set_image(img)
    args = (np.array([[80.0, 10.0]]), np.array([1]))
    kept = p.predict(*args, clicked_parts_only=True)[0]
    whole = p.predict(*args)[0]
    assert not np.array_equal(kept, whole)  # the untrained model scatters parts
    np.testing.assert_array_equal(masks_of(w), kept)
    w.parts_check.setChecked(False)
    wait_idle(qtbot, w)
    assert not w.annotator.clicked_parts_only
    np.testing.assert_array_equal(masks_of(w), whole)

import numpy as np

from tiny_sam import blob_image, make_predictor

from .conftest import masks_of, wait_idle


def test_open_with_image_sets_up_and_point_updates_candidates(open_widget, qtbot, models):
    img = blob_image((64, 96))
    viewer, w = open_widget(img)
    assert w.annotator is not None and w.annotator.has_embedding()
    assert w.points_layer.mode == "add"
    assert "ready" in w.status_text
    w.points_layer.add([[40, 50]])
    wait_idle(qtbot, w)
    ref = make_predictor(models(0))
    ref.set_image(img)
    masks, ious, _ = ref.predict(np.array([[50.0, 40.0]]), np.array([1]))
    np.testing.assert_array_equal(masks_of(w), masks)

"""interactive_miou: the evaluation protocol through a predictor-like object."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_sam.train.quality import interactive_miou
from napari_sam.train.synthetic import make_image


class OracleFirstClickShrinks:
    """Knows the labels: boxes give the exact object; a single click gives the object
    eroded by 2 px; any later click (with a mask prompt) gives the exact object again."""

    def __init__(self, labels):
        self.labels = labels
        self.calls = []

    def set_image(self, image):
        self.image = image

    def _object_at(self, x, y):
        return self.labels == self.labels[int(y), int(x)]

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output=True,
    ):
        self.calls.append((point_coords, point_labels, box, mask_input, multimask_output))
        if box is not None:
            x0, y0, x1, y1 = box.astype(int)
            ids, n = np.unique(self.labels[y0 : y1 + 1, x0 : x1 + 1], return_counts=True)
            n[ids == 0] = 0
            m = self.labels == ids[np.argmax(n)]
        else:
            m = self._object_at(*point_coords[0])
            if mask_input is None:
                m = ndi.binary_erosion(m, iterations=2)
        k = 3 if multimask_output else 1
        return np.stack([m] * k), np.linspace(0.9, 0.5, k), np.zeros((k, 256, 256), np.float32)


def test_protocol_with_an_oracle():
    _, lab = make_image(0, (128, 128), "nuclei", scale=1.5)
    oracle = OracleFirstClickShrinks(lab)
    r = interactive_miou(oracle, [lab.astype(np.uint8)], [lab], n_clicks=2, max_objects=5)
    assert r["objects"] == 5
    assert r["box"] == pytest.approx(1.0) and r["box3"] == pytest.approx(1.0)
    assert 0.3 < r["point"] < 0.95  # eroded masks
    assert r["click1"] == pytest.approx(1.0) and r["click2"] == pytest.approx(1.0)
    # the first click is positive and inside its object; the correction is positive (FN)
    # and comes with the previous low-res logits
    clicks = [c for c in oracle.calls if c[0] is not None]
    first, second = clicks[0], clicks[1]
    assert first[1].tolist() == [1] and first[3] is None
    assert second[1].tolist() == [1, 1] and second[3].shape == (1, 256, 256)
    assert second[4] is False


def test_errors_and_empty():
    _, lab = make_image(1, (64, 64), "nuclei")
    with pytest.raises(ValueError, match="label images"):
        interactive_miou(None, [lab], [], n_clicks=1)
    with pytest.raises(ValueError, match="do not match"):
        interactive_miou(OracleFirstClickShrinks(lab), [lab[:10]], [lab], n_clicks=1)
    r = interactive_miou(OracleFirstClickShrinks(lab), [lab], [np.zeros_like(lab)], n_clicks=1)
    assert r["objects"] == 0 and np.isnan(r["box"])

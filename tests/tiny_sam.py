"""A real, tiny, randomly initialised SAM and its predictor for annotator/widget tests.

The model is the project's own (``napari_sam.model.build`` config ``test_vit``: 128 px
input, 2 ViT blocks; real prompt encoder and mask decoder structure), seeded so that
results are reproducible; the predictor is ``napari_sam.predictor.SamPredictor``, made the
way the GUI makes it.
"""

from __future__ import annotations

import numpy as np

from napari_sam.model_choices import ContrastSetting, _default_predictor, build_untrained


def tiny_model(seed: int = 0):
    return build_untrained("test_vit", "cpu", seed=seed)


def make_predictor(model, contrast=None):
    return _default_predictor(model, contrast or ContrastSetting())


class EncoderCounter:
    """Counts forward passes of a model's image encoder (a real hook, not a mock)."""

    def __init__(self, model):
        self.count = 0
        model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def blob_image(shape=(96, 128), centers=((40, 50, 18), (60, 95, 12)), rgb=False, seed=0):
    """Bright discs on a dark noisy background; ``centers``: (row, col, radius)."""
    rng = np.random.default_rng(seed)
    rr, cc = np.mgrid[: shape[-2], : shape[-1]]
    img = 200.0 + 20 * rng.standard_normal(shape[-2:])
    for r, c, rad in centers:
        img[(rr - r) ** 2 + (cc - c) ** 2 <= rad**2] += 2000
    img = img.astype(np.uint16)
    if len(shape) == 3:
        img = np.stack([np.roll(img, 3 * z, axis=1) for z in range(shape[0])])
    if rgb:
        img = np.stack([img, img // 2, img // 3], axis=-1)
    return img

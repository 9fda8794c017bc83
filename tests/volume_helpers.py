"""Shared pieces for the volume tests (embedding store, propagation).

- ``tiny_predictor()``: a small random-weight SAM behind the predictor contract
  (``set_image``, ``get_embedding``/``set_embedding``, ``predict``, ``predict_torch``,
  ``transform``): ``napari_sam.SamPredictor`` on a tiny config of the project's SAM, or
  (``kind="official"``) segment-anything's classes with a thin adapter.
- ``count_encoder_runs(model)``: counts real forward calls of the image encoder.
- ``ellipsoid_volume`` / ``tube_volume``: synthetic stacks with known extent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch


@dataclass
class _Embedding:
    features: torch.Tensor
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def _official_tiny_predictor(img_size: int = 128, seed: int = 0):
    from reference.official import import_official

    sa = import_official()
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    dim, patch = 32, 16
    emb = img_size // patch
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=32,
            depth=2,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=dim,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=4,
            global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(emb, emb),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    ).eval()

    class Adapter(sa.SamPredictor):
        """Official predictor + the project's embedding contract and any-dtype gray input."""

        def set_image(self, image, key=None):
            image = np.asarray(image, dtype=np.float32)
            lo, hi = np.nanpercentile(image, (1, 99)) if image.size else (0, 1)
            scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1) * 255
            scaled = np.nan_to_num(scaled).astype(np.uint8)
            if scaled.ndim == 2:
                scaled = np.repeat(scaled[..., None], 3, axis=-1)
            super().set_image(scaled)

        def get_embedding(self):
            if not self.is_image_set:
                raise RuntimeError("call set_image() first")
            return _Embedding(self.features, tuple(self.input_size), tuple(self.original_size))

        def set_embedding(self, embedding):
            self.reset_image()
            self.features = embedding.features.to(self.device)
            self.input_size = tuple(embedding.input_size)
            self.original_size = tuple(embedding.original_size)
            self.is_image_set = True

    return Adapter(model)


#: A small config of the project's own SAM (CNN encoder + SAM's prompt encoder/decoder).
TINY_NSAM = {
    "img_size": 128,
    "widths": [8, 8, 16, 16, 32],
    "depths": [0, 1, 1, 1, 1],
    "embed_dim": 32,
    "mask_in_chans": 4,
    "decoder_num_heads": 2,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 32,
}


def tiny_predictor(seed: int = 0, kind: str = "ours"):
    """A fresh predictor around a small random-weight SAM, without its own cache.

    kind="ours": ``napari_sam.SamPredictor`` on the project's small SAM architecture;
    kind="official": segment-anything's predictor and ViT behind the same contract.
    ``cache_bytes=0`` so that every ``set_image`` is a real encoder run (the embedding store
    is the cache under test).
    """
    if kind == "official":
        return _official_tiny_predictor(seed=seed)
    from napari_sam.model.small_encoder import build_nsam
    from napari_sam.predictor import SamPredictor

    torch.manual_seed(seed)
    return SamPredictor(build_nsam(TINY_NSAM), cache_bytes=0)


def twin_predictor(predictor):
    """A second predictor sharing ``predictor``'s model (for decode/encode overlap)."""
    if hasattr(predictor, "cache"):
        return type(predictor)(predictor.model, cache_bytes=0, tta=predictor.tta)
    return type(predictor)(predictor.model)


class EncoderCounter:
    """Counts forward calls of ``model.image_encoder`` (a real hook, not a mock)."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1

    def remove(self):
        self._handle.remove()


def ellipsoid_volume(shape=(24, 64, 64), center=(12, 32, 30), radii=(7, 14, 11), seed=0):
    """Bright textured ellipsoid on a noisy background: (image float32, mask bool)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    r = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), center, radii, strict=True))
    mask = r <= 1.0
    image = 0.2 + 0.6 * mask + 0.05 * rng.standard_normal(shape)
    return image.astype(np.float32), mask


def tube_volume(shape=(24, 64, 64), radius=6.0, seed=0):
    """A tube whose centre drifts along z with varying intensity: (image, mask)."""
    rng = np.random.default_rng(seed)
    z, h, w = shape
    image = np.empty(shape, np.float32)
    mask = np.zeros(shape, bool)
    yy, xx = np.mgrid[:h, :w]
    for k in range(z):
        cy = h / 2 + 10 * np.sin(k / z * np.pi)
        cx = w / 3 + k * (w / 3) / z
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        mask[k] = m
        image[k] = 0.15 + (0.4 + 0.4 * k / z) * m + 0.05 * rng.standard_normal((h, w))
    return image, mask


@pytest.fixture(scope="module", autouse=True)
def torch_one_thread():
    """Tiny models run faster on one torch thread, and much faster on a shared machine
    (idle intra-op threads spin while waiting for descheduled ones). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

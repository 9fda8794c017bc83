"""A real, tiny, randomly initialised SAM and a predictor for annotator/widget tests.

Until the project's own model (``napari_sam.build_sam``) and predictor
(``napari_sam.SamPredictor``) are available, the official segment-anything 1.0 modules are
used with a tiny image encoder (the prompt encoder and mask decoder keep SAM's real sizes,
so decoder timings are realistic), wrapped in an adapter with the project's predictor
contract (``set_image``, ``get_embedding``/``set_embedding``, ``predict``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _ours_available() -> bool:
    try:
        from napari_sam.model.build import build_sam  # noqa: F401
        from napari_sam.predictor import SamPredictor  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_official_sam(seed: int = 0, img_size: int = 256):
    """Official ``Sam`` with a 1-block, 32-wide ViT encoder; real-size decoder. eval()."""
    from functools import partial

    import torch

    from reference.official import import_official

    sa = import_official()
    m = sa.modeling
    torch.manual_seed(seed)
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=1,
            embed_dim=32,
            img_size=img_size,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[0],
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(img_size // 16, img_size // 16),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


@dataclass(eq=False)
class OfficialEmbedding:
    features: object  # torch (1, 256, h, w)
    original_size: tuple
    input_size: tuple


def to_uint8_rgb(image, contrast=None) -> np.ndarray:
    """Stretch any 2D gray / (H, W, 3) image to uint8 RGB (test stand-in for preprocess).

    ``contrast``: a ``ContrastSetting``; default: percentiles 0.5-99.5.
    """
    img = np.asarray(image, dtype=np.float64)
    mode = getattr(contrast, "mode", "auto")
    if mode == "window":
        lo, hi = contrast.vmin, contrast.vmax
    elif mode == "minmax":
        lo, hi = np.nanmin(img), np.nanmax(img)
    else:
        lo, hi = np.nanpercentile(img, [0.5, 99.5])
    img = np.clip((np.nan_to_num(img, nan=lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    img = (img * 255).round().astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3]


class OfficialAdapter:
    """The official ``SamPredictor`` behind the project's predictor contract."""

    def __init__(self, model, contrast=None):
        from reference.official import import_official

        self._p = import_official().SamPredictor(model)
        self.model = model
        self.contrast = contrast

    def set_image(self, image, key=None):
        self._p.set_image(to_uint8_rgb(image, self.contrast))

    def get_embedding(self):
        p = self._p
        return OfficialEmbedding(p.features, p.original_size, p.input_size)

    def set_embedding(self, emb):
        p = self._p
        p.features, p.original_size, p.input_size = emb.features, emb.original_size, emb.input_size
        p.is_image_set = True

    def reset_image(self):
        self._p.reset_image()

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output=True,
        return_logits=False,
    ):
        return self._p.predict(
            point_coords, point_labels, box, mask_input, multimask_output, return_logits
        )


class EncoderCounter:
    """Counts forward passes of a model's image encoder (a real hook, not a mock)."""

    def __init__(self, model):
        self.count = 0
        model.image_encoder.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def tiny_model(seed: int = 0):
    return tiny_official_sam(seed)


def make_predictor(model, contrast=None):
    return OfficialAdapter(model, contrast)


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

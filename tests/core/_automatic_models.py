"""A tiny model with the official segment-anything classes (random weights) for fast tests."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def tiny_official_sam(img_size: int = 256, dim: int = 32, seed: int = 0):
    """Official ``Sam`` with a 1-block ViT and a ``dim``-channel two-way decoder.

    The decoder has SAM's layout (2 transformer layers, 3 multimask outputs, upscaling x4)
    at a small width; the image embedding is (1, dim, img_size/16, img_size/16).
    """
    import torch

    from reference.official import import_official

    sa = import_official()  # noqa: F841 - also makes segment_anything importable
    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(seed)
    grid = img_size // 16
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=1,
            embed_dim=32,
            img_size=img_size,
            mlp_ratio=2,
            num_heads=2,
            patch_size=16,
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=False,
            window_size=0,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=4),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    ).eval()
    return sam, sa


def project_predictor(config: str = "test_vit", seed: int = 0):
    """The project's SamPredictor on a tiny random-init model (128 px input, 8 x 8 embedding)."""
    import torch

    from napari_sam.model.build import build_sam
    from napari_sam.predictor import SamPredictor

    torch.manual_seed(seed)
    return SamPredictor(build_sam(config).eval())


def nsam_predictor(seed: int = 0):
    """SamPredictor on a tiny random-init nsam model (CNN encoder, prompts rendered into the
    dense prompt, 128 px input, 16 x 16 embedding)."""
    import torch

    from napari_sam.model.small_encoder import build_nsam
    from napari_sam.predictor import SamPredictor

    torch.manual_seed(seed)
    cfg = {
        "img_size": 128,
        "widths": [8, 8, 16, 16, 32],
        "depths": [0, 1, 1, 1, 1],
        "embed_dim": 32,
        "decoder_mlp_dim": 64,
        "iou_head_hidden_dim": 32,
    }
    return SamPredictor(build_nsam(cfg).eval())

"""A tiny model with the official segment-anything classes (random weights) for fast tests."""

from __future__ import annotations

from functools import partial


def tiny_official_sam(img_size: int = 256, dim: int = 32, seed: int = 0):
    """Official ``Sam`` with a 1-block ViT and a ``dim``-channel two-way decoder.

    The decoder has SAM's layout (2 transformer layers, 3 multimask outputs, upscaling x4)
    at a small width; the image embedding is (1, dim, img_size/16, img_size/16).
    """
    import torch

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

"""Build SAM models by name, or from any image encoder.

``build_sam_from_parts(image_encoder, image_embedding_size=None, ...)`` wraps an image
encoder (any module with ``img_size`` mapping (B, 3, S, S) -> (B, 256, h, w)) with SAM's
prompt encoder and mask decoder. By default ``input_image_size = (S, S)`` and
``image_embedding_size = (S // 16, S // 16)``; the mask prompt is ``4h x 4w``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike

from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import PIXEL_MEAN, PIXEL_STD, Sam
from .transformer import TwoWayTransformer


def build_sam_from_parts(
    image_encoder: nn.Module,
    *,
    embed_dim: int = 256,
    image_embedding_size: tuple[int, int] | None = None,
    input_image_size: tuple[int, int] | None = None,
    mask_in_chans: int = 16,
    decoder_depth: int = 2,
    decoder_num_heads: int = 8,
    decoder_mlp_dim: int = 2048,
    iou_head_depth: int = 3,
    iou_head_hidden_dim: int = 256,
    num_multimask_outputs: int = 3,
    pixel_mean: Sequence[float] = PIXEL_MEAN,
    pixel_std: Sequence[float] = PIXEL_STD,
) -> Sam:
    """Wrap ``image_encoder`` with a freshly initialised prompt encoder and mask decoder.

    Args:
        image_encoder: module with ``img_size`` (S); (B, 3, S, S) -> (B, embed_dim, h, w).
        embed_dim: prompt/decoder channels (256 for every official model).
        image_embedding_size: (h, w) of the encoder output; default (S // 16, S // 16).
        input_image_size: (H, W) of the padded model input; default (S, S).
        mask_in_chans, decoder_*, iou_head_*, num_multimask_outputs: decoder sizes
            (defaults are the official ones).
        pixel_mean, pixel_std: RGB normalisation, 0-255 scale.

    Returns:
        ``Sam`` in eval mode.
    """
    s = int(image_encoder.img_size)
    if input_image_size is None:
        input_image_size = (s, s)
    if image_embedding_size is None:
        image_embedding_size = (s // 16, s // 16)
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=tuple(image_embedding_size),
        input_image_size=tuple(input_image_size),
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=embed_dim,
        transformer=TwoWayTransformer(
            depth=decoder_depth,
            embedding_dim=embed_dim,
            num_heads=decoder_num_heads,
            mlp_dim=decoder_mlp_dim,
        ),
        num_multimask_outputs=num_multimask_outputs,
        iou_head_depth=iou_head_depth,
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    sam = Sam(image_encoder, prompt_encoder, mask_decoder, pixel_mean, pixel_std)
    return sam.eval()


def load_state_dict_into(model: nn.Module, checkpoint: str | PathLike | Mapping) -> nn.Module:
    """Load a checkpoint (path or state_dict) into ``model`` with ``strict=True``."""
    import torch

    if isinstance(checkpoint, Mapping):
        state_dict = checkpoint
    else:
        state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model.load_state_dict(state_dict, strict=True)
    return model

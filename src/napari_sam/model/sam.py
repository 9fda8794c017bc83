"""The SAM model: image encoder + prompt encoder + mask decoder.

The parts are passed in (see ``build.py`` for the named configurations). The image encoder
runs once per image; the prompt encoder and decoder are cheap and run per prompt. Inputs to
the image encoder are RGB images resized so that the longest side is ``img_size`` (done by
the predictor), normalised with ``pixel_mean``/``pixel_std`` and zero-padded at the bottom
and right to ``img_size x img_size`` (``preprocess``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)  # ImageNet mean, 0-255 scale, RGB
PIXEL_STD = (58.395, 57.12, 57.375)


class Sam(nn.Module):
    """Segment Anything.

    Args:
        image_encoder: module mapping (B, 3, S, S) -> (B, C, h, w); must have ``img_size`` = S.
        prompt_encoder: a ``PromptEncoder``.
        mask_decoder: a ``MaskDecoder``.
        pixel_mean, pixel_std: per-channel RGB normalisation (0-255 scale).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        if not hasattr(image_encoder, "img_size"):
            raise TypeError("image_encoder must have an `img_size` attribute (input side length)")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # Not persistent: the official checkpoints do not store them.
        self.register_buffer(
            "pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(-1, 1, 1), False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(-1, 1, 1), False
        )

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction for a list of images with their prompts.

        Args:
            batched_input: one dict per image with
                ``image``: (3, H, W) RGB tensor, 0-255, already resized (longest side
                ``img_size``); ``original_size``: (H0, W0) before resizing; optional
                ``point_coords`` (B, N, 2) (x, y) and ``point_labels`` (B, N) in the resized
                frame; optional ``boxes`` (B, 4) XYXY; optional ``mask_inputs``
                (B, 1, 256, 256) logits.
            multimask_output: 3 candidate masks per prompt if True, else 1.

        Returns:
            One dict per image: ``masks`` (B, M, H0, W0) bool, ``iou_predictions`` (B, M),
            ``low_res_logits`` (B, M, 256, 256).
        """
        images = torch.stack([self.preprocess(rec["image"]) for rec in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        image_pe = self.prompt_encoder.get_dense_pe()
        outputs = []
        for rec, emb in zip(batched_input, embeddings, strict=True):
            points = None
            if rec.get("point_coords") is not None:
                points = (rec["point_coords"], rec["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=rec.get("boxes"), masks=rec.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=emb.unsqueeze(0),
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res, input_size=rec["image"].shape[-2:], original_size=rec["original_size"]
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Upscale decoder logits to the model input, crop the padding, resize to the original.

        Args:
            masks: (B, M, h', w') logits (256 x 256 for SAM).
            input_size: (H, W) of the resized image before padding.
            original_size: (H0, W0) of the image before resizing.

        Returns:
            (B, M, H0, W0) logits (bilinear, ``align_corners=False``).
        """
        s = self.image_encoder.img_size
        masks = F.interpolate(masks, (s, s), mode="bilinear", align_corners=False)
        masks = masks[..., : int(input_size[0]), : int(input_size[1])]
        size = (int(original_size[0]), int(original_size[1]))
        return F.interpolate(masks, size, mode="bilinear", align_corners=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise pixels and zero-pad bottom/right to a square ``img_size`` input.

        ``x``: (3, H, W) or (B, 3, H, W), RGB 0-255, with H, W <= ``img_size``.
        """
        s = self.image_encoder.img_size
        h, w = x.shape[-2:]
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise ValueError(
                f"expected an RGB image (3, H, W) or (B, 3, H, W), got {tuple(x.shape)}"
            )
        if h > s or w > s:
            raise ValueError(
                f"image {h}x{w} is larger than the model input {s}x{s}; resize it so that its "
                "longest side is img_size first (the predictor does this)"
            )
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, s - w, 0, s - h))

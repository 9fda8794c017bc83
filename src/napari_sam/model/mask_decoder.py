"""SAM's mask decoder: image embedding + prompt embeddings -> mask logits and IoU scores.

Learned output tokens (one IoU token, ``num_multimask_outputs + 1`` mask tokens) are
prepended to the prompt tokens and run through the two-way transformer together with the
image embedding (plus the dense prompt embedding). The image tokens are then upscaled 4x
by two transposed convolutions; each mask token goes through its own hypernetwork MLP to a
``C/8`` vector whose dot product with every upscaled pixel gives that mask's logits. The IoU
token goes through an MLP head predicting one quality score per mask.

Mask token 0 is the single-mask output (used for unambiguous prompts); tokens 1..3 are the
three "multimask" candidates (whole / part / subpart for ambiguous prompts).

Shapes: image embedding ``1 x C x h x w`` (or ``B x C x h x w``), prompts ``B x N x C``,
masks ``B x M x 4h x 4w`` with M = 3 (multimask) or 1, IoU ``B x M``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP, LayerNorm2d


class MaskDecoder(nn.Module):
    """Predict masks from an image embedding and prompt embeddings.

    Args:
        transformer_dim: channels C of the transformer (256 for SAM).
        transformer: a ``TwoWayTransformer`` (or a module with its call signature).
        num_multimask_outputs: number of candidate masks for ambiguous prompts (3).
        activation: activation in the upscaling path.
        iou_head_depth: layers of the IoU-prediction MLP.
        iou_head_hidden_dim: hidden width of the IoU-prediction MLP.
        hires_chans: 0 (SAM). N > 0: the image embedding carries ``16 N`` more channels
            after the first ``transformer_dim``: stride-2 image features folded 4 x 4 into
            the embedding grid (``SmallEncoder(hires_chans=N)``); ``hires_proj`` (its last
            layer zero-initialised) maps them to the up-scaled features, which they are
            added to (an HQ-SAM-style skip; not in SAM's checkpoints).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        hires_chans: int = 0,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)

        c = transformer_dim
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),  # h -> 2h
            LayerNorm2d(c // 4),
            activation(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),  # 2h -> 4h
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            c, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )
        self.hires_chans = int(hires_chans)
        if self.hires_chans:
            self.hires_proj = nn.Sequential(
                nn.Conv2d(self.hires_chans, c // 8, 3, padding=1),
                activation(),
                nn.Conv2d(c // 8, c // 8, 1),
            )
            nn.init.zeros_(self.hires_proj[2].weight)
            nn.init.zeros_(self.hires_proj[2].bias)

    def hires_features(self, image_embeddings: torch.Tensor):
        """``(embedding, skip)``: the first ``transformer_dim`` channels, and the
        high-resolution term added to the up-scaled features ((B, C/8, 4h, 4w); None
        without ``hires_chans``)."""
        if not self.hires_chans:
            return image_embeddings, None
        c = self.transformer_dim
        hi = F.pixel_shuffle(image_embeddings[:, c:], 4)
        return image_embeddings[:, :c], self.hires_proj(hi)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks.

        Args:
            image_embeddings: (1, C, h, w) shared by all B prompts, or (B, C, h, w).
            image_pe: (1, C, h, w) positional encoding (``PromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: (B, N, C) point/box tokens (N may be 0).
            dense_prompt_embeddings: (B, C, h, w) mask-prompt embedding.
            multimask_output: True -> the 3 candidate masks, False -> the single mask.

        Returns:
            masks: (B, M, 4h, 4w) logits, M = 3 or 1.
            iou_pred: (B, M) predicted IoU of each mask.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sel = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sel], iou_pred[:, sel]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks (B, T, 4h, 4w) and IoU scores (B, T)."""
        bs = sparse_prompt_embeddings.shape[0]
        image_embeddings, skip = self.hires_features(image_embeddings)
        if image_embeddings.shape[0] not in (1, bs):
            raise ValueError(
                f"image_embeddings batch ({image_embeddings.shape[0]}) must be 1 or match the "
                f"prompt batch ({bs})"
            )
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # T+1 x C
        out_tokens = out_tokens.unsqueeze(0).expand(bs, -1, -1).to(sparse_prompt_embeddings.dtype)
        tokens = torch.cat([out_tokens, sparse_prompt_embeddings], dim=1)  # B x (1+T+N) x C

        src = image_embeddings.expand(bs, -1, -1, -1) + dense_prompt_embeddings  # B x C x h x w
        pos_src = image_pe.expand(bs, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]  # B x C
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]  # B x T x C

        src = src.transpose(1, 2).reshape(b, c, h, w)
        upscaled = self.output_upscaling(src)  # B x C/8 x 4h x 4w
        if skip is not None:
            upscaled = upscaled + skip
        hyper_in = torch.stack(
            [
                mlp(mask_tokens_out[:, i, :])
                for i, mlp in enumerate(self.output_hypernetworks_mlps)
            ],
            dim=1,
        )  # B x T x C/8
        b, c8, uh, uw = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c8, uh * uw)).reshape(b, -1, uh, uw)
        iou_pred = self.iou_prediction_head(iou_token_out)  # B x T
        return masks, iou_pred

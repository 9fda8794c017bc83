"""SAM's prompt encoder: points, boxes and a dense mask -> embeddings for the mask decoder.

Coordinates are (x, y) pixels in the frame of the *resized, padded* model input
(``input_image_size``, e.g. 1024 x 1024), the same frame as the official predictor's
``transform.apply_coords``.

- Sparse prompts. A point becomes a random-Fourier-feature encoding of its position plus a
  learned embedding for its label: 1 foreground, 0 background, -1 padding ("not a point",
  whose positional part is dropped). A box (XYXY) becomes two tokens, its top-left and
  bottom-right corners, each with its own learned embedding. When points come without a box
  a padding point is appended, as the official model was trained that way.
- Dense prompt. A low-resolution mask of logits ``B x 1 x 4h x 4w`` (256 x 256 for the
  official models) goes through two stride-2 convolutions to ``B x C x h x w``; without a
  mask the learned ``no_mask_embed`` vector is broadcast over the grid.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Tancik et al., 2020).

    A position p in [0, 1]^2 maps to ``[sin(2 pi (2p-1) G), cos(2 pi (2p-1) G)]`` with the
    fixed Gaussian matrix ``G`` (2 x num_pos_feats), giving ``2 * num_pos_feats`` channels.

    ``frame_offset`` (x, y) and ``frame_span`` (plain attributes, not weights; default
    (0, 0) and 1) place the current input frame inside a larger reference frame:
    p -> offset + span * p. Training on small crops sets them so that a pixel has the same
    encoding as in a full-size input (see ``napari_sam.train.loop``); inference leaves the
    defaults, which give exactly SAM's encoding.
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )
        self.frame_offset = (0.0, 0.0)
        self.frame_span = 1.0

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords``: (..., 2) (x, y) normalised to [0, 1] -> (..., 2 * num_pos_feats)."""
        if self.frame_span != 1.0 or any(self.frame_offset):
            offset = torch.tensor(self.frame_offset, dtype=coords.dtype, device=coords.device)
            coords = offset + self.frame_span * coords
        proj = (2.0 * coords - 1.0) @ self.positional_encoding_gaussian_matrix
        proj = proj * (2.0 * math.pi)
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the pixel centres of an ``(h, w)`` grid, shape (C, h, w)."""
        h, w = size
        gauss = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=gauss.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=gauss.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # h x w x 2 (x, y)
        return self._pe_encoding(grid.to(gauss.dtype)).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """``coords_input``: (B, N, 2) (x, y) pixels of an ``image_size`` (H, W) frame.

        Returns (B, N, C).
        """
        h, w = image_size
        size = torch.tensor([w, h], dtype=torch.float32, device=coords_input.device)
        coords = coords_input.to(torch.float32) / size
        return self._pe_encoding(coords.to(self.positional_encoding_gaussian_matrix.dtype))


class PromptEncoder(nn.Module):
    """Encode point, box and mask prompts.

    Args:
        embed_dim: channel count C of every prompt embedding (256 for SAM).
        image_embedding_size: (h, w) of the image embedding (64, 64 for SAM).
        input_image_size: (H, W) of the padded model input (1024, 1024 for SAM).
        mask_in_chans: hidden channels of the mask downscaling convs (16 for SAM).
        activation: activation between the mask downscaling convs.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        # Label embeddings: 0 background point, 1 foreground point, 2/3 box corners.
        self.num_point_embeddings = 4
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, embed_dim) for _ in range(self.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        h, w = self.image_embedding_size
        self.mask_input_size = (4 * h, 4 * w)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),  # 4h -> 2h
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),  # 2h -> h
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, shape (1, C, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """``points``: (B, N, 2) (x, y); ``labels``: (B, N). Returns (B, N (+1 if pad), C)."""
        points = points.to(torch.float32) + 0.5  # pixel index -> pixel centre
        if pad:
            b = points.shape[0]
            points = torch.cat([points, points.new_zeros((b, 1, 2))], dim=1)
            labels = torch.cat([labels, labels.new_full((b, 1), -1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels.unsqueeze(-1)  # B x N x 1, broadcasts over C
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = torch.where(labels == 0, emb + self.point_embeddings[0].weight, emb)
        emb = torch.where(labels == 1, emb + self.point_embeddings[1].weight, emb)
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """``boxes``: (B, 4) XYXY -> (B, 2, C) corner tokens."""
        corners = (boxes.to(torch.float32) + 0.5).reshape(-1, 2, 2)  # B x 2 x (x, y)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_labels = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0
        )  # 2 x C
        return emb + corner_labels

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """``masks``: (B, 1, 4h, 4w) logits -> (B, C, h, w)."""
        return self.mask_downscaling(masks)

    def _check_inputs(self, points, boxes, masks) -> int:
        """Validate prompt shapes and return the prompt batch size B."""
        sizes = []
        if points is not None:
            if not isinstance(points, (tuple, list)) or len(points) != 2:
                raise TypeError("points must be a (coords, labels) pair of tensors")
            coords, labels = points
            if coords.ndim != 3 or coords.shape[-1] != 2:
                raise ValueError(
                    f"point coords must have shape (B, N, 2) (x, y), got {tuple(coords.shape)}"
                )
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    f"point labels must have shape (B, N) = {tuple(coords.shape[:2])}, "
                    f"got {tuple(labels.shape)}"
                )
            sizes.append(coords.shape[0])
        if boxes is not None:
            if boxes.shape[-1] != 4 or boxes.numel() == 0:
                raise ValueError(f"boxes must have shape (B, 4) XYXY, got {tuple(boxes.shape)}")
            sizes.append(boxes.numel() // 4)
        if masks is not None:
            if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[-2:] != self.mask_input_size:
                h, w = self.mask_input_size
                raise ValueError(
                    f"mask prompts must have shape (B, 1, {h}, {w}) (low-res logits), "
                    f"got {tuple(masks.shape)}"
                )
            sizes.append(masks.shape[0])
        if len(set(sizes)) > 1:
            raise ValueError(f"points, boxes and masks disagree on the batch size: {sizes}")
        return sizes[0] if sizes else 1

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed any combination of prompts.

        Args:
            points: ``(coords (B, N, 2) (x, y), labels (B, N))`` or None.
            boxes: (B, 4) XYXY or None.
            masks: (B, 1, 4h, 4w) low-res mask logits or None.

        Returns:
            sparse: (B, N_tokens, C), N_tokens = N (+1 padding point if no box) (+2 if box).
            dense: (B, C, h, w).
        """
        bs = self._check_inputs(points, boxes, masks)
        weight = self.no_mask_embed.weight
        tokens = []
        if points is not None:
            coords, labels = points
            tokens.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            tokens.append(self._embed_boxes(boxes))
        if tokens:
            sparse = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        else:
            sparse = weight.new_empty((bs, 0, self.embed_dim))

        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense

"""TinyViT image encoder of MobileSAM (``vit_t``), written to load ``mobile_sam.pt`` strictly.

Architecture (TinyViT-5M as adapted by MobileSAM, Zhang et al. 2023), for a 1024 input:

- ``patch_embed``: two 3x3 stride-2 conv+BN layers, (B, 3, 1024, 1024) -> (B, 64, 256, 256).
- ``layers[0]``: MBConv blocks (1x1 expand, 3x3 depthwise, 1x1 project, residual), then a
  patch-merging downsample to (B, 128, 128, 128).
- ``layers[1..3]``: TinyViT blocks: windowed self-attention with a learned bias per head and
  per absolute (|dy|, |dx|) offset, a 3x3 depthwise conv, an MLP; each stage but the last
  ends with patch merging. MobileSAM keeps stride 1 in the last merge, so stages 2 and 3
  both run at 64 x 64 (``merge_strides = (2, 2, 1)``).
- ``neck``: like SAM's ViT neck, (B, 320, 64, 64) -> (B, 256, 64, 64).

``norm_head`` and ``head`` (an ImageNet classifier) are unused but present in the released
checkpoint, so they exist here to keep ``load_state_dict(strict=True)`` working.
All conv+BN pairs are ``ConvBN`` (keys ``c.*`` and ``bn.*``); BatchNorm needs eval mode.

Inside this module feature maps are (B, C, H, W) between stages and (B, H, W, C) inside
the attention blocks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d
from .image_encoder import window_partition, window_unpartition


class ConvBN(nn.Sequential):
    """Bias-free Conv2d ``c`` followed by BatchNorm2d ``bn``: (B, Cin, H, W) -> (B, Cout, H', W')."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module(
            "c",
            nn.Conv2d(
                in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False
            ),
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        self.add_module("bn", bn)


class PatchEmbed(nn.Module):
    """Two stride-2 3x3 ConvBN layers: (B, 3, S, S) -> (B, embed_dim, S/4, S/4)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, embed_dim // 2, 3, 2, 1),
            nn.GELU(),
            ConvBN(embed_dim // 2, embed_dim, 3, 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block (MobileNetV2 style) on (B, C, H, W)."""

    def __init__(self, chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(chans * expand_ratio)
        self.conv1 = ConvBN(chans, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, chans, bn_weight_init=0.0)  # starts as identity block
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 ConvBN, depthwise 3x3 ConvBN with ``stride``, 1x1 ConvBN: (B, C, H, W) -> (B, C', H/s, W/s)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class ConvLayer(nn.Module):
    """Stage 0: ``depth`` MBConv blocks and an optional downsample, on (B, C, H, W)."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    """LayerNorm then fc1 -> GELU -> fc2 on the last axis: (..., C) -> (..., C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm multi-head attention inside a (h, w) window with a learned offset bias.

    The bias of head n between tokens (y, x) and (y', x') is
    ``attention_biases[n, |y - y'| * w + |x - x'|]``. The fused ``qkv`` projection is laid
    out per head as [q (head_dim), k (head_dim), v (head_dim)].

    ``x``: (B', h*w, C) -> (B', h*w, C).
    """

    def __init__(self, dim: int, num_heads: int, resolution: tuple[int, int]) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        h, w = resolution
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, h * w))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        idx = (ys[:, None] - ys[None, :]).abs() * w + (xs[:, None] - xs[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idx, persistent=False)  # hw x hw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # each B' x heads x N x head_dim
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # heads x N x N
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class TinyViTBlock(nn.Module):
    """Windowed attention, depthwise 3x3 conv, MLP; on (B, H, W, C).

    The grid is zero-padded to a multiple of ``window_size`` before the attention (whose
    LayerNorm then sees the padding, as in the original).
    """

    def __init__(
        self, dim: int, num_heads: int, window_size: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, (window_size, window_size))
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        win, padded = window_partition(x, ws)  # B*nW x ws x ws x C
        win = self.attn(win.reshape(-1, ws * ws, c)).view(-1, ws, ws, c)
        x = x + window_unpartition(win, ws, padded, (h, w))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class BasicLayer(nn.Module):
    """Stages 1-3: ``depth`` TinyViT blocks and an optional downsample, (B, C, H, W) in/out."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: nn.Module | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # B x H x W x C
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """MobileSAM's TinyViT encoder: (B, 3, S, S) -> (B, out_chans, S/16, S/16) for strides (2, 2, 1).

    Args:
        img_size: input side S (1024).
        in_chans: input channels (3).
        embed_dims: channels of the 4 stages (64, 128, 160, 320).
        depths: blocks per stage (2, 2, 6, 2).
        num_heads: heads per stage (stage 0 is convolutional; its entry is unused).
        window_sizes: attention window per stage (stage 0 unused).
        mlp_ratio: MLP width / dim in the attention blocks (4).
        mbconv_expand_ratio: MBConv expansion (4).
        local_conv_size: depthwise conv kernel in the attention blocks (3).
        merge_strides: stride of the downsample after stages 0..2 ((2, 2, 1) for MobileSAM).
        num_classes: width of the unused classifier ``head`` (1000 in mobile_sam.pt).
        out_chans: channels of the neck output (256).
    """

    def __init__(
        self,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        merge_strides: Sequence[int] = (2, 2, 1),
        num_classes: int = 1000,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == n == len(merge_strides) + 1):
            raise ValueError(
                "embed_dims, depths, num_heads, window_sizes need one entry per stage"
            )
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        layers = []
        for i in range(n):
            down = None
            if i < n - 1:
                down = PatchMerging(embed_dims[i], embed_dims[i + 1], merge_strides[i])
            if i == 0:
                layers.append(ConvLayer(embed_dims[0], depths[0], mbconv_expand_ratio, down))
            else:
                layers.append(
                    BasicLayer(
                        embed_dims[i],
                        depths[i],
                        num_heads[i],
                        window_sizes[i],
                        mlp_ratio,
                        local_conv_size,
                        down,
                    )
                )
        self.layers = nn.ModuleList(layers)
        self.norm_head = nn.LayerNorm(embed_dims[-1])  # unused (classifier of the original)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, S, S) normalised -> (B, out_chans, S/16, S/16)."""
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)

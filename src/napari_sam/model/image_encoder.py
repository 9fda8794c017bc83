"""SAM's image encoder: an MAE-style ViT with windowed/global attention and a conv neck.

(B, 3, S, S) normalised image -> 16x16 patches -> ``depth`` transformer blocks on a
(B, S/16, S/16, C) token grid -> neck -> (B, 256, S/16, S/16) image embedding.

Most blocks attend within non-overlapping ``window_size`` x ``window_size`` windows (the grid
is zero-padded to a multiple of the window); the blocks in ``global_attn_indexes`` attend over
the whole grid. Every attention adds decomposed relative-position terms (MViTv2): for a query
at (y, x) and a key at (y', x'), ``q . Rh[y - y'] + q . Rw[x - x']`` with learned tables
``rel_pos_h`` / ``rel_pos_w`` of shape (2 * size - 1, head_dim). The attention itself runs in
``torch.nn.functional.scaled_dot_product_attention`` with those terms as an additive mask.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, MLPBlock


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided conv: (B, 3, S, S) -> (B, S/p, S/p, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def _rel_pos_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Table R (size, size, c) with R[i, j] = embedding of the offset i - j.

    ``rel_pos`` is (2L - 1, c); if L != size it is linearly resampled to 2 * size - 1 rows
    (as when running a checkpoint at another resolution).
    """
    n = 2 * size - 1
    if rel_pos.shape[0] != n:
        resized = F.interpolate(rel_pos.t().unsqueeze(0), size=n, mode="linear")
        rel_pos = resized[0].t()
    idx = torch.arange(size, device=rel_pos.device)
    offsets = idx[:, None] - idx[None, :] + (size - 1)  # size x size, values 0 .. 2 size - 2
    return rel_pos[offsets]


def rel_pos_bias(
    q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Additive attention bias of the decomposed relative positions.

    Args:
        q: (B, heads, H*W, c) unscaled queries, row-major over (H, W).
        rel_pos_h, rel_pos_w: (2H - 1, c), (2W - 1, c) tables.
        hw: (H, W) of the query (= key) grid.

    Returns:
        (B, heads, H*W, H*W) bias: ``q . Rh[y - y'] + q . Rw[x - x']``.
    """
    h, w = hw
    b, nh, _, c = q.shape
    rq = q.reshape(b, nh, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, _rel_pos_table(rel_pos_h, h))  # ... x H'
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, _rel_pos_table(rel_pos_w, w))  # ... x W'
    bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)  # B x n x H x W x H' x W'
    return bias.reshape(b, nh, h * w, h * w)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with optional relative positions.

    Args:
        dim: channels C.
        num_heads: heads (must divide C).
        qkv_bias: bias on the fused qkv projection.
        use_rel_pos: add decomposed relative-position terms.
        input_size: (H, W) the tables are sized for (the window, or the full grid).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each B x heads x HW x c'
        bias = None
        if self.use_rel_pos:
            bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window, window, C), zero-padding H, W up to a multiple.

    Returns the windows and the padded size (Hp, Wp).
    """
    b, h, w, c = x.shape
    ph, pw = -h % window, -w % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    hp, wp = h + ph, w + pw
    x = x.view(b, hp // window, window, wp // window, window, c).transpose(2, 3)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of ``window_partition``: back to (B, H, W, C) without the padding."""
    hp, wp = padded_hw
    h, w = hw
    nwh, nww = hp // window, wp // window
    b = windows.shape[0] // (nwh * nww)
    x = windows.view(b, nwh, nww, window, window, -1).transpose(2, 3).reshape(b, hp, wp, -1)
    if hp != h or wp != w:
        x = x[:, :h, :w, :].contiguous()
    return x


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size`` 0 means global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, C) -> (B, H, W, C)."""
        y = self.norm1(x)
        if self.window_size > 0:
            h, w = y.shape[1:3]
            y, padded = window_partition(y, self.window_size)
            y = window_unpartition(self.attn(y), self.window_size, padded, (h, w))
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """ViT image encoder of SAM.

    Args:
        img_size: input side S (1024 for SAM); the token grid is S / patch_size.
        patch_size: patch side (16).
        in_chans: input channels (3).
        embed_dim, depth, num_heads: ViT width, number of blocks, heads.
        mlp_ratio: MLP hidden width / embed_dim (4).
        out_chans: channels of the output embedding (256).
        qkv_bias: bias on the qkv projection.
        norm_layer: norm of the blocks; default LayerNorm with eps 1e-6 (as SAM).
        act_layer: MLP activation (GELU).
        use_abs_pos: learned absolute position embedding (1, S/p, S/p, C).
        use_rel_pos: decomposed relative positions in every attention.
        window_size: window side of the windowed blocks (14).
        global_attn_indexes: indices of the blocks with global attention.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size ({img_size}) must be a multiple of patch_size")
        if norm_layer is None:
            norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, 3, S, S) normalised -> (B, out_chans, S/16, S/16)."""
        x = self.patch_embed(x)  # B x h x w x C
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))

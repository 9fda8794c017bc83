"""A faster evaluation of SAM's mask decoder for a handful of prompt tokens.

Why this exists: on a CPU, one click costs about as much in SAM's mask decoder as in
everything else together, and most of the decoder's time goes into the cross-attentions
between the T prompt/output tokens (T is ~7 for one click or one box) and the
``hw = 64 * 64`` image tokens. The reference evaluation projects all image tokens to the
internal width ``D`` (128 in SAM) for keys, values, queries and the output projection,
i.e. ``4 * hw * C * D`` multiply-adds per block. Because the token side is tiny, the same
numbers come out of re-associated products that never form the projected image tokens:

token -> image attention (tokens ask, image answers); per head ``h`` with width ``d``::

    logits_h = (q_h Wk_h) X^T / sqrt(d)     # (T, C) @ (C, hw); k bias is constant per
                                            # row and drops out of the softmax
    out_h    = (A_h V) Wv_h^T + bv_h        # (T, hw) @ (hw, C) first; rows of A sum to 1

image -> token attention (image asks, tokens answer)::

    logits   = X (Wq_h^T k_h^T) + bq_h k_h^T   # (hw, C) @ (C, heads * T)
    out      = A (v_h Wo_h^T) + bo             # (hw, heads * T) @ (heads * T, C)

so each product costs ``hw * C * heads * T`` instead of ``hw * C * D``: 2.3x fewer
operations for ``heads * T = 56`` vs ``D = 128``, and none of the (hw, D) intermediate
tensors, head splits or copies. The results equal the reference up to float rounding
(checked in tests/core/test_predictor.py against the model's own ``mask_decoder``).

Two more savings: without a mask prompt the first block's image tokens are the same at
every click, so its image-side projections are made once per image (:func:`prepare`);
and large scratch tensors are reused from call to call (:class:`Workspace`). The 2 x 2
stride-2 transposed convolutions of the output upscaling run as channels-last matmuls.

Everything acting on tokens only (self-attention, MLPs, layer norms, hypernetworks, IoU
head) runs through the model's own modules. The fast path is
used when the decoder has the structure of SAM's ``MaskDecoder`` + ``TwoWayTransformer``
(module names as in segment-anything; napari_sam.model keeps them) and when
``heads * T < D``; otherwise :func:`decode` calls ``mask_decoder`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_DECODER_ATTRS = (
    "transformer",
    "iou_token",
    "mask_tokens",
    "num_mask_tokens",
    "output_upscaling",
    "output_hypernetworks_mlps",
    "iou_prediction_head",
)
_BLOCK_ATTRS = (
    "self_attn",
    "norm1",
    "cross_attn_token_to_image",
    "norm2",
    "mlp",
    "norm3",
    "norm4",
    "cross_attn_image_to_token",
    "skip_first_layer_pe",
)
_ATTN_ATTRS = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "internal_dim")


class Workspace:
    """Scratch tensors reused from click to click.

    A fresh multi-megabyte CPU tensor costs a page fault per 4 KiB on first touch (the
    allocator returns large blocks to the OS on free); for the decoder's ~30 MB of
    intermediates that is ~25 % of a click. Buffers are keyed by name and re-allocated
    when the shape, dtype or device changes. Results returned to callers never live here.
    Not thread-safe: one workspace per predictor (predictors are not thread-safe either).
    """

    def __init__(self) -> None:
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape, like: Tensor) -> Tensor:
        t = self._bufs.get(name)
        if (
            t is None
            or t.shape != tuple(shape)
            or t.dtype != like.dtype
            or t.device != like.device
        ):
            t = self._bufs[name] = torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
        return t

    def clear(self) -> None:
        self._bufs.clear()


def _buffer(ws: Workspace | None, name: str, shape, like: Tensor) -> Tensor:
    if ws is None:
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
    return ws.get(name, shape, like)


def _act_(act: nn.Module, x: Tensor) -> Tensor:
    """Apply an elementwise activation module in place where torch has an in-place op."""
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if type(act) is nn.ReLU:
        return x.relu_()
    return act(x)


def supports_fast_path(mask_decoder: nn.Module) -> bool:
    """True when ``mask_decoder`` has SAM's MaskDecoder / TwoWayTransformer structure."""
    if not all(hasattr(mask_decoder, a) for a in _DECODER_ATTRS):
        return False
    tr = mask_decoder.transformer
    if not all(hasattr(tr, a) for a in ("layers", "final_attn_token_to_image", "norm_final_attn")):
        return False
    attns = [tr.final_attn_token_to_image]
    for block in tr.layers:
        if not all(hasattr(block, a) for a in _BLOCK_ATTRS):
            return False
        attns += [block.cross_attn_token_to_image, block.cross_attn_image_to_token]
    return all(all(hasattr(a, n) for n in _ATTN_ATTRS) for a in attns)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, T, D) -> (B, heads, T, d)."""
    b, t, dim = x.shape
    return x.view(b, t, num_heads, dim // num_heads).transpose(1, 2)


def _token_to_image(attn: nn.Module, q_tok: Tensor, x_pe: Tensor, x: Tensor) -> Tensor:
    """Tokens attend to image tokens.

    q_tok: (B, T, C) token queries (with their PE); x_pe: (B|1, hw, C) image keys (with PE);
    x: (B|1, hw, C) image values. Returns (B, T, C), equal to ``attn(q_tok, x_pe, x)``.
    """
    nh = attn.num_heads
    b, t, _ = q_tok.shape
    d = attn.internal_dim // nh
    q = _heads(attn.q_proj(q_tok), nh)  # B x nh x T x d
    wk = attn.k_proj.weight.view(nh, d, -1)  # nh x d x C
    qk = torch.matmul(q, wk).reshape(b, nh * t, -1)  # B x nh*T x C
    logits = torch.matmul(qk, x_pe.transpose(1, 2))  # B x nh*T x hw
    probs = torch.softmax(logits.mul_(1.0 / math.sqrt(d)), dim=-1)
    ax = torch.matmul(probs, x).view(b, nh, t, -1)  # B x nh x T x C
    wv = attn.v_proj.weight.view(nh, d, -1)  # nh x d x C
    v = torch.matmul(ax, wv.transpose(1, 2))  # B x nh x T x d
    v = v.transpose(1, 2).reshape(b, t, attn.internal_dim) + attn.v_proj.bias
    return attn.out_proj(v)


def _token_to_image_cached(attn: nn.Module, q_tok: Tensor, k_img: Tensor, v_img: Tensor):
    """Tokens attend to image tokens whose keys/values were projected once per image.

    q_tok: (B, T, C); k_img, v_img: (1, heads, hw, d) projected keys (with PE) / values.
    Returns (B, T, C), equal to ``attn(q_tok, x_pe, x)`` for the x they were made from.
    """
    nh = attn.num_heads
    b, t, _ = q_tok.shape
    d = attn.internal_dim // nh
    q = _heads(attn.q_proj(q_tok), nh) * (1.0 / math.sqrt(d))  # B x nh x T x d
    probs = torch.softmax(torch.matmul(q, k_img.transpose(-1, -2)), dim=-1)  # B x nh x T x hw
    out = torch.matmul(probs, v_img)  # B x nh x T x d
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, attn.internal_dim))


def _image_to_token(
    attn: nn.Module,
    x_pe: Tensor,
    x: Tensor,
    k_tok: Tensor,
    v_tok: Tensor,
    ws: Workspace | None = None,
    q_img_t: Tensor | None = None,
) -> Tensor:
    """Image tokens attend to tokens; returns the residual sum ``x + attn(x_pe, k_tok, v_tok)``.

    x_pe: (B|1, hw, C) image queries (with PE); x: (B|1, hw, C) the residual input;
    k_tok: (B, T, C) token keys (with PE); v_tok: (B, T, C) token values. Returns (B, hw, C).
    q_img_t: optional (1, heads, d, hw) ``q_proj(x_pe)`` projected once per image.
    """
    nh = attn.num_heads
    b, t, _ = k_tok.shape
    d = attn.internal_dim // nh
    k = _heads(attn.k_proj(k_tok), nh) * (1.0 / math.sqrt(d))  # B x nh x T x d
    v = _heads(attn.v_proj(v_tok), nh)  # B x nh x T x d
    # Logits laid out (B, nh*T, hw) so that the softmax over T runs along a strided axis
    # with hw contiguous values per step (a softmax over a last axis of length T is slow).
    if q_img_t is not None:
        logits = torch.matmul(k, q_img_t).view(b, nh * t, -1)  # (B nh T d) @ (1 nh d hw)
    else:
        m = torch.matmul(k, attn.q_proj.weight.view(nh, d, -1))  # B x nh x T x C
        bias = torch.matmul(k, attn.q_proj.bias.view(nh, d, 1))  # B x nh x T x 1
        logits = torch.baddbmm(
            bias.view(b, nh * t, 1), m.view(b, nh * t, -1), x_pe.expand(b, -1, -1).transpose(1, 2)
        )
    hw = logits.shape[-1]
    probs = torch.softmax(logits.view(b, nh, t, hw), dim=2).view(b, nh * t, hw)
    wo = attn.out_proj.weight.t().reshape(nh, d, -1)  # nh x d x C
    # Each head's probabilities sum to 1 over T, so out_proj's bias can ride along in p.
    p = torch.matmul(v, wo) + attn.out_proj.bias / nh  # B x nh x T x C
    out = _buffer(ws, "image_to_token", (b, hw, x.shape[-1]), x)
    return torch.baddbmm(
        x.expand(b, -1, -1), probs.transpose(1, 2), p.view(b, nh * t, -1), out=out
    )


def _upscale_supported(up: nn.Module) -> bool:
    """SAM's output_upscaling: ConvT(2, 2) -> LayerNorm2d -> act -> ConvT(2, 2) -> act."""
    if not isinstance(up, nn.Sequential) or len(up) != 5:
        return False
    for i in (0, 3):
        conv = up[i]
        if not (
            isinstance(conv, nn.ConvTranspose2d)
            and conv.kernel_size == (2, 2)
            and conv.stride == (2, 2)
            and conv.padding == (0, 0)
            and conv.output_padding == (0, 0)
            and conv.dilation == (1, 1)
            and conv.groups == 1
            and conv.bias is not None
        ):
            return False
    ln = up[1]
    return (
        type(ln).__name__ == "LayerNorm2d"
        and all(hasattr(ln, a) for a in ("weight", "bias", "eps"))
        and isinstance(up[2], _ELEMENTWISE)
        and isinstance(up[4], _ELEMENTWISE)
    )


_ELEMENTWISE = (nn.GELU, nn.ReLU, nn.SiLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _upscale_and_mask(
    up: nn.Sequential, keys: Tensor, hyper: Tensor, h: int, w: int, ws: Workspace | None = None
) -> Tensor:
    """Masks ``hyper @ output_upscaling(keys)`` without image-layout convolutions.

    A 2x2 / stride-2 transposed convolution maps each input pixel independently to a 2x2
    block of output pixels: a matmul with the weight laid out (C_in, 2, 2, C_out). Keeping
    the sub-pixel offsets as extra axes (channels last) lets the LayerNorm2d (over channels),
    the activations and the second convolution act without any reshuffle; the pixels are put
    in image order only at the end, on the M mask channels.

    keys: (B, h*w, C) image tokens, row-major; hyper: (B, M, C'') per-mask weights.
    Returns (B, M, 4h, 4w) mask logits, equal to the reference up to float rounding.
    """
    c1, c2, ln = up[0], up[3], up[1]
    b = keys.shape[0]
    w1 = c1.weight.permute(0, 2, 3, 1).reshape(c1.in_channels, -1)  # C x (2*2*C')
    x = keys.reshape(-1, c1.in_channels)
    y = _buffer(ws, "up1", (x.shape[0], w1.shape[1]), x)
    torch.addmm(c1.bias.repeat(4), x, w1, out=y)
    y = y.view(-1, c1.out_channels)  # (B*h*w*2*2) x C'
    y = _act_(up[2], F.layer_norm(y, (c1.out_channels,), ln.weight, ln.bias, ln.eps))
    w2 = c2.weight.permute(0, 2, 3, 1).reshape(c2.in_channels, -1)  # C' x (2*2*C'')
    z = _buffer(ws, "up2", (y.shape[0], w2.shape[1]), y)
    z = _act_(up[4], torch.addmm(c2.bias.repeat(4), y, w2, out=z))  # (B*h*w*2*2) x (2*2*C'')
    z = z.view(b, -1, c2.out_channels)  # B x (h*w*2*2*2*2) x C''
    m = _buffer(ws, "masks", (b, hyper.shape[1], z.shape[1]), z)
    torch.bmm(hyper, z.transpose(1, 2), out=m)  # B x M x (h w di dj ei ej)
    m = m.view(b, -1, h, w, 2, 2, 2, 2)  # b M i j di dj ei ej; row 4i+2di+ei, col 4j+2dj+ej
    # the reshape of the permuted view copies: the result never aliases the workspace
    return m.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, -1, 4 * h, 4 * w)


def _attention_is_cheaper(mask_decoder: nn.Module, num_tokens: int) -> bool:
    attn = mask_decoder.transformer.final_attn_token_to_image
    return attn.num_heads * num_tokens < attn.internal_dim


@dataclass
class Prepared:
    """Per-embedding tensors reused by every click (computed once by :func:`prepare`).

    image_embeddings: (1, C, h, w); image_pe: (1, C, h, w) dense positional encoding;
    no_mask_dense: (1, C, h, w) the prompt encoder's dense embedding without a mask prompt;
    image_tokens: (1, h*w, C) the embedding as row-major tokens;
    keys: (1, h*w, C) image tokens + no-mask embedding; keys_pe: keys + positional encoding;
    key_pe: (1, h*w, C) positional encoding as tokens.
    first_k, first_v: (1, heads, h*w, d) the first block's token -> image keys and values
    of ``keys``; first_q_t: (1, heads, d, h*w) its image -> token queries (None when the
    decoder has no fast path). Without a mask prompt the first block's image tokens are
    the same for every click, so their projections are made once per image.
    """

    image_embeddings: Tensor
    image_pe: Tensor
    no_mask_dense: Tensor
    image_tokens: Tensor
    keys: Tensor
    keys_pe: Tensor
    key_pe: Tensor
    first_k: Tensor | None = None
    first_v: Tensor | None = None
    first_q_t: Tensor | None = None
    skip: Tensor | None = None  # (1, C'', 16 hw): a decoder's high-resolution skip term


def _project(lin: nn.Linear, x: Tensor, nh: int) -> Tensor:
    """(1, hw, C) -> (1, heads, hw, d) contiguous."""
    return _heads(lin(x), nh).contiguous()


def prepare(
    image_embeddings: Tensor,
    image_pe: Tensor,
    no_mask_dense: Tensor,
    mask_decoder: nn.Module | None = None,
) -> Prepared:
    """Precompute the image-side tensors of the first decoder block (no mask prompt).

    ``image_embeddings`` may carry more channels than the decoder's width (a decoder with
    ``hires_chans``); the tokens are made of the first ``no_mask_dense.shape[1]``."""
    c = no_mask_dense.shape[1]
    tokens = image_embeddings[:, :c].flatten(2).transpose(1, 2).contiguous()
    keys = tokens + no_mask_dense.flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    keys_pe = keys + key_pe
    prep = Prepared(image_embeddings, image_pe, no_mask_dense, tokens, keys, keys_pe, key_pe)
    if getattr(mask_decoder, "hires_chans", 0):
        # prompt-independent: hyper @ (upscaled + skip) = hyper @ upscaled + hyper @ skip
        prep.skip = mask_decoder.hires_features(image_embeddings)[1].flatten(2)
    if mask_decoder is not None and supports_fast_path(mask_decoder):
        blk = mask_decoder.transformer.layers[0]
        t2i, i2t = blk.cross_attn_token_to_image, blk.cross_attn_image_to_token
        prep.first_k = _project(t2i.k_proj, keys_pe, t2i.num_heads)
        prep.first_v = _project(t2i.v_proj, keys, t2i.num_heads)
        prep.first_q_t = _project(i2t.q_proj, keys_pe, i2t.num_heads).transpose(-1, -2)
        prep.first_q_t = prep.first_q_t.contiguous()
    return prep


def decode(
    mask_decoder: nn.Module,
    prepared: Prepared,
    sparse_prompt_embeddings: Tensor,
    dense_prompt_embeddings: Tensor | None,
    multimask_output: bool,
    fast: bool = True,
    ws: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the mask decoder; same results as ``mask_decoder(...)`` up to float rounding.

    Args:
        prepared: the current image's :class:`Prepared` tensors (batch 1, shared by all B).
        sparse_prompt_embeddings: (B, N, C) point/box tokens from the prompt encoder.
        dense_prompt_embeddings: (B, C, h, w) mask-prompt embedding, or None for "no mask
            prompt" (the prompt encoder's no-mask embedding, precomputed in ``prepared``).
        multimask_output: return masks 1..3 (True) or mask 0 (False).
        fast: False forces the model's own ``mask_decoder`` forward.
        ws: optional :class:`Workspace` for scratch tensors (saves page faults per call).

    Returns:
        low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M), M = 3 or 1.
    """
    md = mask_decoder
    b, n_sparse = sparse_prompt_embeddings.shape[:2]
    num_tokens = 1 + getattr(md, "num_mask_tokens", 4) + n_sparse
    no_skip = getattr(md, "hires_chans", 0) and prepared.skip is None
    if (
        not fast
        or no_skip
        or not supports_fast_path(md)
        or not _attention_is_cheaper(md, num_tokens)
    ):
        dense = (
            prepared.no_mask_dense if dense_prompt_embeddings is None else dense_prompt_embeddings
        )
        return md(
            image_embeddings=prepared.image_embeddings,
            image_pe=prepared.image_pe,
            sparse_prompt_embeddings=sparse_prompt_embeddings,
            dense_prompt_embeddings=dense.expand(b, -1, -1, -1),
            multimask_output=multimask_output,
        )
    tr = md.transformer
    _, h, w = prepared.image_embeddings.shape[1:]
    c = prepared.no_mask_dense.shape[1]
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], 1)
    key_pe = prepared.key_pe
    cached = dense_prompt_embeddings is None and prepared.first_k is not None
    if dense_prompt_embeddings is None:  # batch-1 image tokens until the first update
        keys, keys_pe = prepared.keys, prepared.keys_pe
    else:
        dense = dense_prompt_embeddings.flatten(2).transpose(1, 2)  # B x hw x C (a view)
        keys = _buffer(ws, "keys", dense.shape, dense)
        torch.add(prepared.image_tokens, dense, out=keys)
        keys_pe = torch.add(keys, key_pe, out=_buffer(ws, "keys_pe", keys.shape, keys))
    queries = tokens
    for i, blk in enumerate(tr.layers):
        if blk.skip_first_layer_pe:
            queries = blk.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + blk.self_attn(q=q, k=q, v=queries)
        queries = blk.norm1(queries)
        if i > 0:
            keys_pe = torch.add(keys, key_pe, out=_buffer(ws, "keys_pe", keys.shape, keys))
        first = i == 0 and cached
        if first:
            t2i = blk.cross_attn_token_to_image
            attn = _token_to_image_cached(
                t2i, queries + tokens, prepared.first_k, prepared.first_v
            )
        else:
            attn = _token_to_image(blk.cross_attn_token_to_image, queries + tokens, keys_pe, keys)
        queries = blk.norm2(queries + attn)
        queries = blk.norm3(queries + blk.mlp(queries))
        k_tok = queries + tokens
        i2t = blk.cross_attn_image_to_token
        q_img_t = prepared.first_q_t if first else None
        keys = blk.norm4(_image_to_token(i2t, keys_pe, keys, k_tok, queries, ws, q_img_t))
    keys_pe = torch.add(keys, key_pe, out=_buffer(ws, "keys_pe", keys.shape, keys))
    attn = _token_to_image(tr.final_attn_token_to_image, queries + tokens, keys_pe, keys)
    queries = tr.norm_final_attn(queries + attn)

    sel = range(1, md.num_mask_tokens) if multimask_output else range(0, 1)
    hyper = torch.stack([md.output_hypernetworks_mlps[j](queries[:, 1 + j]) for j in sel], 1)
    keys = keys.expand(b, -1, -1)
    if _upscale_supported(md.output_upscaling):
        masks = _upscale_and_mask(md.output_upscaling, keys, hyper, h, w, ws)
    else:
        upscaled = md.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        bu, cu, hu, wu = upscaled.shape
        masks = torch.bmm(hyper, upscaled.reshape(bu, cu, hu * wu)).view(b, -1, hu, wu)
    if prepared.skip is not None:
        masks = masks + torch.matmul(hyper, prepared.skip).view(masks.shape)
    iou = md.iou_prediction_head(queries[:, 0])
    iou = iou[:, 1:] if multimask_output else iou[:, :1]
    return masks, iou

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

Everything acting on tokens only (self-attention, MLPs, layer norms, hypernetworks, IoU
head) and the upscaling convolutions run through the model's own modules. The fast path is
used when the decoder has the structure of SAM's ``MaskDecoder`` + ``TwoWayTransformer``
(module names as in segment-anything; napari_sam.model keeps them) and when
``heads * T < D``; otherwise :func:`decode` calls ``mask_decoder`` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
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


def _image_to_token(
    attn: nn.Module, x_pe: Tensor, x: Tensor, k_tok: Tensor, v_tok: Tensor
) -> Tensor:
    """Image tokens attend to tokens; returns the residual sum ``x + attn(x_pe, k_tok, v_tok)``.

    x_pe: (B|1, hw, C) image queries (with PE); x: (B|1, hw, C) the residual input;
    k_tok: (B, T, C) token keys (with PE); v_tok: (B, T, C) token values. Returns (B, hw, C).
    """
    nh = attn.num_heads
    b, t, _ = k_tok.shape
    d = attn.internal_dim // nh
    k = _heads(attn.k_proj(k_tok), nh) * (1.0 / math.sqrt(d))  # B x nh x T x d
    v = _heads(attn.v_proj(v_tok), nh)  # B x nh x T x d
    m = torch.matmul(k, attn.q_proj.weight.view(nh, d, -1))  # B x nh x T x C
    bias = torch.matmul(k, attn.q_proj.bias.view(nh, d, 1))  # B x nh x T x 1
    # Logits laid out (B, nh*T, hw) so that the softmax over T runs along a strided axis
    # with hw contiguous values per step (a softmax over a last axis of length T is slow).
    logits = torch.baddbmm(
        bias.view(b, nh * t, 1), m.view(b, nh * t, -1), x_pe.expand(b, -1, -1).transpose(1, 2)
    )
    hw = logits.shape[-1]
    probs = torch.softmax(logits.view(b, nh, t, hw), dim=2).view(b, nh * t, hw)
    wo = attn.out_proj.weight.t().reshape(nh, d, -1)  # nh x d x C
    # Each head's probabilities sum to 1 over T, so out_proj's bias can ride along in p.
    p = torch.matmul(v, wo) + attn.out_proj.bias / nh  # B x nh x T x C
    return torch.baddbmm(x.expand(b, -1, -1), probs.transpose(1, 2), p.view(b, nh * t, -1))


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


def _upscale_and_mask(up: nn.Sequential, keys: Tensor, hyper: Tensor, h: int, w: int) -> Tensor:
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
    y = torch.addmm(c1.bias.repeat(4), keys.reshape(-1, c1.in_channels), w1)
    y = y.view(-1, c1.out_channels)  # (B*h*w*2*2) x C'
    y = up[2](torch.nn.functional.layer_norm(y, (c1.out_channels,), ln.weight, ln.bias, ln.eps))
    w2 = c2.weight.permute(0, 2, 3, 1).reshape(c2.in_channels, -1)  # C' x (2*2*C'')
    z = up[4](torch.addmm(c2.bias.repeat(4), y, w2))  # (B*h*w*2*2) x (2*2*C'')
    z = z.view(b, -1, c2.out_channels)  # B x (h*w*2*2*2*2) x C''
    m = torch.bmm(z, hyper.transpose(1, 2))  # B x (h w di dj ei ej) x M
    m = m.view(b, h, w, 2, 2, 2, 2, -1)  # b i j di dj ei ej M ; row 4i+2di+ei, col 4j+2dj+ej
    return m.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, -1, 4 * h, 4 * w)


def _attention_is_cheaper(mask_decoder: nn.Module, num_tokens: int) -> bool:
    attn = mask_decoder.transformer.final_attn_token_to_image
    return attn.num_heads * num_tokens < attn.internal_dim


@dataclass
class Prepared:
    """Per-embedding tensors reused by every click (computed once by :func:`prepare`).

    image_embeddings: (1, C, h, w); image_pe: (1, C, h, w) dense positional encoding;
    no_mask_dense: (1, C, h, w) the prompt encoder's dense embedding without a mask prompt;
    keys: (1, h*w, C) image tokens + no-mask embedding; keys_pe: keys + positional encoding;
    key_pe: (1, h*w, C) positional encoding as tokens.
    """

    image_embeddings: Tensor
    image_pe: Tensor
    no_mask_dense: Tensor
    keys: Tensor
    keys_pe: Tensor
    key_pe: Tensor


def prepare(image_embeddings: Tensor, image_pe: Tensor, no_mask_dense: Tensor) -> Prepared:
    """Precompute the image-token tensors of the first decoder block (no mask prompt)."""
    keys = (image_embeddings + no_mask_dense).flatten(2).transpose(1, 2).contiguous()
    key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    return Prepared(image_embeddings, image_pe, no_mask_dense, keys, keys + key_pe, key_pe)


def decode(
    mask_decoder: nn.Module,
    prepared: Prepared,
    sparse_prompt_embeddings: Tensor,
    dense_prompt_embeddings: Tensor | None,
    multimask_output: bool,
    fast: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run the mask decoder; same results as ``mask_decoder(...)`` up to float rounding.

    Args:
        prepared: the current image's :class:`Prepared` tensors (batch 1, shared by all B).
        sparse_prompt_embeddings: (B, N, C) point/box tokens from the prompt encoder.
        dense_prompt_embeddings: (B, C, h, w) mask-prompt embedding, or None for "no mask
            prompt" (the prompt encoder's no-mask embedding, precomputed in ``prepared``).
        multimask_output: return masks 1..3 (True) or mask 0 (False).
        fast: False forces the model's own ``mask_decoder`` forward.

    Returns:
        low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M), M = 3 or 1.
    """
    md = mask_decoder
    b, n_sparse = sparse_prompt_embeddings.shape[:2]
    num_tokens = 1 + getattr(md, "num_mask_tokens", 4) + n_sparse
    if not fast or not supports_fast_path(md) or not _attention_is_cheaper(md, num_tokens):
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
    _, c, h, w = prepared.image_embeddings.shape
    out_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(b, -1, -1), sparse_prompt_embeddings], 1)
    key_pe = prepared.key_pe
    if dense_prompt_embeddings is None:  # batch-1 image tokens until the first update
        keys, keys_pe = prepared.keys, prepared.keys_pe
    else:
        keys = (prepared.image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2)
        keys = keys.contiguous()  # B x hw x C
        keys_pe = keys + key_pe
    queries = tokens
    for i, blk in enumerate(tr.layers):
        if blk.skip_first_layer_pe:
            queries = blk.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + blk.self_attn(q=q, k=q, v=queries)
        queries = blk.norm1(queries)
        if i > 0:
            keys_pe = keys + key_pe
        attn = _token_to_image(blk.cross_attn_token_to_image, queries + tokens, keys_pe, keys)
        queries = blk.norm2(queries + attn)
        queries = blk.norm3(queries + blk.mlp(queries))
        k_tok = queries + tokens
        keys = blk.norm4(
            _image_to_token(blk.cross_attn_image_to_token, keys_pe, keys, k_tok, queries)
        )
    attn = _token_to_image(tr.final_attn_token_to_image, queries + tokens, keys + key_pe, keys)
    queries = tr.norm_final_attn(queries + attn)

    sel = range(1, md.num_mask_tokens) if multimask_output else range(0, 1)
    hyper = torch.stack([md.output_hypernetworks_mlps[j](queries[:, 1 + j]) for j in sel], 1)
    keys = keys.expand(b, -1, -1)
    if _upscale_supported(md.output_upscaling):
        masks = _upscale_and_mask(md.output_upscaling, keys, hyper, h, w)
    else:
        upscaled = md.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        bu, cu, hu, wu = upscaled.shape
        masks = torch.bmm(hyper, upscaled.reshape(bu, cu, hu * wu)).view(b, -1, hu, wu)
    iou = md.iou_prediction_head(queries[:, 0])
    iou = iou[:, 1:] if multimask_output else iou[:, :1]
    return masks, iou

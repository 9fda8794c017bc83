"""Batched single-point decoding against one cached image embedding (used by ``automatic``).

Automatic segmentation prompts the mask decoder with hundreds of single points on the same
image. Run as-is, SAM's decoder repeats the image embedding for every prompt and spends most
of its CPU time copying and projecting identical data. :class:`PointDecoder` computes the
same function with the work that does not depend on the prompt done once per image:

- First transformer layer: the image tokens are still the (shared) image embedding, so the
  key/value projections for token->image attention and the query projection for
  image->token attention are computed once per image, not once per prompt. (Not for
  prompt encoders whose dense output depends on the points, as the project's nsam models
  render them: detected, and then the first layer runs per prompt like the others.)
- Later layers: attention scores are formed by folding the projection matrices into the 7
  prompt tokens (``(q W_k) @ keys^T`` instead of ``q @ (keys W_k)^T``), and the attention
  output of the image side is the rank-(heads x tokens) product ``A @ (V W_out)``; the
  4096 x 128 projected image tensors are never built per prompt.
- Upscaling is a pair of per-pixel matmuls in channels-last layout and runs only for the
  prompts with at least one output whose predicted IoU passes the caller's threshold; the
  hypernetwork product runs only for those outputs.
- The heavy matmuls optionally run in bfloat16 (see :func:`resolve_dtype`).

The fast path reads the weights of the standard SAM decoder layout (official module names,
which the project's model keeps). Anything else falls back to calling the modules. The
re-association of the attention products is the one :mod:`napari_sam._fast_decoder` uses
for interactive clicks; this module adds what pays off for hundreds of prompts on one
image (shared first layer, IoU-gated upscaling, bfloat16, small memory-friendly chunks).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PointDecoder", "DecodedPoints", "resolve_dtype"]


@lru_cache(maxsize=1)
def _cpu_bf16_is_faster() -> bool:
    """Time one matmul in both precisions; bfloat16 only pays off on CPUs with native support."""
    a32 = torch.randn(1024, 256)
    b32 = torch.randn(256, 512)
    a16, b16 = a32.bfloat16(), b32.bfloat16()

    def best(a, b):
        a @ b
        times = []
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(4):
                a @ b
            times.append(time.perf_counter() - t)
        return min(times)

    return best(a16, b16) < 0.6 * best(a32, b32)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Map ``"auto" | "float32" | "bfloat16" | "float16"`` to a dtype for the heavy matmuls.

    ``auto`` picks bfloat16 on CUDA devices that support it and on CPUs where a bfloat16
    matmul is measurably faster than a float32 one (AVX512-BF16 / AMX), else float32.
    """
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if precision in table:
        return table[precision]
    if precision != "auto":
        raise ValueError(
            f"precision must be one of 'auto', {', '.join(map(repr, table))}; got {precision!r}"
        )
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_bf16_is_faster() else torch.float32
    return torch.float32


@dataclass
class DecodedPoints:
    """Decoder outputs for a batch of B single-point prompts (multimask: 3 outputs each).

    iou_predictions: (B, 3) float32, predicted IoU of every output.
    index: (N, 2) int64, (point, output) of the outputs whose logits were computed.
    logits: (N, Hl, Wl) float32 low-resolution mask logits (256 x 256 for SAM) in the
        padded model input frame, row-major (y, x).
    """

    iou_predictions: Tensor
    index: Tensor
    logits: Tensor


def _heads(x: Tensor, n: int) -> Tensor:
    """(B, T, h*d) -> (B, h, T, d)."""
    b, t, c = x.shape
    return x.view(b, t, n, c // n).transpose(1, 2)


class _FastPath:
    """Weights of the standard decoder, laid out for prompt-independent precomputation."""

    def __init__(self, decoder: nn.Module, dtype: torch.dtype):
        tr = decoder.transformer
        up = decoder.output_upscaling
        conv1, norm, act1, conv2, act2 = (up[i] for i in range(5))
        for conv in (conv1, conv2):
            if not (
                isinstance(conv, nn.ConvTranspose2d)
                and conv.kernel_size == (2, 2)
                and conv.stride == (2, 2)
                and conv.padding == (0, 0)
            ):
                raise TypeError("unexpected upscaling layout")
        self.dtype = dtype
        self.decoder = decoder
        self.layers = list(tr.layers)
        self.final_attn = tr.final_attn_token_to_image
        self.norm_final = tr.norm_final_attn
        self.act1, self.act2 = act1, act2
        self.norm_eps = float(getattr(norm, "eps", 1e-6))
        # ConvTranspose2d(k=2, s=2) weight (Cin, Cout, 2, 2) -> per-pixel matmul whose output
        # columns are ordered (dy, dx, Cout): output pixel (2y+dy, 2x+dx).
        self.c1 = conv1.out_channels
        self.c2 = conv2.out_channels
        self.w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, -1).to(dtype)
        self.b1 = conv1.bias.repeat(4).to(dtype)
        self.w2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.in_channels, -1).to(dtype)
        self.b2 = conv2.bias.repeat(4).to(dtype)
        self.norm_w = norm.weight.to(dtype)
        self.norm_b = norm.bias.to(dtype)
        self.norm4 = [
            (ly.norm4.weight.to(dtype), ly.norm4.bias.to(dtype), ly.norm4.eps)
            for ly in self.layers
        ]

    # -- attention pieces ------------------------------------------------------------------
    # Image-side tensors are (B, HW, C) in self.dtype; token-side tensors are (B, T, C)
    # float32 and go through the modules themselves. Attention weights over the image are
    # laid out (B, heads*T, HW) so that every softmax and reduction runs along contiguous
    # memory.

    def _scores_vs_image(self, x: Tensor, kpe: Tensor) -> Tensor:
        """x (B, N, C) -> x @ kpe^T, (B, N, HW); kpe = image tokens + PE (B, HW, C)."""
        return x.to(self.dtype) @ kpe.transpose(1, 2)

    def token_to_image(self, attn, q_tok: Tensor, keys, kpe, pre: dict) -> Tensor:
        """Tokens attend to the image. q_tok (B, T, C) float32; returns (B, T, C) float32.

        keys, kpe: (B, HW, C) image tokens and image tokens + PE, or None while they are
        still the shared embedding (first layer), whose projections were precomputed.
        """
        nh = attn.num_heads
        qh = _heads(attn.q_proj(q_tok), nh)  # (B, h, T, d)
        b, _, t, d = qh.shape
        scale = 1.0 / math.sqrt(d)
        if keys is None:
            k_sh, v_sh = pre["t2i"]  # (h, d, HW), (h, HW, d)
            q = qh.transpose(0, 1).reshape(nh, b * t, d).to(self.dtype)
            a = torch.softmax((q @ k_sh) * scale, dim=-1)  # (h, B*T, HW)
            out = (a @ v_sh).view(nh, b, t, d).permute(1, 0, 2, 3)  # (B, h, T, d)
        else:
            wk = attn.k_proj.weight.view(nh, d, -1)  # (h, d, C)
            qk = (qh @ wk).reshape(b, nh * t, -1)  # (B, h*T, C): q folded through W_k
            qb = (qh * attn.k_proj.bias.view(1, nh, 1, d)).sum(-1).view(b, nh * t, 1)
            scores = self._scores_vs_image(qk, kpe) + qb.to(self.dtype)
            a = torch.softmax(scores * scale, dim=-1)  # (B, h*T, HW)
            ak = (a @ keys).float().view(b, nh, t, -1)  # (B, h, T, C): attention-pooled keys
            wv = attn.v_proj.weight.view(nh, d, -1)  # (h, d, C)
            out = ak @ wv.transpose(1, 2) + attn.v_proj.bias.view(1, nh, 1, d)
        out = out.float().transpose(1, 2).reshape(b, t, nh * d)
        return attn.out_proj(out)

    def image_to_token(self, attn, k_tok: Tensor, v_tok: Tensor, keys, kpe, pre: dict, norm):
        """The image attends to the tokens; returns norm(keys + update), (B, HW, C).

        k_tok (B, T, C) tokens + PE, v_tok (B, T, C) tokens, float32. keys (B, HW, C), or
        None for the shared embedding (then the image queries were precomputed).
        """
        nh = attn.num_heads
        kh = _heads(attn.k_proj(k_tok), nh)  # (B, h, T, d)
        vh = _heads(attn.v_proj(v_tok), nh)
        b, _, t, d = kh.shape
        scale = 1.0 / math.sqrt(d)
        if keys is None:
            k = kh.transpose(0, 1).reshape(nh, b * t, d).to(self.dtype)
            scores = (k @ pre["i2t_q"]).view(nh, b, t, -1).transpose(0, 1)  # (B, h, T, HW)
        else:
            wq = attn.q_proj.weight.view(nh, d, -1)  # (h, d, C)
            g = (kh @ wq).reshape(b, nh * t, -1)  # (B, h*T, C): k folded through W_q
            gb = (kh * attn.q_proj.bias.view(1, nh, 1, d)).sum(-1).view(b, nh * t, 1)
            scores = (self._scores_vs_image(g, kpe) + gb.to(self.dtype)).view(b, nh, t, -1)
        a = torch.softmax(scores * scale, dim=2).reshape(b, nh * t, -1)  # (B, h*T, HW)
        wo = attn.out_proj.weight.view(-1, nh, d).permute(1, 2, 0)  # (h, d, C)
        vw = (vh @ wo).reshape(b, nh * t, -1).to(self.dtype)  # (B, h*T, C): V through W_out
        if keys is None:
            x = torch.baddbmm(pre["e_bias"], a.transpose(1, 2), vw)  # embedding + attn out
        else:
            # keys is not used after this layer: accumulate into it in place
            x = keys.baddbmm_(a.transpose(1, 2), vw).add_(attn.out_proj.bias.to(self.dtype))
        w, bias, eps = norm
        return F.layer_norm(x, (x.shape[-1],), w, bias, eps)

    # -- full forward --------------------------------------------------------------------
    def precompute(self, src: Tensor, pe: Tensor) -> dict:
        """src, pe: (1, C, h, w) image embedding (+ dense prompt) and positional encoding."""
        hw = src.shape[-2:]
        e = src.flatten(2).transpose(1, 2)[0].float()  # (HW, C)
        p = pe.flatten(2).transpose(1, 2)[0].float()
        ep = e + p
        first = self.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token

        def proj_heads(lin, x, nh):  # (HW, C) -> (h, HW, d)
            y = lin(x)
            return y.view(y.shape[0], nh, -1).transpose(0, 1).contiguous().to(self.dtype)

        return {
            "hw": hw,
            "p": p.to(self.dtype),  # (HW, C)
            "t2i": (
                proj_heads(t2i.k_proj, ep, t2i.num_heads).transpose(1, 2).contiguous(),
                proj_heads(t2i.v_proj, e, t2i.num_heads),
            ),
            "i2t_q": proj_heads(i2t.q_proj, ep, i2t.num_heads).transpose(1, 2).contiguous(),
            "e_bias": (e + i2t.out_proj.bias).to(self.dtype)[None],  # (1, HW, C)
        }

    def transformer(self, tokens: Tensor, pre: dict, keys0: Tensor | None = None):
        """tokens (B, T, C) float32 -> (queries (B, T, C) float32, keys (B, HW, C) dtype).

        keys0: (B, HW, C) per-prompt image tokens (embedding + dense prompt) when the dense
        prompt depends on the prompt; None uses the shared precomputed first layer.
        """
        queries, qpe = tokens, tokens
        keys = keys0
        kpe = None if keys0 is None else keys0 + pre["p"]  # image tokens + PE
        for i, ly in enumerate(self.layers):
            if ly.skip_first_layer_pe:
                queries = ly.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + qpe
                queries = queries + ly.self_attn(q=q, k=q, v=queries)
            queries = ly.norm1(queries)
            out = self.token_to_image(ly.cross_attn_token_to_image, queries + qpe, keys, kpe, pre)
            queries = ly.norm2(queries + out)
            queries = ly.norm3(queries + ly.mlp(queries))
            keys = self.image_to_token(
                ly.cross_attn_image_to_token,
                queries + qpe,
                queries,
                keys,
                kpe,
                pre,
                self.norm4[i],
            )
            kpe = keys + pre["p"]  # used twice by the next layer (or once by the last)
        out = self.token_to_image(self.final_attn, queries + qpe, keys, kpe, pre)
        return self.norm_final(queries + out), keys

    def upscale(self, keys: Tensor, hyper: Tensor, hw) -> Tensor:
        """keys (B, HW, C), hyper (B, K, C2) float32 -> logits (B, K, 4h, 4w) float32."""
        b = keys.shape[0]
        h, w = hw
        x = torch.addmm(self.b1, keys.reshape(-1, keys.shape[-1]), self.w1)  # (B*HW, 4*C1)
        x = x.view(-1, self.c1)
        x = self.act1(F.layer_norm(x, (self.c1,), self.norm_w, self.norm_b, self.norm_eps))
        x = self.act2(torch.addmm(self.b2, x, self.w2))  # (B*HW*4, 4*C2)
        x = x.view(b, -1, self.c2)  # (B, HW*16, C2), pixel order (y, x, dy, dx, ey, ex)
        m = (x @ hyper.to(self.dtype).transpose(1, 2)).float()  # (B, HW*16, K)
        k = hyper.shape[1]
        m = m.view(b, h, w, 2, 2, 2, 2, k).permute(0, 7, 1, 3, 5, 2, 4, 6)
        return m.reshape(b, k, 4 * h, 4 * w)  # row = 4y + 2dy + ey, col = 4x + 2dx + ex


class _LocalRender:
    """Per-point image tokens of a prompt encoder that renders points into its dense prompt
    (``PromptRenderMixin``), computed in a window around each point.

    The rendered point is a Gaussian bump; ``mask_downscaling`` is two non-overlapping
    2 x 2 stride-2 convolutions (each embedding cell sees one 4 x 4 block of the mask
    prompt) with per-pixel norms, so the dense prompt differs from that of an empty mask
    only in the cells near the point. ``keys(points)`` renders a ``window`` x ``window``
    block (aligned to the 4-pixel cells) around each point, runs ``mask_downscaling`` on it
    and writes the result into a copy of the shared tokens: the same values as rendering the
    whole 256 x 256 prompt, as long as the bump is below float precision outside the window
    (``window`` >= 2 x 10 sigma; 32 mask pixels for sigma 1.5).
    """

    def __init__(self, pe, features: Tensor, dtype: torch.dtype, window: int = 32):
        self.pe, self.dtype, self.win = pe, dtype, window
        mh, mw = (int(v) for v in pe.mask_input_size)
        self.mask_size = (mh, mw)
        self.cells = (mh // 4, mw // 4)
        zero = torch.zeros(1, 1, 4, 4, device=features.device)
        # empty-mask dense prompt (constant per channel) + no-mask embedding, as rendered
        base = pe.mask_downscaling(zero)[0, :, 0, 0] + pe.no_mask_embed.weight[0]  # (C,)
        self.base = base
        shared = features[0] + base[:, None, None]  # (C, h, w)
        self.shared = shared.flatten(1).transpose(0, 1).to(dtype).contiguous()  # (HW, C)

    @staticmethod
    def supports(pe) -> bool:
        ds = getattr(pe, "mask_downscaling", None)
        if not getattr(pe, "renders_prompts", False) or ds is None:
            return False
        convs = [m for m in ds if isinstance(m, nn.Conv2d)]
        strided = [c for c in convs if c.kernel_size != (1, 1)]
        return (
            len(strided) == 2
            and all(c.kernel_size == (2, 2) and c.stride == (2, 2) for c in strided)
            and all(hasattr(pe, a) for a in ("render_point", "render_sigma"))
            and 10 * float(pe.render_sigma) <= 16
        )

    def keys(self, points: Tensor) -> Tensor:
        """points (B, 2) (x, y) input-frame pixels -> image tokens (B, HW, C) in dtype."""
        from napari_sam.model.small_encoder import render_prompts

        pe, win = self.pe, self.win
        mh, mw = self.mask_size
        b = points.shape[0]
        sy = mh / pe.input_image_size[0]
        sx = mw / pe.input_image_size[1]
        # window origin in mask pixels: a multiple of 4, the point near the middle
        cx = ((points[:, 0] + 0.5) * sx - 0.5).floor().long()
        cy = ((points[:, 1] + 0.5) * sy - 0.5).floor().long()
        x0 = ((cx - win // 2).div(4, rounding_mode="floor") * 4).clamp(0, mw - win)
        y0 = ((cy - win // 2).div(4, rounding_mode="floor") * 4).clamp(0, mh - win)
        # the point in window coordinates (input-frame pixels of a window-sized frame)
        local = points.clone()
        local[:, 0] = points[:, 0] - x0.float() / sx
        local[:, 1] = points[:, 1] - y0.float() / sy
        labels = torch.ones(b, 1, dtype=torch.int, device=points.device)
        rendered = render_prompts(
            (local[:, None], labels),
            None,
            (win / sy, win / sx),
            (win, win),
            0.0,
            float(pe.render_point),
            float(pe.render_sigma),
            b,
            points.device,
        )
        patch = pe.mask_downscaling(rendered) + pe.no_mask_embed.weight.view(1, -1, 1, 1)
        patch = patch - self.base.view(1, -1, 1, 1)  # (B, C, win/4, win/4) change
        keys = self.shared.expand(b, -1, -1).clone()  # (B, HW, C)
        gw = self.cells[1]
        n = win // 4
        ii = torch.arange(n, device=points.device)
        rows = (y0 // 4)[:, None] + ii[None]  # (B, n)
        cols = (x0 // 4)[:, None] + ii[None]
        flat = (rows[:, :, None] * gw + cols[:, None, :]).reshape(b, -1)  # (B, n*n)
        delta = patch.flatten(2).transpose(1, 2).to(self.dtype)  # (B, n*n, C)
        keys.scatter_add_(1, flat[..., None].expand(-1, -1, keys.shape[-1]), delta)
        return keys


class PointDecoder:
    """Decode many single-point prompts against one image embedding.

    model: a SAM model (``prompt_encoder``, ``mask_decoder``). ``set_embedding`` takes the
    image embedding ``(1, C, h, w)``; ``decode`` takes points ``(B, 2)`` float ``(x, y)`` in
    the model's input frame (the resized, padded 1024 x 1024 image) and returns the three
    multimask outputs of each point as :class:`DecodedPoints`.

    fast: use the prompt-independent precomputation (same function as the modules, up to
    float rounding); False always calls the modules (reference path).
    precision: dtype of the heavy matmuls in the fast path, see :func:`resolve_dtype`.
    """

    def __init__(self, model: nn.Module, *, fast: bool = True, precision: str = "auto"):
        self.model = model
        self.device = next(model.mask_decoder.parameters()).device
        self.dtype = resolve_dtype(precision, self.device) if fast else torch.float32
        self._fast = None
        if fast:
            try:
                self._fast = _FastPath(model.mask_decoder, self.dtype)
            except (AttributeError, TypeError, IndexError):
                self._fast = None
        self._pre = None
        self._src = self._pe = None
        self.dense_per_prompt = self._dense_depends_on_points()
        # rendering prompt encoders (nsam): a point changes the dense prompt only near it
        self.local_render = self.dense_per_prompt and _LocalRender.supports(model.prompt_encoder)

    @property
    def uses_fast_path(self) -> bool:
        return self._fast is not None

    @torch.inference_mode()
    def _dense_depends_on_points(self) -> bool:
        """True when the prompt encoder's dense output changes with the points (e.g. it
        renders them, as the project's nsam models do); then the image tokens entering
        the decoder differ per prompt and nothing can be shared across prompts."""
        pe = self.model.prompt_encoder
        if getattr(pe, "renders_prompts", False):
            return True
        h, w = (int(v) for v in pe.input_image_size)
        pts = torch.tensor([[[0.3 * w, 0.6 * h]], [[0.8 * w, 0.1 * h]]], device=self.device)
        lab = torch.ones(2, 1, dtype=torch.int, device=self.device)
        _, dense = pe(points=(pts, lab), boxes=None, masks=None)
        _, base = pe(points=None, boxes=None, masks=None)
        return not (
            dense.shape[1:] == base.shape[1:] and torch.equal(dense, base.expand_as(dense))
        )

    @torch.inference_mode()
    def set_embedding(self, features: Tensor) -> None:
        """features: (1, C, h, w) image embedding from the image encoder."""
        if features.ndim != 4 or features.shape[0] != 1:
            raise ValueError(
                f"expected an image embedding of shape (1, C, h, w), got {tuple(features.shape)}"
            )
        pe = self.model.prompt_encoder
        _, dense = pe(points=None, boxes=None, masks=None)  # (1, C, h, w) no-mask embedding
        self._dense = dense
        # (a decoder with a high-resolution skip gets more channels than its width)
        self._src = features[:, : dense.shape[1]].to(self.device) + dense
        self._pe = pe.get_dense_pe()
        self._features = features.to(self.device)
        # a decoder with a high-resolution skip: the image tokens are the first C channels,
        # and the skip adds hyper @ skip to the logits (prompt-independent)
        self._tokens_src = self._features[:, : dense.shape[1]]
        dec = self.model.mask_decoder
        self._skip = None
        if getattr(dec, "hires_chans", 0):
            self._skip = dec.hires_features(self._features)[1].flatten(2).float()
        self._pre = self._fast.precompute(self._src, self._pe) if self._fast else None
        self._render = None
        if self.local_render and self._fast is not None:
            self._render = _LocalRender(pe, self._tokens_src, self._fast.dtype)

    @torch.inference_mode()
    def decode(self, points: Tensor, min_iou: float | None = None) -> DecodedPoints:
        """points: (B, 2) float (x, y) in the input frame. Logits are computed for the outputs
        with predicted IoU >= ``min_iou`` (all outputs when None)."""
        if self._src is None:
            raise RuntimeError("call set_embedding(features) before decode(points)")
        points = torch.as_tensor(points, dtype=torch.float32, device=self.device).reshape(-1, 2)
        step = self.micro_batch
        parts = [
            self._decode_chunk(points[i : i + step], min_iou)
            for i in range(0, points.shape[0], step)
        ]
        offsets = list(range(0, points.shape[0], step))
        if not parts:
            h, w = self._src.shape[-2:]
            return DecodedPoints(
                torch.zeros(0, 3),
                torch.zeros(0, 2, dtype=torch.long),
                torch.zeros(0, 4 * h, 4 * w),
            )
        index = torch.cat(
            [p.index + torch.tensor([o, 0]) for p, o in zip(parts, offsets, strict=True)]
        )
        return DecodedPoints(
            torch.cat([p.iou_predictions for p in parts]),
            index,
            torch.cat([p.logits for p in parts]),
        )

    @property
    def micro_batch(self) -> int:
        """Prompts per decoder call: small enough that the per-prompt image tensors
        (HW x C each) stay around 8 MB, which avoids page-faulting fresh memory per op."""
        if self._fast is None:
            return 16
        _, c, h, w = self._src.shape
        per_prompt = h * w * c * torch.finfo(self.dtype).bits // 8
        return max(1, min(64, int(8e6 // per_prompt)))

    def _decode_chunk(self, points: Tensor, min_iou: float | None) -> DecodedPoints:
        labels = torch.ones(points.shape[0], 1, dtype=torch.int, device=self.device)
        pe, dec = self.model.prompt_encoder, self.model.mask_decoder
        keys0 = None
        if self._render is not None:
            # sparse tokens as the prompt encoder gives them, the dense prompt window by window
            sparse = pe._embed_points(points[:, None, :], labels, pad=True)
            keys0 = self._render.keys(points)
        else:
            sparse, dense = pe(points=(points[:, None, :], labels), boxes=None, masks=None)
            dense = dense if self.dense_per_prompt else self._dense
            if self._fast is None:
                return self._decode_modules(sparse, dense, min_iou)
            if self.dense_per_prompt:  # (B, C, h, w) -> (B, HW, C)
                keys0 = (
                    (self._tokens_src + dense).to(self._fast.dtype).flatten(2).transpose(1, 2)
                ).contiguous()
        fp = self._fast
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens.expand(sparse.shape[0], -1, -1), sparse], dim=1)
        hs, keys = fp.transformer(tokens, self._pre, keys0)
        iou = dec.iou_prediction_head(hs[:, 0])[:, 1:].float()  # (B, 3) multimask outputs
        nmask = iou.shape[1]
        sel = torch.ones_like(iou, dtype=torch.bool) if min_iou is None else iou >= min_iou
        rows = sel.any(1).nonzero()[:, 0]
        h, w = self._pre["hw"]
        if rows.numel() == 0:
            return DecodedPoints(
                iou, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 4 * h, 4 * w)
            )
        mask_tok = hs[rows, 2 : 2 + nmask]  # skip the iou token and the single-mask token
        hyper = torch.stack(
            [dec.output_hypernetworks_mlps[j + 1](mask_tok[:, j]) for j in range(nmask)], 1
        )
        if rows.numel() < keys.shape[0]:
            keys = keys[rows]
        logits = fp.upscale(keys, hyper, (h, w))  # (R, 3, 4h, 4w)
        if self._skip is not None:
            logits = logits + torch.matmul(hyper.float(), self._skip).view(logits.shape)
        sub = sel[rows]
        index = torch.stack([rows[:, None].expand_as(sub)[sub], sub.nonzero()[:, 1]], 1)
        return DecodedPoints(iou, index, logits[sub])

    def _decode_modules(self, sparse: Tensor, dense: Tensor, min_iou) -> DecodedPoints:
        dec = self.model.mask_decoder
        logits, iou = dec(
            image_embeddings=self._features,
            image_pe=self._pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
        sel = torch.ones_like(iou, dtype=torch.bool) if min_iou is None else iou >= min_iou
        return DecodedPoints(iou.float(), sel.nonzero(), logits[sel].float())

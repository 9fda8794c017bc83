"""The project's own small SAM ("nsam_s"): a CPU-fast CNN image encoder + SAM's decoder.

Architecture (all sizes in :data:`NSAM_S`):

- ``SmallEncoder``: a ResNet-style CNN (dense 3x3 residual blocks, BatchNorm, ReLU)
  with a feature pyramid. Input ``(B, 3, S, S)`` (S = 512 by default), output image
  embedding ``(B, C, S/8, S/8)`` (C = 128). The 1/4-resolution features are folded into
  the 1/8 embedding (space-to-depth skip) so that small objects keep their detail, and the
  1/16 and 1/32 stages give context (FPN-style top-down sum). A 1/8 embedding of a
  512 input is the same 64 x 64 grid as SAM's, so low-res masks and mask prompts are
  256 x 256 like the official models.
- SAM's prompt encoder with two changes that made a from-scratch model follow prompts in
  minutes instead of days (see issue 6): the random-Fourier positional encoding uses a
  larger frequency scale (``pe_scale``), and the prompts are also *rendered* into the dense
  mask prompt (``PromptRenderMixin``): a box becomes a filled rectangle, each point a
  signed Gaussian bump, added to the mask prompt (previous low-res logits) when one is
  given. The sparse point/box tokens are kept, so the decoder still sees SAM's inputs.
  The state_dict keys are exactly SAM's.
- SAM's mask decoder (two-way transformer) at width C.

``build_nsam(config=None, checkpoint=None, parts=None) -> Sam``; the config dict is stored
next to the weights so the model can be rebuilt. ``parts`` lets training code pass
prompt-encoder/decoder/transformer/Sam classes explicitly (defaults: this package's).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

NSAM_S: dict = {
    "model_type": "nsam_s",
    "img_size": 512,
    "in_chans": 3,
    "widths": [24, 32, 64, 128, 256],  # at strides 2, 4, 8, 16, 32
    "depths": [0, 1, 2, 2, 2],
    "embed_dim": 128,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_num_heads": 4,
    "decoder_mlp_dim": 512,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 128,
    "pe_scale": 3.0,
    "render_box": 4.0,
    "render_point": 8.0,
    "render_sigma": 1.5,
    # inference: slices shorter than img_size are enlarged only up to this longest side,
    # then padded (the model is trained at native pixel scale: blowing 256 px images up to
    # 512 made its single-click masks far too small; tiny slices still gain from some
    # enlarging; see docs/models.md)
    "input_min_side": 256,
    # 0: off (the shipped weights). N > 0: an HQ-SAM-style high-resolution skip. The
    # encoder also emits N channels of stride-2 features, folded into the stride-8 grid
    # (pixel_unshuffle by 4: 16 N extra embedding channels after the first embed_dim), and
    # the decoder adds a projection of them (zero-initialised, so a model warm-started from
    # weights without the skip starts out identical) to its up-scaled image features, which
    # gives the masks the image's own edges at the output's resolution.
    "hires_chans": 0,
}


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of a (B, C, H, W) tensor."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; (B, C, H, W) -> same.

    Dense 3x3 convolutions, not depthwise ones: on CPUs (oneDNN) they run several times
    closer to peak than depthwise/pointwise pairs of the same FLOPs.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(dim, dim)
        self.conv2 = _conv_bn(dim, dim, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class SmallEncoder(nn.Module):
    """CNN image encoder: (B, 3, S, S) -> (B, embed_dim, S/8, S/8).

    Args:
        img_size: side S of the (padded) square input; must be a multiple of 32.
        in_chans: input channels (3, RGB normalised by ``Sam.preprocess``).
        widths: channels at strides 2, 4, 8, 16, 32.
        depths: residual blocks at each of those strides (after the strided conv).
        embed_dim: output channels (= the decoder's transformer width).
    """

    def __init__(
        self,
        img_size: int = 512,
        in_chans: int = 3,
        widths=(24, 32, 64, 128, 256),
        depths=(0, 1, 2, 2, 2),
        embed_dim: int = 128,
        hires_chans: int = 0,
    ) -> None:
        super().__init__()
        if img_size % 32:
            raise ValueError(f"img_size must be a multiple of 32, got {img_size}")
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError("widths and depths need 5 entries (strides 2, 4, 8, 16, 32)")
        self.img_size = img_size
        self.embed_dim = embed_dim
        self.hires_chans = int(hires_chans)
        #: channels of the output: the embedding proper, then 16 * hires_chans of the skip
        self.out_chans = embed_dim + 16 * self.hires_chans
        stages = []
        cin = in_chans
        for w, d in zip(widths, depths, strict=True):
            stages.append(
                nn.Sequential(_conv_bn(cin, w, 3, 2), *[BasicBlock(w) for _ in range(d)])
            )
            cin = w
        self.stages = nn.ModuleList(stages)
        _, w4, w8, w16, w32 = widths
        # top-down pyramid into stride 8
        self.lat32 = nn.Conv2d(w32, w8, 1)
        self.lat16 = nn.Conv2d(w16, w8, 1)
        # stride-4 detail folded into stride 8 by space-to-depth (4 * w4 channels)
        self.skip4 = nn.Conv2d(4 * w4, w8, 1)
        self.fuse = BasicBlock(w8)
        # SAM-style neck (3x3 first: cheaper at the narrower width)
        self.neck = nn.Sequential(
            nn.Conv2d(w8, embed_dim, 3, padding=1, bias=False),
            LayerNorm2d(embed_dim),
            nn.Conv2d(embed_dim, embed_dim, 1, bias=False),
            LayerNorm2d(embed_dim),
        )
        if self.hires_chans:
            self.hires = nn.Conv2d(widths[0], self.hires_chans, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        _, f4, f8, f16, f32 = feats
        y = self.lat16(f16) + F.interpolate(self.lat32(f32), size=f16.shape[-2:], mode="nearest")
        y = f8 + F.interpolate(y, size=f8.shape[-2:], mode="bilinear", align_corners=False)
        y = y + self.skip4(F.pixel_unshuffle(f4, 2))
        emb = self.neck(self.fuse(y))
        if not self.hires_chans:
            return emb
        return torch.cat([emb, F.pixel_unshuffle(self.hires(feats[0]), 4)], 1)


# ----------------------------------------------------------------------------- prompts


def render_prompts(
    points,
    boxes,
    input_size: tuple[int, int],
    mask_size: tuple[int, int],
    box_value: float,
    point_value: float,
    sigma: float,
    batch: int,
    device,
) -> torch.Tensor:
    """Render point/box prompts into a dense mask-prompt image.

    Args:
        points: ``(coords (B, N, 2) (x, y) input-frame pixels, labels (B, N))`` or None;
            label 1 adds ``+point_value``, 0 adds ``-point_value`` (Gaussian of ``sigma``
            mask pixels), other labels (-1 padding, 2/3 box corners) are ignored.
        boxes: (B, 4) XYXY input-frame pixels or None; inside the box adds ``box_value``
            (soft edges of half a mask pixel).
        input_size: (H, W) of the model input frame; mask_size: (h, w) of the mask prompt.

    Returns:
        (B, 1, h, w) float32.
    """
    mh, mw = mask_size
    sy, sx = mh / input_size[0], mw / input_size[1]
    out = torch.zeros((batch, 1, mh, mw), device=device)
    ys = torch.arange(mh, device=device, dtype=torch.float32)
    xs = torch.arange(mw, device=device, dtype=torch.float32)
    if boxes is not None:
        b = boxes.reshape(-1, 4).to(device=device, dtype=torch.float32)
        # outer pixel edges of the inclusive box, in mask-pixel index coordinates (a mask
        # pixel j covers [j - 0.5, j + 0.5])
        x0, x1 = b[:, 0] * sx - 0.5, (b[:, 2] + 1) * sx - 0.5
        y0, y1 = b[:, 1] * sy - 0.5, (b[:, 3] + 1) * sy - 0.5
        inx = torch.sigmoid((xs[None] - x0[:, None]) * 2) * torch.sigmoid(
            (x1[:, None] - xs[None]) * 2
        )
        iny = torch.sigmoid((ys[None] - y0[:, None]) * 2) * torch.sigmoid(
            (y1[:, None] - ys[None]) * 2
        )
        out = out + box_value * (iny[:, None, :, None] * inx[:, None, None, :])
    if points is not None:
        coords, labels = points
        coords = coords.to(device=device, dtype=torch.float32)
        labels = labels.to(device)
        sign = (labels == 1).float() - (labels == 0).float()  # B x N
        px = (coords[..., 0] + 0.5) * sx - 0.5  # B x N
        py = (coords[..., 1] + 0.5) * sy - 0.5
        gx = torch.exp(-((xs[None, None] - px[..., None]) ** 2) / (2 * sigma**2))  # B N w
        gy = torch.exp(-((ys[None, None] - py[..., None]) ** 2) / (2 * sigma**2))  # B N h
        bumps = torch.einsum("bn,bnh,bnw->bhw", sign * point_value, gy, gx)
        out = out + bumps[:, None]
    return out


class PromptRenderMixin:
    """Mixin for SAM's ``PromptEncoder``: prompts are also rendered into the dense prompt.

    ``dense = mask_downscaling(render(points, boxes) [+ masks]) [+ no_mask_embed if no
    mask]``. Requires ``render_box``, ``render_point``, ``render_sigma`` attributes.
    Input/output shapes are those of ``PromptEncoder.forward``.

    ``renders_prompts = True`` tells callers that the dense embedding depends on the points
    and boxes too (it is not the constant no-mask embedding when no mask is given).
    """

    renders_prompts = True

    def forward(self, points, boxes, masks):
        sparse, dense_nomask = super().forward(points, boxes, None)
        bs = sparse.shape[0]
        if points is None and boxes is None:
            if masks is None:
                return sparse, dense_nomask
            return sparse, self.mask_downscaling(masks)
        rendered = render_prompts(
            points,
            boxes,
            tuple(self.input_image_size),
            tuple(self.mask_input_size),
            self.render_box,
            self.render_point,
            self.render_sigma,
            bs,
            sparse.device,
        )
        if masks is not None:
            return sparse, self.mask_downscaling(masks + rendered)
        return sparse, self.mask_downscaling(rendered) + dense_nomask


_CLASS_CACHE: dict = {}


def _rendering_class(base: type) -> type:
    if base not in _CLASS_CACHE:
        _CLASS_CACHE[base] = type("RenderingPromptEncoder", (PromptRenderMixin, base), {})
    return _CLASS_CACHE[base]


def default_parts() -> SimpleNamespace:
    """This package's SAM classes (prompt encoder, mask decoder, transformer, Sam)."""
    from .mask_decoder import MaskDecoder
    from .prompt_encoder import PromptEncoder
    from .sam import Sam
    from .transformer import TwoWayTransformer

    return SimpleNamespace(
        PromptEncoder=PromptEncoder,
        MaskDecoder=MaskDecoder,
        TwoWayTransformer=TwoWayTransformer,
        Sam=Sam,
    )


_HIRES_KEYS = ("image_encoder.hires.", "mask_decoder.hires_proj.")


def build_nsam(
    config: Mapping | None = None, checkpoint=None, parts=None, new_hires: bool = False
):
    """Build the project's small SAM from a config dict (default :data:`NSAM_S`).

    Args:
        config: keys of :data:`NSAM_S` (missing keys take the defaults).
        checkpoint: None (random init), a path to a ``.pt`` state_dict, or a state_dict.
            Float16 weights are converted to float32. Loaded with ``strict=True``.
        parts: namespace with PromptEncoder, MaskDecoder, TwoWayTransformer, Sam classes
            (default: :func:`default_parts`).
        new_hires: the checkpoint may lack the high-resolution skip's weights
            (``hires_chans`` > 0 warm-started from weights without it); they keep their
            initialisation (the decoder's projection is zero: the model starts out equal to
            the checkpoint's).

    Returns:
        ``Sam`` in eval mode; ``model.nsam_config`` holds the full config.
    """
    cfg = dict(NSAM_S)
    if config:
        # "max_upscale": an interim name of the inference geometry, stored in training
        # checkpoints of session 3; input_min_side replaced it (same weights)
        config = {k: v for k, v in config.items() if k != "max_upscale"}
        unknown = set(config) - set(NSAM_S)
        if unknown:
            raise ValueError(f"unknown nsam config keys: {sorted(unknown)}")
        cfg.update(config)
    parts = parts or default_parts()
    s = int(cfg["img_size"])
    encoder = SmallEncoder(
        img_size=s,
        in_chans=cfg["in_chans"],
        widths=tuple(cfg["widths"]),
        depths=tuple(cfg["depths"]),
        embed_dim=cfg["embed_dim"],
        hires_chans=int(cfg["hires_chans"]),
    )
    dim = int(cfg["embed_dim"])
    pe_cls = _rendering_class(parts.PromptEncoder)
    prompt_encoder = pe_cls(
        embed_dim=dim,
        image_embedding_size=(s // 8, s // 8),
        input_image_size=(s, s),
        mask_in_chans=cfg["mask_in_chans"],
    )
    prompt_encoder.render_box = float(cfg["render_box"])
    prompt_encoder.render_point = float(cfg["render_point"])
    prompt_encoder.render_sigma = float(cfg["render_sigma"])
    with torch.no_grad():
        prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(float(cfg["pe_scale"]))
    hires = {"hires_chans": int(cfg["hires_chans"])} if cfg["hires_chans"] else {}
    decoder = parts.MaskDecoder(
        **hires,
        transformer_dim=dim,
        transformer=parts.TwoWayTransformer(
            depth=cfg["decoder_depth"],
            embedding_dim=dim,
            num_heads=cfg["decoder_num_heads"],
            mlp_dim=cfg["decoder_mlp_dim"],
        ),
        num_multimask_outputs=3,
        iou_head_depth=cfg["iou_head_depth"],
        iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
    )
    model = parts.Sam(encoder, prompt_encoder, decoder)
    model.nsam_config = cfg
    model.input_min_side = cfg["input_min_side"]
    if checkpoint is not None:
        if isinstance(checkpoint, Mapping):
            state = checkpoint
        else:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        if new_hires:
            own = model.state_dict()
            state = {**{k: v for k, v in own.items() if k.startswith(_HIRES_KEYS)}, **state}
        model.load_state_dict(state, strict=True)
    return model.eval()


def default_weights() -> Path:
    """Path of the bundled default weights, ``napari_sam/weights/nsam_s.pt`` (may be absent)."""
    return Path(__file__).resolve().parents[1] / "weights" / "nsam_s.pt"


def looks_like_nsam(state_dict: Mapping) -> bool:
    """True if a state_dict has this module's encoder layout (``image_encoder.lat32`` ...)."""
    return (
        "image_encoder.lat32.weight" in state_dict and "image_encoder.skip4.weight" in state_dict
    )


def load_nsam(path=None):
    """Build an nsam model from weights and the JSON config beside them.

    Args:
        path: a ``.pt`` state_dict with a ``.json`` sidecar (``{"config": {...}}``) of the
            same stem; default :func:`default_weights`.

    Returns:
        ``Sam`` in eval mode (float32), with ``automatic_defaults`` (the sidecar's
        ``"automatic"`` thresholds, or empty).
    """
    path = Path(path) if path is not None else default_weights()
    if not path.is_file():
        raise FileNotFoundError(f"nsam weights not found: {path}")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"nsam config not found: {sidecar} (written next to the weights by "
            "napari_sam.train.loop.export_weights)"
        )
    info = json.loads(sidecar.read_text())
    model = build_nsam(info["config"], checkpoint=path)
    # thresholds for automatic segmentation calibrated for these weights (see
    # napari_sam.automatic.AutomaticParams.for_model); absent: SAM's defaults
    model.automatic_defaults = dict(info.get("automatic", {}))
    return model


def set_canvas(model, size: int) -> None:
    """Resize the model's input frame to ``size`` x ``size`` (training on smaller crops).

    The weights do not depend on the frame size; this updates ``image_encoder.img_size``
    and the prompt encoder's input, embedding and mask-prompt sizes.
    """
    if size % 32:
        raise ValueError(f"canvas size must be a multiple of 32, got {size}")
    model.image_encoder.img_size = size
    pe = model.prompt_encoder
    pe.input_image_size = (size, size)
    pe.image_embedding_size = (size // 8, size // 8)
    pe.mask_input_size = (size // 2, size // 2)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "NSAM_S",
    "PromptRenderMixin",
    "SmallEncoder",
    "build_nsam",
    "count_parameters",
    "default_weights",
    "load_nsam",
    "looks_like_nsam",
    "render_prompts",
    "set_canvas",
]

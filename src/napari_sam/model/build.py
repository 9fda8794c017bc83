"""Build SAM models by name, or from any image encoder.

- ``build_sam(model_type, checkpoint=None)``: ``model_type`` is a name in ``CONFIGS``
  (``vit_b``, ``vit_l``, ``vit_h``: official SAM; ``vit_t``: MobileSAM; ``test_vit``,
  ``test_tiny_vit``: tiny random-init variants for tests), a ``SamConfig``, or ``"auto"``
  (detect from the checkpoint). ``checkpoint`` is a path or a state_dict, loaded with
  ``torch.load(map_location="cpu", weights_only=True)`` and ``strict=True``; ``None`` means
  random initialisation (never a download).
- ``detect_model_type(state_dict) -> str``: the ``CONFIGS`` name whose parameter names and
  shapes match exactly.
- ``build_sam_from_parts(image_encoder, image_embedding_size=None, ...)`` wraps an image
  encoder (any module with ``img_size`` mapping (B, 3, S, S) -> (B, 256, h, w)) with SAM's
  prompt encoder and mask decoder. By default ``input_image_size = (S, S)`` and
  ``image_embedding_size = (S // 16, S // 16)``; the mask prompt is ``4h x 4w``.

Small variants: ``build_sam(SamConfig(img_size=128, embed_dim=64, depth=2, ...))`` or
``build_sam(CONFIGS["test_vit"])`` with ``dataclasses.replace`` for other sizes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from os import PathLike

import torch
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


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Hyperparameters of one SAM variant (defaults: SAM ViT-B).

    ``encoder`` is ``"vit"`` (``ImageEncoderViT``) or ``"tiny_vit"`` (MobileSAM's TinyViT);
    the ``vit_*`` fields apply to the first, the ``tiny_*`` fields to the second. The image
    embedding is ``img_size / 16`` on each side for both.
    """

    encoder: str = "vit"
    img_size: int = 1024
    # ImageEncoderViT
    vit_embed_dim: int = 768
    vit_depth: int = 12
    vit_num_heads: int = 12
    vit_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    vit_window_size: int = 14
    vit_patch_size: int = 16
    vit_mlp_ratio: float = 4.0
    # TinyViT
    tiny_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    tiny_depths: tuple[int, ...] = (2, 2, 6, 2)
    tiny_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    tiny_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    tiny_merge_strides: tuple[int, ...] = (2, 2, 1)
    tiny_num_classes: int = 1000
    # prompt encoder / mask decoder
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_hidden_dim: int = 256


# Official hyperparameters: segment-anything 1.0 build_sam.py (vit_b/l/h) and MobileSAM
# (github.com/ChaoningZhang/MobileSAM, mobile_sam/build_sam.py, build_sam_vit_t).
CONFIGS: dict[str, SamConfig] = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(
        vit_embed_dim=1024, vit_depth=24, vit_num_heads=16, vit_global_attn_indexes=(5, 11, 17, 23)
    ),
    "vit_h": SamConfig(
        vit_embed_dim=1280, vit_depth=32, vit_num_heads=16, vit_global_attn_indexes=(7, 15, 23, 31)
    ),
    "vit_t": SamConfig(encoder="tiny_vit"),
    # Tiny variants for tests and quick experiments (random init; seconds on a CPU).
    "test_vit": SamConfig(
        img_size=128,
        vit_embed_dim=64,
        vit_depth=2,
        vit_num_heads=2,
        vit_global_attn_indexes=(1,),
        vit_window_size=4,
        decoder_mlp_dim=256,
    ),
    "test_tiny_vit": SamConfig(
        encoder="tiny_vit",
        img_size=128,
        tiny_embed_dims=(16, 32, 32, 48),
        tiny_depths=(1, 1, 1, 1),
        tiny_num_heads=(1, 2, 2, 3),
        tiny_window_sizes=(4, 4, 4, 4),
        tiny_num_classes=10,
        decoder_mlp_dim=256,
    ),
}


def build_image_encoder(cfg: SamConfig) -> nn.Module:
    """Image encoder of ``cfg``: (B, 3, S, S) -> (B, prompt_embed_dim, S/16, S/16)."""
    if cfg.encoder == "vit":
        from .image_encoder import ImageEncoderViT

        return ImageEncoderViT(
            img_size=cfg.img_size,
            patch_size=cfg.vit_patch_size,
            embed_dim=cfg.vit_embed_dim,
            depth=cfg.vit_depth,
            num_heads=cfg.vit_num_heads,
            mlp_ratio=cfg.vit_mlp_ratio,
            out_chans=cfg.prompt_embed_dim,
            window_size=cfg.vit_window_size,
            global_attn_indexes=tuple(cfg.vit_global_attn_indexes),
        )
    if cfg.encoder == "tiny_vit":
        from .tiny_vit import TinyViT

        return TinyViT(
            img_size=cfg.img_size,
            embed_dims=cfg.tiny_embed_dims,
            depths=cfg.tiny_depths,
            num_heads=cfg.tiny_num_heads,
            window_sizes=cfg.tiny_window_sizes,
            merge_strides=cfg.tiny_merge_strides,
            num_classes=cfg.tiny_num_classes,
            out_chans=cfg.prompt_embed_dim,
        )
    raise ValueError(f"unknown encoder {cfg.encoder!r}; expected 'vit' or 'tiny_vit'")


def _embedding_side(cfg: SamConfig) -> int:
    if cfg.encoder == "vit":
        return cfg.img_size // cfg.vit_patch_size
    side = cfg.img_size // 4  # patch embed
    for stride in cfg.tiny_merge_strides:
        side = (side - 1) // stride + 1  # 3x3 conv, padding 1
    return side


def _resolve(model_type: str | SamConfig) -> SamConfig:
    if isinstance(model_type, SamConfig):
        return model_type
    if model_type not in CONFIGS:
        raise ValueError(
            f"unknown model type {model_type!r}; choose one of {sorted(CONFIGS)} or 'auto' "
            "(with a checkpoint), or pass a SamConfig"
        )
    return CONFIGS[model_type]


def _build_from_config(cfg: SamConfig) -> Sam:
    e = _embedding_side(cfg)
    return build_sam_from_parts(
        build_image_encoder(cfg),
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(e, e),
        input_image_size=(cfg.img_size, cfg.img_size),
        mask_in_chans=cfg.mask_in_chans,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        decoder_mlp_dim=cfg.decoder_mlp_dim,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
    )


def load_checkpoint(checkpoint: str | PathLike | Mapping) -> Mapping[str, torch.Tensor]:
    """A state_dict from a path (``torch.load``, CPU, ``weights_only=True``) or a mapping."""
    if isinstance(checkpoint, Mapping):
        return checkpoint
    if not isinstance(checkpoint, (str, PathLike)):
        raise TypeError(
            f"checkpoint must be a path or a state_dict, got {type(checkpoint).__name__}"
        )
    return torch.load(checkpoint, map_location="cpu", weights_only=True)


def load_state_dict_into(model: nn.Module, checkpoint: str | PathLike | Mapping) -> nn.Module:
    """Load a checkpoint (path or state_dict) into ``model`` with ``strict=True``."""
    model.load_state_dict(load_checkpoint(checkpoint), strict=True)
    return model


def build_sam(
    model_type: str | SamConfig = "vit_b", checkpoint: str | PathLike | Mapping | None = None
) -> Sam:
    """Build a SAM model in eval mode.

    Args:
        model_type: a ``CONFIGS`` name, a ``SamConfig``, or ``"auto"`` to detect the type
            from ``checkpoint``.
        checkpoint: path to a ``.pth``/``.pt`` state_dict, or the state_dict itself; loaded
            with ``strict=True``. ``None``: random initialisation.

    Raises:
        ValueError: unknown model type, or ``"auto"`` without a checkpoint / with a
            checkpoint that matches no known type.
        RuntimeError: the checkpoint's keys or shapes do not match ``model_type``.
    """
    state_dict = None if checkpoint is None else load_checkpoint(checkpoint)
    if model_type == "auto":
        if state_dict is None:
            raise ValueError("model_type='auto' needs a checkpoint to detect the type from")
        model_type = detect_model_type(state_dict)
    sam = _build_from_config(_resolve(model_type))
    if state_dict is not None:
        sam.load_state_dict(state_dict, strict=True)
    return sam.eval()


@functools.cache
def state_dict_layout(model_type: str | SamConfig) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of the model's state_dict, computed without allocating weights."""
    with torch.device("meta"):
        sam = _build_from_config(_resolve(model_type))
    return {k: tuple(v.shape) for k, v in sam.state_dict().items()}


def detect_model_type(state_dict: Mapping) -> str:
    """Name of the ``CONFIGS`` entry whose keys and shapes equal those of ``state_dict``.

    Values only need a ``.shape``. Raises ValueError naming the closest type and the first
    differing keys when nothing matches.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict mapping, got {type(state_dict).__name__}")
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if not any(k.startswith("image_encoder.") for k in got):
        hint = ""
        if "model" in got or "state_dict" in got:
            hint = " (it looks wrapped: pass checkpoint['model'] / checkpoint['state_dict'])"
        raise ValueError(f"not a SAM state_dict: no 'image_encoder.*' keys{hint}")
    best, best_score, report = None, -1, ""
    for name in CONFIGS:
        want = state_dict_layout(name)
        if got == want:
            return name
        same = sum(1 for k, s in got.items() if want.get(k) == s)
        if same > best_score:
            missing = sorted(set(want) - set(got))[:3]
            unexpected = sorted(set(got) - set(want))[:3]
            wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])[:3]
            best, best_score = name, same
            report = f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong}"
    raise ValueError(
        f"state_dict matches no known SAM model type; closest is {best!r}: {report}. "
        "For a custom size, build a SamConfig and pass it to build_sam."
    )

"""Turn any 2D slice into SAM's input: contrast to uint8 RGB, then resize to the encoder size.

Two steps, both documented here because cached embeddings depend on them:

1. **Contrast** (:class:`Contrast`, :func:`to_uint8_rgb`). SAM was trained on 8-bit RGB
   photographs, so every slice becomes ``(H, W, 3) uint8``:

   - ``"auto"`` (default): a uint8 slice passes through unchanged (an RGB photo behaves
     exactly like with the official predictor); any other dtype uses ``"percentile"``.
   - ``"percentile"``: the ``low``/``high`` percentiles (default 0.5 / 99.5) of the finite
     values map to 0 / 255, values outside are clipped. Robust to hot pixels and to the
     empty background of microscopy images.
   - ``"window"``: fixed ``vmin``/``vmax`` map to 0 / 255 (e.g. a CT window; build one from
     a centre and width with :meth:`Contrast.from_window` or a preset in :data:`CT_WINDOWS`).
   - ``"minmax"``: the finite minimum / maximum map to 0 / 255.

   The intensity mapping is ``round(clip((x - lo) / (hi - lo), 0, 1) * 255)``; RGB slices
   share one (lo, hi) over all channels so colours keep their balance. NaN and -inf become
   0 and +inf becomes 255; percentiles and min/max ignore them. A slice without a finite
   value, or with ``hi <= lo`` (a constant slice), becomes all zeros. For slices with more
   than :data:`PERCENTILE_SAMPLE` pixels the percentiles are computed on a regular
   subsample (every k-th pixel in memory order), which is deterministic.
   Grey slices are repeated into three equal channels.

2. **Resize** (:class:`ResizeLongestSide`, :func:`resize_to_input`). The longest side
   becomes the encoder's ``img_size`` (1024 for SAM) and the other side
   ``int(side * scale + 0.5)``, at least 1 (so 1 x N and 4000 x 300 slices work). The
   resampling is bilinear with antialiasing when shrinking, computed on uint8 by
   ``torch.nn.functional.interpolate``; it agrees with PIL's bilinear resize used by the
   official predictor to within one grey level. The model's own ``preprocess`` then
   normalises with ``pixel_mean``/``pixel_std`` and pads bottom-right to a square.

Shapes: slices are ``(H, W)`` or ``(H, W, 3)`` (row, col[, channel]); ``(H, W, 1)`` is read
as grey. torch is imported only inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

ContrastMode = Literal["auto", "percentile", "window", "minmax"]
_MODES = ("auto", "percentile", "window", "minmax")

#: Pixel count above which percentiles are estimated on a regular subsample.
PERCENTILE_SAMPLE = 1 << 20

#: Common CT windows in Hounsfield units as (center, width); textbook radiology values.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (60.0, 160.0),
}


@dataclass(frozen=True)
class Contrast:
    """How intensities map to SAM's 0..255 (see the module docstring).

    Args:
        mode: "auto", "percentile", "window" or "minmax".
        low, high: percentiles in [0, 100] for "percentile" (and "auto" on non-uint8).
        vmin, vmax: intensity range for "window" (required there, vmin < vmax).
    """

    mode: ContrastMode = "auto"
    low: float = 0.5
    high: float = 99.5
    vmin: float | None = None
    vmax: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"Contrast mode must be one of {_MODES}, got {self.mode!r}")
        if not (0.0 <= self.low < self.high <= 100.0):
            raise ValueError(
                f"Contrast percentiles need 0 <= low < high <= 100, got low={self.low}, "
                f"high={self.high}"
            )
        if self.mode == "window":
            if self.vmin is None or self.vmax is None:
                raise ValueError(
                    "Contrast(mode='window') needs vmin and vmax (or use "
                    "Contrast.from_window(center, width))"
                )
            if not (np.isfinite(self.vmin) and np.isfinite(self.vmax) and self.vmin < self.vmax):
                raise ValueError(
                    f"Contrast window needs finite vmin < vmax, got {self.vmin}, {self.vmax}"
                )

    @classmethod
    def from_window(cls, center: float, width: float) -> Contrast:
        """A fixed window ``center +- width / 2`` (e.g. CT soft tissue: 40, 400 HU)."""
        if not width > 0:
            raise ValueError(f"window width must be > 0, got {width}")
        return cls(mode="window", vmin=center - width / 2.0, vmax=center + width / 2.0)

    @classmethod
    def ct(cls, name: str = "soft_tissue") -> Contrast:
        """A CT window preset from :data:`CT_WINDOWS` (Hounsfield units)."""
        if name not in CT_WINDOWS:
            raise ValueError(f"unknown CT window {name!r}; choose one of {sorted(CT_WINDOWS)}")
        return cls.from_window(*CT_WINDOWS[name])

    def key(self) -> str:
        """A stable string naming this mapping, used in embedding cache signatures."""
        if self.mode == "window":
            return f"window:{float(self.vmin)!r}:{float(self.vmax)!r}"
        if self.mode == "minmax":
            return "minmax"
        return f"{self.mode}:{float(self.low)!r}:{float(self.high)!r}"


def check_slice(image) -> np.ndarray:
    """Validate a 2D slice and return it as an ndarray of shape (H, W) or (H, W, 3).

    Raises TypeError for non-numeric data and ValueError for other shapes or empty slices;
    the message names the fix.
    """
    arr = np.asarray(image)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"image must be numeric (integer, float or bool), got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise TypeError("image must be real-valued; take np.abs(image) or image.real first")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] != 3:
        hint = ""
        if arr.shape[0] == 3:
            hint = " It looks channel-first: use np.moveaxis(image, 0, -1)."
        elif arr.shape[-1] == 4:
            hint = " Drop the alpha channel with image[..., :3]."
        else:
            hint = " Pick one channel (image[..., c]) or pass one 2D slice of a stack."
        raise ValueError(
            f"image must be (H, W) grey or (H, W, 3) RGB, got shape {arr.shape}.{hint}"
        )
    if arr.ndim != 2 and arr.ndim != 3:
        hint = ""
        if arr.ndim > 3:
            hint = " Pass one 2D slice, e.g. volume[z]."
        raise ValueError(
            f"image must be a 2D slice (H, W) or (H, W, 3), got {arr.ndim}D shape {arr.shape}.{hint}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty (shape {arr.shape}); it needs at least 1 x 1 pixels")
    return arr


def _finite_sample(arr: np.ndarray) -> np.ndarray:
    flat = arr.reshape(-1)
    if flat.size > PERCENTILE_SAMPLE:
        flat = flat[:: -(-flat.size // PERCENTILE_SAMPLE)]
    if np.issubdtype(flat.dtype, np.floating):
        flat = flat[np.isfinite(flat)]
    return flat


def intensity_limits(image, contrast: Contrast = Contrast()) -> tuple[float, float] | None:
    """The (lo, hi) intensities that map to 0 and 255, or None for a pass-through uint8.

    Returns (0.0, 0.0) when the slice has no finite value.
    """
    arr = check_slice(image)
    mode = contrast.mode
    if arr.dtype == bool:
        return (0.0, 1.0)
    if mode == "auto":
        if arr.dtype == np.uint8:
            return None
        mode = "percentile"
    if mode == "window":
        return (float(contrast.vmin), float(contrast.vmax))
    sample = _finite_sample(arr)
    if sample.size == 0:
        return (0.0, 0.0)
    if mode == "minmax":
        return (float(sample.min()), float(sample.max()))
    lo, hi = np.percentile(sample, [contrast.low, contrast.high])
    return (float(lo), float(hi))


def to_uint8_rgb(image, contrast: Contrast = Contrast()) -> np.ndarray:
    """Map a slice to SAM's ``(H, W, 3) uint8`` RGB input (see the module docstring).

    Args:
        image: (H, W) or (H, W, 3) array of any real dtype; NaN/inf allowed.
        contrast: the intensity mapping.

    Returns:
        (H, W, 3) C-contiguous uint8 array.
    """
    arr = check_slice(image)
    limits = intensity_limits(arr, contrast)
    if limits is None:  # uint8 pass-through
        out = arr
    else:
        lo, hi = limits
        if not hi > lo:
            out = np.zeros(arr.shape, dtype=np.uint8)
        else:
            x = arr.astype(np.float32, copy=True)
            x -= np.float32(lo)
            x *= np.float32(255.0 / (hi - lo))
            # NaN -> 0; +-inf are clipped to 255 / 0 below.
            np.nan_to_num(x, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            np.clip(x, 0.0, 255.0, out=x)
            out = np.rint(x, out=x).astype(np.uint8)
    if out.ndim == 2:
        out = np.repeat(out[:, :, None], 3, axis=2)
    return np.ascontiguousarray(out)


class ResizeLongestSide:
    """Resize so that the longest side equals ``target_length``; map coordinates alike.

    The resized size of an (H, W) slice is :meth:`get_preprocess_shape`. Points scale
    per axis: ``x * new_w / W`` and ``y * new_h / H`` (the official SAM convention, so that
    prompts mean the same as with segment-anything).

    ``min_side``: None (SAM's rule: every slice is resized to ``target_length``) or the
    longest side up to which small slices are enlarged: a slice between ``min_side`` and
    ``target_length`` keeps its size (padded), a smaller one is enlarged to ``min_side``,
    a larger one shrinks to ``target_length`` as usual (see :func:`input_scale`; the
    project's CNN models, trained at native pixel scale, set it).
    """

    def __init__(self, target_length: int, min_side: int | None = None) -> None:
        if int(target_length) < 1:
            raise ValueError(f"target_length must be >= 1, got {target_length}")
        if min_side is not None and not int(min_side) >= 1:
            raise ValueError(f"min_side must be None or >= 1, got {min_side}")
        self.target_length = int(target_length)
        # a min_side at or above the input size is SAM's rule
        self.min_side = (
            None if min_side is None or int(min_side) >= self.target_length else int(min_side)
        )

    @staticmethod
    def get_preprocess_shape(
        oldh: int, oldw: int, long_side_length: int, min_side: int | None = None
    ) -> tuple[int, int]:
        """(H, W) -> (new_h, new_w): longest side ``long_side_length`` (or kept / enlarged
        only to ``min_side``, see :func:`input_scale`), sides >= 1."""
        scale = input_scale(oldh, oldw, long_side_length, min_side)
        return max(1, int(oldh * scale + 0.5)), max(1, int(oldw * scale + 0.5))

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.get_preprocess_shape(
            original_size[0], original_size[1], self.target_length, self.min_side
        )

    def key(self) -> str:
        """Cache-key part of the geometry: ``S<target>`` (and ``m<min_side>`` if set)."""
        return f"S{self.target_length}" + ("" if self.min_side is None else f"m{self.min_side}")

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (new_h, new_w, 3) uint8."""
        t = resize_to_input(image, self.target_length, self.min_side)
        return t[0].permute(1, 2, 0).numpy()

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) pixels of the (H, W) slice -> float64 (x, y) of the resized input."""
        coords = np.asarray(coords, dtype=np.float64)
        if coords.shape[-1:] != (2,):
            raise ValueError(
                f"coordinates need a last axis of length 2 (x, y), got {coords.shape}"
            )
        (old_h, old_w), (new_h, new_w) = original_size, self.input_size(original_size)
        return coords * np.array([new_w / old_w, new_h / old_h])

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(B, 4) or (4,) XYXY boxes -> (B, 4) XYXY boxes of the resized input."""
        boxes = np.asarray(boxes, dtype=np.float64)
        if boxes.shape[-1:] != (4,):
            raise ValueError(f"boxes need a last axis of length 4 (XYXY), got {boxes.shape}")
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords, original_size: tuple[int, int]):
        """torch (..., 2) (x, y) -> float32 (x, y) of the resized input (a new tensor)."""
        import torch

        (old_h, old_w), (new_h, new_w) = original_size, self.input_size(original_size)
        scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float32)
        return coords.to(torch.float32) * scale.to(coords.device)

    def apply_boxes_torch(self, boxes, original_size: tuple[int, int]):
        """torch (B, 4) XYXY -> (B, 4) XYXY of the resized input."""
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)


def input_scale(h: int, w: int, target_length: int, min_side: int | None = None) -> float:
    """Factor from an (H, W) slice to the model input: ``target_length / max(H, W)``
    (SAM), or with ``min_side`` no enlarging beyond what brings the longest side to
    ``min_side`` (slices at least that long keep their size up to ``target_length``)."""
    long = max(h, w)
    scale = target_length / long
    if min_side is not None and long < target_length:
        scale = min(scale, max(1.0, min_side / long))
    return scale


def resize_to_input(rgb: np.ndarray, target_length: int, min_side: int | None = None):
    """Resize a (H, W, 3) uint8 slice to longest side ``target_length`` (or as
    :func:`input_scale` says with ``min_side``, see :class:`ResizeLongestSide`).

    Returns a (1, 3, new_h, new_w) uint8 torch tensor (bilinear, antialiased when shrinking).
    """
    import torch
    import torch.nn.functional as F

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"resize_to_input needs (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    h, w = rgb.shape[:2]
    size = ResizeLongestSide.get_preprocess_shape(h, w, target_length, min_side)
    t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # 1 x 3 x H x W
    if (h, w) == size:
        return t.contiguous()
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)

"""Interactive prompt simulation from ground-truth instance masks (SAM paper, section 3).

Coordinates follow SAM: points ``(N, 2)`` float ``(x, y)`` in pixels of the mask's frame
(x = column, y = row); boxes ``(4,)`` XYXY, inclusive pixel indices (x0 <= x1, y0 <= y1),
always inside ``[0, W-1] x [0, H-1]``. Masks are ``(H, W)`` bool, numpy row-major.

- :func:`first_point`: a positive point drawn uniformly from the object.
- :func:`noisy_box`: the object's bounding box with each side jittered by Gaussian noise of
  std ``noise`` x the side length, bounded by ``max_shift`` pixels (SAM: 10 %, 20 px),
  clipped to the image.
- :func:`correction_point`: the next click from the error region between a predicted and
  the true mask; a false-negative pixel gives a positive point (label 1), a false-positive
  pixel a negative one (label 0). ``mode="center"`` takes the pixel farthest inside the
  error region (what a user clicks; used for evaluation), ``mode="uniform"`` a uniform
  error pixel (SAM's training rule).
- :class:`Interaction` keeps the prompts of one object across rounds;
  :func:`round_schedule` gives the rounds of one simulated session: the first prompt,
  ``n_corrections`` correction clicks and ``n_mask_only`` rounds with no new point (only
  the previous low-res logits as mask prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

POSITIVE, NEGATIVE = 1, 0


def _check_mask(mask, name="mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2D (H, W) array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _nonempty(mask: np.ndarray) -> None:
    if not mask.any():
        raise ValueError("the object mask is empty; drop empty objects before prompting")


def first_point(mask, rng: np.random.Generator) -> np.ndarray:
    """A positive point uniform inside ``mask`` (H, W): ``(1, 2)`` float (x, y)."""
    mask = _check_mask(mask)
    _nonempty(mask)
    ys, xs = np.nonzero(mask)
    i = rng.integers(ys.size)
    return np.array([[xs[i], ys[i]]], dtype=np.float32)


def mask_box(mask) -> np.ndarray:
    """Tight XYXY box of ``mask``: ``(4,)`` float, inclusive pixel indices."""
    mask = _check_mask(mask)
    _nonempty(mask)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def noisy_box(
    mask, rng: np.random.Generator, noise: float = 0.1, max_shift: float = 20.0
) -> np.ndarray:
    """The bounding box of ``mask`` with bounded Gaussian jitter: ``(4,)`` XYXY float.

    Each coordinate moves by ``N(0, noise * side)`` (side = box width for x, height for y),
    clipped to ``+-max_shift`` pixels and to the image; x0 <= x1 and y0 <= y1 always.
    """
    if noise < 0 or max_shift < 0:
        raise ValueError(f"noise and max_shift must be >= 0, got {noise}, {max_shift}")
    mask = _check_mask(mask)
    box = mask_box(mask)
    h, w = mask.shape
    side = np.array([box[2] - box[0] + 1, box[3] - box[1] + 1] * 2, dtype=np.float32)
    shift = np.clip(rng.normal(0, 1, 4) * noise * side, -max_shift, max_shift)
    out = box + shift.astype(np.float32)
    out[[0, 2]] = np.clip(out[[0, 2]], 0, w - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, h - 1)
    if out[0] > out[2]:
        out[[0, 2]] = out[[2, 0]]
    if out[1] > out[3]:
        out[[1, 3]] = out[[3, 1]]
    return out


def correction_point(
    pred, mask, rng: np.random.Generator | None = None, mode: str = "center"
) -> tuple[np.ndarray, int] | None:
    """Next corrective click from the error between ``pred`` and ``mask`` (both (H, W)).

    Returns ``((1, 2) float (x, y), label)`` with label 1 in a false-negative pixel
    (object missed) and 0 in a false-positive pixel, or None when there is no error.
    ``mode="center"``: the error pixel farthest from the error region's boundary (the
    image border counts as boundary), deterministic. ``mode="uniform"``: a uniformly
    drawn error pixel (needs ``rng``).
    """
    pred, mask = _check_mask(pred, "pred"), _check_mask(mask)
    if pred.shape != mask.shape:
        raise ValueError(f"pred {pred.shape} and mask {mask.shape} must have the same shape")
    fn, fp = mask & ~pred, pred & ~mask
    if not (fn.any() or fp.any()):
        return None
    if mode == "uniform":
        if rng is None:
            raise ValueError("mode='uniform' needs an rng")
        ys, xs = np.nonzero(fn | fp)
        i = rng.integers(ys.size)
        y, x = ys[i], xs[i]
        label = POSITIVE if fn[y, x] else NEGATIVE
    elif mode == "center":
        # distance to the nearest non-error pixel, the border padded as non-error
        d_fn = ndi.distance_transform_edt(np.pad(fn, 1))[1:-1, 1:-1]
        d_fp = ndi.distance_transform_edt(np.pad(fp, 1))[1:-1, 1:-1]
        if d_fn.max() >= d_fp.max():
            y, x = np.unravel_index(np.argmax(d_fn), fn.shape)
            label = POSITIVE
        else:
            y, x = np.unravel_index(np.argmax(d_fp), fp.shape)
            label = NEGATIVE
    else:
        raise ValueError(f"mode must be 'center' or 'uniform', got {mode!r}")
    return np.array([[x, y]], dtype=np.float32), label


def perturb_mask(
    mask, rng: np.random.Generator, shift: float = 0.08, grow: float = 0.12
) -> np.ndarray:
    """``mask`` (H, W) as a neighbouring slice of the same object might show it.

    The mask is moved by ``N(0, shift * r)`` pixels along each axis and grown (dilation)
    or shrunk (erosion) by ``round(N(0, grow * r))`` pixels, both bounded by
    ``max(1, r / 3)`` pixels, where ``r`` is the radius of a disc of the object's area. An
    erosion that would empty the mask is skipped. Returns a new (H, W) bool mask (may
    be empty only if ``mask`` is).
    """
    mask = _check_mask(mask)
    _nonempty(mask)
    r = float(np.sqrt(mask.sum() / np.pi))
    bound = max(1.0, r / 3)
    dy, dx = np.clip(rng.normal(0, shift * r, 2), -bound, bound).round().astype(int)
    out = np.roll(mask, (dy, dx), axis=(0, 1))
    # pixels rolled around the border come back on the other side: clear them
    if dy > 0:
        out[:dy] = False
    elif dy < 0:
        out[dy:] = False
    if dx > 0:
        out[:, :dx] = False
    elif dx < 0:
        out[:, dx:] = False
    g = int(np.clip(round(rng.normal(0, grow * r)), -bound, bound))
    if g > 0:
        out = ndi.binary_dilation(out, iterations=g)
    elif g < 0:
        eroded = ndi.binary_erosion(out, iterations=-g)
        out = eroded if eroded.any() else out
    return out if out.any() else mask.copy()


@dataclass
class Interaction:
    """Prompts of one object across rounds.

    ``points``: (N, 2) float (x, y); ``labels``: (N,) int (1 positive, 0 negative);
    ``box``: (4,) XYXY or None; ``mask_input``: previous low-res logits or None.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    def add_point(self, xy: np.ndarray, label: int) -> None:
        self.points = np.concatenate([self.points, np.asarray(xy, np.float32).reshape(1, 2)])
        self.labels = np.concatenate([self.labels, np.array([label], np.int64)])


def start(mask, rng: np.random.Generator, kind: str = "point", **box_kw) -> Interaction:
    """First prompt for ``mask``: ``kind`` "point" (uniform positive) or "box" (noisy box)."""
    if kind == "point":
        it = Interaction()
        it.add_point(first_point(mask, rng)[0], POSITIVE)
        return it
    if kind == "box":
        return Interaction(box=noisy_box(mask, rng, **box_kw))
    raise ValueError(f"kind must be 'point' or 'box', got {kind!r}")


def round_schedule(n_corrections: int, n_mask_only: int = 0) -> list[str]:
    """Rounds of one session: ``["first", "click" x n_corrections, "mask" x n_mask_only]``.

    "click": a correction point plus the previous logits as mask prompt; "mask": only the
    previous logits (SAM's rounds with no new point).
    """
    if n_corrections < 0 or n_mask_only < 0:
        raise ValueError("n_corrections and n_mask_only must be >= 0")
    return ["first"] + ["click"] * n_corrections + ["mask"] * n_mask_only

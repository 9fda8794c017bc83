"""Low-resolution mask logits -> masks at the slice's resolution.

Geometry. The low-res grid (lh, lw) (256 x 256 for SAM) covers the padded S x S encoder
input (S = ``img_size``), whose top-left (h', w') holds the resized slice. With half-pixel
centres, slice row i sits at input row ``y = (i + 0.5) * h' / H - 0.5`` and that at low-res
row ``u = (y + 0.5) * lh / S - 0.5 = (i + 0.5) / s - 0.5`` with ``s = H * S / (h' * lh)``.
So one bilinear interpolation with scale factor ``s`` of the low-res rows that reach the
valid region gives the logits at the slice's resolution (:func:`upsample_logits`).
segment-anything's ``postprocess_masks`` resamples twice, (lh, lw) -> (S, S) -> crop
(h', w') -> (H, W); its intermediate grid rounds the piecewise-linear interpolant near the
low-res sample points, so logits differ slightly and thresholded masks in a few boundary
pixels (measured in tests/core/test_predictor.py).

Cheap threshold (:func:`upsample_binary`). A bilinear value is a convex combination of its
four low-res neighbours, so where all four lie above the threshold the pixel is inside and
where none does it is outside. Only output pixels in low-res cells whose corners disagree
(along the mask's outline) need interpolated values; all others copy their cell's
decision. The result equals ``upsample_logits(...) > threshold`` (up to float rounding of
values within ~1e-6 of the threshold) at a fraction of the cost for large slices.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

#: Above this fraction of a mask's pixels in mixed cells, :func:`upsample_binary` interpolates
#: all of that mask.
_MAX_MIXED_FRACTION = 0.15


def _geometry(low_res, input_size, original_size, img_size):
    (ih, iw), (oh, ow) = input_size, original_size
    lh, lw = low_res.shape[-2:]
    sy, sx = oh * img_size / (ih * lh), ow * img_size / (iw * lw)  # output px per low-res px
    # Low-res rows/cols that the valid region reaches, plus the interpolation neighbour.
    nh = min(lh, math.ceil(ih * lh / img_size) + 1)
    nw = min(lw, math.ceil(iw * lw / img_size) + 1)
    # One replicated row/col beyond: interpolation clamps at the last row anyway, and with
    # it floor((n + 1) * s) >= H holds despite rounding, and every cell has 4 corners.
    x = F.pad(low_res[..., :nh, :nw], (0, 1, 0, 1), mode="replicate")
    return x, sy, sx


def upsample_logits(
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    img_size: int,
) -> torch.Tensor:
    """(B, M, lh, lw) low-res logits -> (B, M, H, W) logits, one bilinear interpolation.

    Args:
        low_res: (B, M, lh, lw) logits over the padded square encoder input.
        input_size: (h', w') of the resized slice.
        original_size: (H, W) of the slice.
        img_size: S, the encoder's square input side.
    """
    x, sy, sx = _geometry(low_res, input_size, original_size, img_size)
    b, m, hh, ww = x.shape
    # One channel per image: torch's CPU bilinear kernel is ~2x faster for C = 1 than C = 3.
    out = F.interpolate(
        x.reshape(b * m, 1, hh, ww),
        scale_factor=(sy, sx),
        mode="bilinear",
        align_corners=False,
        recompute_scale_factor=False,
    )
    oh, ow = original_size
    return out.view(b, m, *out.shape[-2:])[..., :oh, :ow]


def _source_index(n_out: int, scale: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower neighbour index and its weight for each output pixel.

    The same float32 arithmetic as torch's bilinear kernel with ``align_corners=False``
    and a given scale factor: ``src = (1 / scale) * (i + 0.5) - 0.5``, clamped at 0.
    """
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    src = (inv * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp_(min=0)
    i0 = src.floor()
    return i0.long().to(device), (src - i0).to(device)


def upsample_binary(
    low_res: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    img_size: int,
    threshold: float = 0.0,
) -> torch.Tensor:
    """``upsample_logits(...) > threshold`` computed only where it is not already decided.

    Returns:
        (B, M, H, W) bool masks.
    """
    x, sy, sx = _geometry(low_res, input_size, original_size, img_size)
    oh, ow = original_size
    dev = x.device
    iy, ly = _source_index(oh, sy, dev)  # (H,) cell row, weight of the row below
    ix, lx = _source_index(ow, sx, dev)  # (W,)
    pos = x > threshold  # B x M x (nh+1) x (nw+1)
    c00, c10, c01, c11 = pos[..., :-1, :-1], pos[..., 1:, :-1], pos[..., :-1, 1:], pos[..., 1:, 1:]
    inside = c00 & c10 & c01 & c11  # cell decided: inside
    mixed = (c00 | c10 | c01 | c11) & ~inside  # corners disagree
    # Ragged masks (e.g. random weights): plain interpolation is cheaper. Decided per mask,
    # so that a mask does not depend on the other masks of the batch.
    per_mask = mixed.flatten(-2).sum(-1)  # B x M
    ragged = per_mask * (max(sy, 1.0) * max(sx, 1.0)) > _MAX_MIXED_FRACTION * oh * ow
    if bool(ragged.all()):
        return upsample_logits(low_res, input_size, original_size, img_size) > threshold
    if bool(ragged.any()):
        mixed &= ~ragged[..., None, None]
    n_mixed = int(mixed.sum())
    # Every pixel copies its cell's "inside" decision (columns first, on the small array,
    # then whole rows; numpy's take is several times faster than index_select here) ...
    if dev.type == "cpu":
        out_np = np.take(np.take(inside.numpy(), ix.numpy(), axis=-1), iy.numpy(), axis=-2)
        out = torch.from_numpy(out_np)
    else:
        out = inside.index_select(-1, ix).index_select(-2, iy)  # B x M x H x W
    if bool(ragged.any()):  # B x M x H x W bool, sharing out_np's memory on the CPU
        plain = upsample_logits(low_res[ragged][None], input_size, original_size, img_size)
        out[ragged] = plain[0] > threshold
    if n_mixed == 0:
        return out
    cells = mixed.nonzero()  # K x 4 (b, m, a, c)
    # ... and pixels of mixed cells get interpolated values. The pixels of cell row a are
    # the output rows with iy == a, a contiguous range since iy is non-decreasing.
    nh, nw = x.shape[-2] - 1, x.shape[-1] - 1
    row_start = torch.searchsorted(iy, torch.arange(nh + 1, device=dev))
    col_start = torch.searchsorted(ix, torch.arange(nw + 1, device=dev))
    by = int((row_start[1:] - row_start[:-1]).max())
    bx = int((col_start[1:] - col_start[:-1]).max())
    kb, km, ka, kc = cells.unbind(1)
    rows = row_start[ka, None] + torch.arange(by, device=dev)  # K x by
    cols = col_start[kc, None] + torch.arange(bx, device=dev)  # K x bx
    ok = (rows < row_start[ka + 1, None])[:, :, None] & (cols < col_start[kc + 1, None])[:, None]
    rows_c, cols_c = rows.clamp(max=oh - 1), cols.clamp(max=ow - 1)
    wy, wx = ly[rows_c][:, :, None], lx[cols_c][:, None, :]  # K x by x 1, K x 1 x bx
    v00, v10 = x[kb, km, ka, kc][:, None, None], x[kb, km, ka + 1, kc][:, None, None]
    v01, v11 = x[kb, km, ka, kc + 1][:, None, None], x[kb, km, ka + 1, kc + 1][:, None, None]
    top = v00 + (v01 - v00) * wx
    bottom = v10 + (v11 - v10) * wx
    val = (top + (bottom - top) * wy) > threshold  # K x by x bx
    sel = ok.nonzero(as_tuple=True)  # (k, oy, ox) of real pixels
    idx = (kb[sel[0]], km[sel[0]], rows_c[sel[0], sel[1]], cols_c[sel[0], sel[2]])
    if dev.type == "cpu":  # numpy's fancy assignment is much faster than index_put_
        out_np[tuple(i.numpy() for i in idx)] = val[sel].numpy()
    else:
        out[idx] = val[sel]
    return out


def _grow(mask: np.ndarray, d: int) -> np.ndarray:
    """Dilation of the last two axes by a (2d + 1)-square (separable, by slicing)."""
    out = mask.copy()
    for axis in (-2, -1):
        src = out.copy()
        n = src.shape[axis]
        for k in range(1, d + 1):
            if k >= n:
                break
            lo = [slice(None)] * src.ndim
            hi = [slice(None)] * src.ndim
            lo[axis], hi[axis] = slice(0, n - k), slice(k, n)
            out[tuple(lo)] |= src[tuple(hi)]
            out[tuple(hi)] |= src[tuple(lo)]
    return out


def keep_clicked_parts(
    low_res: torch.Tensor,
    points_xy: np.ndarray,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    img_size: int,
    threshold: float = 0.0,
) -> torch.Tensor:
    """Drop the parts of each mask that no positive click touches.

    Parts are found on the low-res grid, so this is cheap at any slice size: positive
    low-res pixels (``low_res > threshold``, on the cells that reach the slice) closer than
    ``2 d + 2`` cells (Chebyshev) belong to one part, ``d = ceil(1 / min(1, sy, sx))`` for
    ``sy, sx`` output pixels per low-res cell (``d = 1`` unless a tiny slice is enlarged
    more than 4x). A click touches the parts among the four corners of the cell its pixel
    interpolates from. Parts no click touches get their logits mirrored below the
    threshold, so the upsampled mask (:func:`upsample_binary` / :func:`upsample_logits`)
    loses exactly the pixels interpolated from them and keeps every other pixel. Two
    neighbouring output pixels interpolate from cells whose corners lie within ``d + 1``
    cells of each other, so a connected region of the upsampled mask always lies in one
    part: what is dropped are whole regions apart from the clicked ones. A mask that no
    click touches (the model ignored the clicks) is left whole.

    Args:
        low_res: (B, M, lh, lw) logits (not modified).
        points_xy: positive clicks, (x, y) pixels of the slice: an (N, 2) array for every
            mask, or a sequence of B such arrays, one per batch row.
        input_size, original_size, img_size: as for :func:`upsample_logits`.

    Returns:
        (B, M, lh, lw) logits.
    """
    from scipy import ndimage

    if isinstance(points_xy, np.ndarray) and points_xy.ndim == 2:
        points_xy = [points_xy] * low_res.shape[0]
    pts = [np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in points_xy]
    if len(pts) != low_res.shape[0]:
        raise ValueError(f"{len(pts)} point sets for a batch of {low_res.shape[0]} masks")
    (ih, iw), (oh, ow) = input_size, original_size
    lh, lw = low_res.shape[-2:]
    nh = min(lh, math.ceil(ih * lh / img_size) + 1)
    nw = min(lw, math.ceil(iw * lw / img_size) + 1)
    sy, sx = oh * img_size / (ih * lh), ow * img_size / (iw * lw)

    def corners(v, n_out, s, n):
        # the cell each clicked pixel interpolates from, as in upsample_binary
        cell = _source_index(n_out, s, "cpu")[0].numpy()
        a = cell[np.clip(np.round(v), 0, n_out - 1).astype(int)]
        return np.stack([np.minimum(a, n - 1), np.minimum(a + 1, n - 1)], -1)  # (N, 2)

    arr = low_res.detach().cpu().numpy()
    out = None
    plane = np.zeros((3, 3, 3), bool)
    plane[1] = True  # 8-connected within a mask, never across the masks of a batch row
    d = math.ceil(1.0 / min(1.0, sy, sx))
    for b in range(arr.shape[0]):
        if not len(pts[b]):
            continue
        rows = corners(pts[b][:, 1], oh, sy, nh)
        cols = corners(pts[b][:, 0], ow, sx, nw)
        rr = np.repeat(rows, 2, axis=1).ravel()  # the 4 corners of each click's cell
        cc = np.tile(cols, (1, 2)).ravel()
        pos = arr[b, :, :nh, :nw] > threshold  # M x nh x nw
        if not pos.any():
            continue
        parts, _ = ndimage.label(_grow(pos, d), structure=plane)
        parts *= pos
        for m in range(arr.shape[1]):
            touched = np.unique(parts[m, rr, cc])
            touched = touched[touched > 0]
            if touched.size == 0:
                continue  # the model ignored the clicks: the mask stays whole
            drop = pos[m] & ~np.isin(parts[m], touched)
            if not drop.any():
                continue
            if out is None:
                out = arr.copy()
            view = out[b, m, :nh, :nw]
            view[drop] = 2 * threshold - view[drop]  # mirrored below the threshold
    return low_res if out is None else torch.from_numpy(out).to(low_res.device)

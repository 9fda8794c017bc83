"""Automatic "segment everything" for slices and volumes (no Qt, no napari).

A regular grid of single-point prompts runs through the mask decoder against the cached
image embedding. Each point gives three candidate masks; a candidate is kept when its
predicted IoU and its stability score pass thresholds; duplicates are removed by
non-maximum suppression; the survivors are upsampled, cleaned of small holes and islands,
and painted into an instance label image in which higher-scoring masks win.

Speed (a 32 x 32 grid is 1024 decoder runs; see docs/performance.md):

- the decoder runs through :class:`~napari_sam._point_decoder.PointDecoder`, which does
  the prompt-independent work once per image and skips the mask upsampling of outputs
  whose predicted IoU already fails; for models that render points into the dense prompt
  (nsam) it renders each point only in a window around it (exact);
- filtering (stability, area, boxes, NMS) happens on the decoder's 256 x 256 logits (boxes
  and areas of kept masks are computed once, not at every NMS round); only
  the kept masks are upsampled, each inside its own bounding window, with the same
  composite bilinear resize as ``Sam.postprocess_masks``;
- with ``skip_covered_points`` (default on) the grid is visited coarse to fine (every 4th
  point, every 2nd, the rest) and a point that falls inside an already accepted mask is not
  prompted - it would mostly reproduce that mask. Set it off for the exhaustive search.

Stability and areas are measured on the low-resolution logits (one logit per 4 x 4 pixels
of the model's 1024 input frame), not on the full-resolution masks: a close approximation
for objects larger than a few low-resolution pixels.

Volumes: :func:`segment_volume` segments slice by slice and links the 2-D instances into
3-D objects with :func:`napari_sam.stitching.stitch_slices`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from napari_sam import amg_ops
from napari_sam.stitching import Stitcher, StitchParams

__all__ = [
    "AutomaticParams",
    "MaskRecord",
    "Cancelled",
    "generate_masks",
    "segment_slice",
    "segment_volume",
    "masks_to_labels",
]

Progress = Callable[[int, int], Any]
ShouldCancel = Callable[[], bool]


class Cancelled(Exception):
    """Raised when ``should_cancel()`` returned True; partial results are discarded."""


@dataclass(frozen=True)
class AutomaticParams:
    """Parameters of automatic segmentation (defaults follow SAM's automatic generator,
    except where noted).

    points_per_side: the grid has points_per_side**2 point prompts per crop.
    points_per_batch: points decoded between progress reports / NMS merges.
    pred_iou_thresh: drop masks whose predicted IoU is below this.
    stability_score_thresh: drop masks whose stability score is below this.
    stability_score_offset: logit offset (+/-) around the mask threshold for stability.
    nms_iou_thresh: a mask whose mask IoU with a higher-scored kept mask exceeds this is a
        duplicate.
    crop_n_layers: extra layers of zoomed-in crops (layer k: 2**k x 2**k crops); each crop
        runs the image encoder, so this is slow; 0 disables.
    crop_overlap_ratio: overlap of neighbouring crops, fraction of the shorter image side.
    crop_n_points_downscale_factor: points per side in layer k = points_per_side / f**k.
    min_region_area: holes and islands smaller than this (pixels) are filled / removed
        (project default 25; SAM's default 0 disables).
    min_object_area: objects with fewer visible pixels in the label image are dropped.
    max_area_fraction: masks covering more than this fraction of the (crop) image - in
        practice the background - are not output (they still count for point skipping).
    skip_covered_points: visit the grid coarse to fine and skip points inside accepted
        masks (project addition; False = exhaustive, as SAM's generator).
    precision: decoder matmul precision, "auto" | "float32" | "bfloat16" | "float16".
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    nms_iou_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_region_area: int = 25
    min_object_area: int = 25
    max_area_fraction: float = 0.5
    skip_covered_points: bool = True
    precision: str = "auto"

    @classmethod
    def for_model(cls, model, **overrides) -> AutomaticParams:
        """Parameters for ``model`` (a SAM model or a predictor): SAM's defaults, then the
        model's own recommended thresholds (``model.automatic_defaults``, e.g. the bundled
        model's, calibrated on held-out synthetic scenes and stored beside its weights;
        its predicted IoUs are lower than official SAM's), then ``overrides``."""
        model = getattr(model, "model", model)
        fields = set(cls.__dataclass_fields__)
        recommended = {
            k: v for k, v in (getattr(model, "automatic_defaults", None) or {}).items()
            if k in fields
        }  # fmt: skip
        return cls(**{**recommended, **overrides})

    def __post_init__(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(
            int(self.points_per_side) == self.points_per_side and self.points_per_side >= 1,
            f"points_per_side must be a positive integer, got {self.points_per_side!r}",
        )
        need(
            self.points_per_batch >= 1,
            f"points_per_batch must be >= 1, got {self.points_per_batch!r}",
        )
        need(
            0 <= self.nms_iou_thresh <= 1,
            f"nms_iou_thresh must be in [0, 1], got {self.nms_iou_thresh!r}",
        )
        need(
            0 <= self.stability_score_thresh <= 1,
            f"stability_score_thresh must be in [0, 1], got {self.stability_score_thresh!r}",
        )
        need(
            self.stability_score_offset >= 0,
            f"stability_score_offset must be >= 0, got {self.stability_score_offset!r}",
        )
        need(self.crop_n_layers >= 0, f"crop_n_layers must be >= 0, got {self.crop_n_layers!r}")
        need(
            0 <= self.crop_overlap_ratio < 1,
            f"crop_overlap_ratio must be in [0, 1), got {self.crop_overlap_ratio!r}",
        )
        need(
            self.crop_n_points_downscale_factor >= 1, "crop_n_points_downscale_factor must be >= 1"
        )
        need(
            self.min_region_area >= 0 and self.min_object_area >= 0,
            "min_region_area and min_object_area must be >= 0",
        )
        need(
            0 < self.max_area_fraction <= 1,
            f"max_area_fraction must be in (0, 1], got {self.max_area_fraction!r}",
        )


@dataclass
class MaskRecord:
    """One automatically found mask.

    mask: (h, w) bool window whose top-left pixel is (row0, col0) of the image.
    score: predicted IoU; stability: stability score; point: (x, y) prompt in image pixels;
    crop: (x0, y0, x1, y1) crop it came from (exclusive ends); layer: crop layer.
    """

    row0: int
    col0: int
    mask: np.ndarray
    score: float
    stability: float
    point: tuple[float, float]
    crop: tuple[int, int, int, int]
    layer: int = 0
    area: int = field(init=False)

    def __post_init__(self):
        self.area = int(self.mask.sum())

    @property
    def box(self) -> tuple[int, int, int, int]:
        """XYXY inclusive bounding box in image pixels."""
        rows = np.flatnonzero(self.mask.any(1))
        cols = np.flatnonzero(self.mask.any(0))
        return (
            self.col0 + int(cols[0]),
            self.row0 + int(rows[0]),
            self.col0 + int(cols[-1]),
            self.row0 + int(rows[-1]),
        )

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask as a full (H, W) bool image."""
        out = np.zeros(shape, dtype=bool)
        h, w = self.mask.shape
        out[self.row0 : self.row0 + h, self.col0 : self.col0 + w] = self.mask
        return out


# -- predictor / embedding adapters ------------------------------------------------------


@dataclass
class _Embedding:
    features: Any  # torch.Tensor (1, C, h, w)
    input_size: tuple[int, int]
    original_size: tuple[int, int]


def _read_embedding(obj) -> _Embedding:
    """Embedding from a predictor (ours: ``get_embedding()``; official: attributes) or from
    an embedding object / dict with ``features`` (or ``image_embedding``), ``input_size``
    and ``original_size``."""
    if hasattr(obj, "get_embedding"):
        obj = obj.get_embedding()
    elif hasattr(obj, "is_image_set") and not obj.is_image_set:
        raise RuntimeError("the predictor has no image: call set_image(image) first")

    def get(*names):
        for n in names:
            v = obj.get(n) if isinstance(obj, dict) else getattr(obj, n, None)
            if v is not None:
                return v
        raise TypeError(
            f"cannot read {names[0]!r} from {type(obj).__name__}: pass a predictor or an "
            "embedding with features (1, C, h, w), input_size and original_size"
        )

    import torch

    feats = torch.as_tensor(get("features", "image_embedding", "image_embeddings", "embedding"))
    if feats.ndim == 3:
        feats = feats[None]
    return _Embedding(
        feats,
        tuple(int(v) for v in get("input_size")),
        tuple(int(v) for v in get("original_size")),
    )


def _embed_crop(predictor, crop_image) -> _Embedding:
    """Encode a crop with the predictor, then restore the predictor's previous image."""
    if hasattr(predictor, "get_embedding") and hasattr(predictor, "set_embedding"):
        saved = predictor.get_embedding()
        predictor.set_image(crop_image)
        emb = _read_embedding(predictor)
        predictor.set_embedding(saved)
        return emb
    names = ("features", "original_size", "input_size", "is_image_set")
    saved = {n: getattr(predictor, n, None) for n in names}
    predictor.set_image(crop_image)
    emb = _read_embedding(predictor)
    for n, v in saved.items():
        setattr(predictor, n, v)
    return emb


def _model_of(predictor):
    model = getattr(predictor, "model", None)
    if model is None or not hasattr(model, "mask_decoder"):
        raise TypeError(f"expected a SamPredictor (with .model), got {type(predictor).__name__}")
    return model


# -- one crop ----------------------------------------------------------------------------


class _Ticker:
    def __init__(self, total, progress, should_cancel):
        self.done, self.total = 0, max(int(total), 1)
        self.progress, self.should_cancel = progress, should_cancel

    def __call__(self, n=1):
        if n <= 0:
            return
        self.done = min(self.done + n, self.total)
        if self.progress is not None:
            self.progress(self.done, self.total)
        self.check()

    def check(self):
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("automatic segmentation cancelled")


def _n_batches(n_points_side: int, ppb: int) -> int:
    levels = amg_ops.grid_levels(n_points_side)
    return sum(math.ceil(int((levels == lv).sum()) / ppb) for lv in np.unique(levels))


class _CropRun:
    """Automatic masks for one crop whose embedding is set in ``decoder``."""

    def __init__(self, decoder, emb: _Embedding, params: AutomaticParams, img_size: int):
        import torch

        self.torch = torch
        self.decoder, self.p = decoder, params
        self.ch, self.cw = emb.original_size
        self.ih, self.iw = emb.input_size
        hl, wl = (4 * s for s in emb.features.shape[-2:])  # low-res logits size
        self.lowres = (hl, wl)
        # composite bilinear resize low-res -> img_size frame -> crop [:ih, :iw] -> original
        ry = (
            amg_ops.interp_matrix(self.ch, self.ih)
            @ amg_ops.interp_matrix(img_size, hl)[: self.ih]
        )
        rx = (
            amg_ops.interp_matrix(self.cw, self.iw)
            @ amg_ops.interp_matrix(img_size, wl)[: self.iw]
        )
        self.vh = int(np.flatnonzero(ry.any(0))[-1]) + 1  # low-res rows that matter
        self.vw = int(np.flatnonzero(rx.any(0))[-1]) + 1
        self.ry = torch.from_numpy(ry[:, : self.vh]).float()
        self.rx = torch.from_numpy(rx[:, : self.vw]).float()
        self.frame_to_lowres = hl / img_size
        # candidates kept so far
        self.masks = torch.zeros(0, self.vh, self.vw, dtype=torch.bool)
        self.logits = torch.zeros(0, self.vh, self.vw, dtype=torch.float16)
        self.scores = torch.zeros(0)
        self.stab = torch.zeros(0)
        self.points = np.zeros((0, 2))
        self.boxes = torch.zeros(0, 4, dtype=torch.long)
        self.areas = torch.zeros(0)

    def run(self, n_side: int, tick: _Ticker) -> None:
        torch, p = self.torch, self.p
        grid = amg_ops.point_grid(n_side) * [self.cw, self.ch]  # (N, 2) (x, y) crop pixels
        frame = grid * [self.iw / self.cw, self.ih / self.ch]  # (x, y) model input frame
        levels = amg_ops.grid_levels(n_side)
        for lv in np.unique(levels):
            idx = np.flatnonzero(levels == lv)
            planned = math.ceil(len(idx) / p.points_per_batch)
            if p.skip_covered_points and len(self.scores):
                idx = idx[~self._covered(frame[idx])]
            batches = [
                idx[i : i + p.points_per_batch] for i in range(0, len(idx), p.points_per_batch)
            ]
            for b in batches:
                self._add(
                    self.decoder.decode(
                        torch.from_numpy(frame[b]).float(), min_iou=p.pred_iou_thresh
                    ),
                    grid[b],
                )
                tick()
            tick(planned - len(batches))

    def _covered(self, frame_pts: np.ndarray) -> np.ndarray:
        torch = self.torch
        m = self.masks.float()[:, None]
        eroded = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)  # 1 px erosion
        cover = (eroded[:, 0] > 0).any(0).numpy()
        ij = np.floor(frame_pts[:, ::-1] * self.frame_to_lowres).astype(int)
        ij = np.minimum(ij, [self.vh - 1, self.vw - 1])
        return cover[ij[:, 0], ij[:, 1]]

    def _add(self, dec, pts: np.ndarray) -> None:
        torch, p = self.torch, self.p
        if dec.logits.shape[0] == 0:
            return
        logits = dec.logits[:, : self.vh, : self.vw]
        stab = amg_ops.stability_score(logits, 0.0, p.stability_score_offset)
        masks = logits > 0
        ok = (stab >= p.stability_score_thresh) & masks.flatten(1).any(1)
        if not ok.any():
            return
        index = dec.index[ok]
        new = masks[ok]
        self.boxes = torch.cat([self.boxes, amg_ops.boxes_from_masks(new)])
        self.areas = torch.cat([self.areas, new.flatten(1).sum(1).float()])
        self.masks = torch.cat([self.masks, new])
        self.logits = torch.cat([self.logits, logits[ok].half()])
        self.scores = torch.cat([self.scores, dec.iou_predictions[index[:, 0], index[:, 1]]])
        self.stab = torch.cat([self.stab, stab[ok]])
        self.points = np.concatenate([self.points, pts[index[:, 0].numpy()]])
        keep = amg_ops.mask_nms(
            self.masks, self.scores, p.nms_iou_thresh, boxes=self.boxes, areas=self.areas
        )
        self.masks, self.logits = self.masks[keep], self.logits[keep]
        self.boxes, self.areas = self.boxes[keep], self.areas[keep]
        self.scores, self.stab = self.scores[keep], self.stab[keep]
        self.points = self.points[keep.numpy()]

    def records(self, crop_box, layer: int, image_shape) -> list[MaskRecord]:
        """Upsample the kept masks into crop pixels (each inside its window) and clean them."""
        p = self.p
        x0c, y0c, x1c, y1c = crop_box
        h_img, w_img = image_shape
        out = []
        boxes = self.boxes
        max_area = p.max_area_fraction * self.ch * self.cw
        for i in range(len(self.scores)):
            bx0, by0, bx1, by1 = (int(v) for v in boxes[i])
            rows = np.flatnonzero(self.ry[:, by0 : by1 + 1].numpy().any(1))
            cols = np.flatnonzero(self.rx[:, bx0 : bx1 + 1].numpy().any(1))
            r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
            ry, rx = self.ry[r0:r1], self.rx[c0:c1]
            ly = np.flatnonzero(ry.numpy().any(0))
            lx = np.flatnonzero(rx.numpy().any(0))
            ly0, ly1, lx0, lx1 = ly[0], ly[-1] + 1, lx[0], lx[-1] + 1
            win = ry[:, ly0:ly1] @ self.logits[i, ly0:ly1, lx0:lx1].float() @ rx[:, lx0:lx1].T
            mask = amg_ops.remove_small_regions((win > 0).numpy(), p.min_region_area)
            area = int(mask.sum())
            if area == 0 or area > max_area:
                continue
            rec = MaskRecord(
                int(r0) + y0c,
                int(c0) + x0c,
                mask,
                float(self.scores[i]),
                float(self.stab[i]),
                tuple(self.points[i] + [x0c, y0c]),
                tuple(crop_box),
                layer,
            )
            if layer > 0 and _near_crop_edge(rec.box, crop_box, (h_img, w_img)):
                continue
            out.append(rec)
        return out


def _near_crop_edge(box, crop_box, image_shape, tol: int = 8) -> bool:
    """True if the box touches an edge of the crop that is not an edge of the image."""
    x0, y0, x1, y1 = box
    cx0, cy0, cx1, cy1 = crop_box
    h, w = image_shape
    return bool(
        (cx0 > 0 and x0 <= cx0 + tol)
        or (cy0 > 0 and y0 <= cy0 + tol)
        or (cx1 < w and x1 >= cx1 - 1 - tol)
        or (cy1 < h and y1 >= cy1 - 1 - tol)
    )


def _merge_crops(records: list[MaskRecord], thresh: float) -> list[MaskRecord]:
    """Cross-crop duplicates: mask-IoU NMS on full-resolution windows, masks from deeper
    (more zoomed-in) crop layers preferred, then higher predicted IoU."""
    n = len(records)
    if n < 2:
        return records
    order = sorted(range(n), key=lambda i: (-records[i].layer, -records[i].score))
    boxes = np.array([r.box for r in records])
    keep, kept = [], []
    for i in order:
        bi, ri = boxes[i], records[i]
        dup = False
        for j in kept:
            bj, rj = boxes[j], records[j]
            ix0, iy0 = max(bi[0], bj[0]), max(bi[1], bj[1])
            ix1, iy1 = min(bi[2], bj[2]), min(bi[3], bj[3])
            if (
                ix1 < ix0
                or iy1 < iy0
                or (ix1 - ix0 + 1) * (iy1 - iy0 + 1) < thresh * max(ri.area, rj.area)
            ):
                continue
            a = ri.mask[iy0 - ri.row0 : iy1 - ri.row0 + 1, ix0 - ri.col0 : ix1 - ri.col0 + 1]
            b = rj.mask[iy0 - rj.row0 : iy1 - rj.row0 + 1, ix0 - rj.col0 : ix1 - rj.col0 + 1]
            inter = int((a & b).sum())
            if inter / (ri.area + rj.area - inter) > thresh:
                dup = True
                break
        if not dup:
            kept.append(i)
    keep = sorted(kept, key=lambda i: -records[i].score)
    return [records[i] for i in keep]


# -- public API --------------------------------------------------------------------------


def _prepare_image(image):
    if image is None:
        return None
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"expected a 2-D image (H, W) or an RGB image (H, W, 3), got shape {arr.shape}; "
            "for a stack use segment_volume"
        )
    return arr


def generate_masks(
    predictor,
    image=None,
    params: AutomaticParams | None = None,
    *,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
    _decoder=None,
) -> list[MaskRecord]:
    """All masks of one image (possibly overlapping), highest score first.

    predictor: a SamPredictor. image: (H, W) or (H, W, 3), set on the predictor (whose
    cache makes a repeated image free); None uses the image already set on the predictor
    (not possible with crop layers). progress(done, total) is called after each batch of
    points; should_cancel() is polled as often and raises :class:`Cancelled` when True.
    """
    from napari_sam._point_decoder import PointDecoder

    p = params or AutomaticParams.for_model(predictor)
    model = _model_of(predictor)
    image = _prepare_image(image)
    if image is not None:
        predictor.set_image(image)
    elif p.crop_n_layers > 0:
        raise ValueError("crop layers need the image: pass image=... to generate_masks")
    emb = _read_embedding(predictor)
    shape = emb.original_size
    boxes, layers = amg_ops.crop_boxes(shape, p.crop_n_layers, p.crop_overlap_ratio)
    sides = [max(1, int(p.points_per_side / p.crop_n_points_downscale_factor**k)) for k in layers]
    tick = _Ticker(sum(_n_batches(s, p.points_per_batch) for s in sides), progress, should_cancel)
    tick.check()
    decoder = _decoder or PointDecoder(model, precision=p.precision)
    img_size = int(model.image_encoder.img_size)
    records: list[MaskRecord] = []
    for box, layer, side in zip(boxes, layers, sides, strict=True):
        if layer == 0:
            crop_emb = emb
        else:
            x0, y0, x1, y1 = box
            crop_emb = _embed_crop(predictor, image[y0:y1, x0:x1])
        decoder.set_embedding(crop_emb.features[:1])  # the slice itself, no flipped views
        run = _CropRun(decoder, crop_emb, p, img_size)
        run.run(side, tick)
        records += run.records(box, layer, shape)
    if len(boxes) > 1:
        records = _merge_crops(records, p.nms_iou_thresh)
    records.sort(key=lambda r: -r.score)
    return records


def masks_to_labels(records: list[MaskRecord], shape, min_object_area: int = 0) -> np.ndarray:
    """Instance label image (H, W) int32 from mask records; higher scores win overlaps,
    ids are numbered in raster order of each object's first pixel."""
    return amg_ops.paint_labels(
        tuple(shape),
        [(r.row0, r.col0, r.mask) for r in records],
        [r.score for r in records],
        min_object_area,
    )


def segment_slice(
    predictor,
    image=None,
    params: AutomaticParams | None = None,
    *,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
    _decoder=None,
) -> np.ndarray:
    """Automatic instance segmentation of one image -> (H, W) int32 labels (0 background).

    See :func:`generate_masks` for the arguments.
    """
    p = params or AutomaticParams.for_model(predictor)
    records = generate_masks(
        predictor, image, p, progress=progress, should_cancel=should_cancel, _decoder=_decoder
    )
    shape = _read_embedding(predictor).original_size if image is None else np.shape(image)[:2]
    return masks_to_labels(records, shape, p.min_object_area)


def segment_volume(
    volume,
    predictor,
    params: AutomaticParams | None = None,
    *,
    embeddings: Callable[[int], Any] | None = None,
    stitch: StitchParams | None = None,
    progress: Progress | None = None,
    should_cancel: ShouldCancel | None = None,
) -> np.ndarray:
    """Automatic 3-D instance segmentation of a (Z, H, W) stack -> (Z, H, W) int32 labels.

    Each slice is segmented with :func:`segment_slice`; 2-D instances are linked across
    slices by overlap (see :class:`napari_sam.stitching.StitchParams` for the rule) and
    objects spanning fewer than ``stitch.min_z_extent`` slices are dropped.

    volume: any array indexable by z (numpy, dask, zarr); slices are read one at a time.
    embeddings: optional callable ``z -> embedding`` returning an object with ``features``
    (1, C, h, w), ``input_size`` and ``original_size``, e.g.
    ``napari_sam.embeddings.EmbeddingStore(volume, predictor).get``; when given,
    the image encoder is not run (crop layers still need it). progress(done, total) is
    called once per slice.
    """
    from napari_sam._point_decoder import PointDecoder

    p = params or AutomaticParams.for_model(predictor)
    shape = tuple(getattr(volume, "shape", ()))
    if len(shape) != 3:
        raise ValueError(
            f"expected a (Z, H, W) volume, got shape {shape}; for a single image use segment_slice"
        )
    nz = shape[0]
    stitcher = Stitcher(shape[1:], stitch or StitchParams())
    decoder = PointDecoder(_model_of(predictor), precision=p.precision)
    for z in range(nz):
        if should_cancel is not None and should_cancel():
            raise Cancelled("automatic segmentation cancelled")
        image = np.asarray(volume[z])
        if embeddings is not None and p.crop_n_layers == 0:
            emb = _read_embedding(embeddings(z))
            if emb.original_size != shape[1:]:
                raise ValueError(
                    f"embedding for slice {z} is for an image of size "
                    f"{emb.original_size}, the volume slices are {shape[1:]}"
                )
            records = _generate_from_embedding(predictor, emb, p, decoder, should_cancel)
            labels = masks_to_labels(records, shape[1:], p.min_object_area)
        else:
            labels = segment_slice(
                predictor, image, p, should_cancel=should_cancel, _decoder=decoder
            )
        stitcher.add(labels)
        if progress is not None:
            progress(z + 1, nz)
    return stitcher.result()


def _generate_from_embedding(predictor, emb: _Embedding, p, decoder, should_cancel):
    model = _model_of(predictor)
    tick = _Ticker(_n_batches(p.points_per_side, p.points_per_batch), None, should_cancel)
    decoder.set_embedding(emb.features[:1])
    run = _CropRun(decoder, emb, replace(p, crop_n_layers=0), int(model.image_encoder.img_size))
    run.run(p.points_per_side, tick)
    box = (0, 0, emb.original_size[1], emb.original_size[0])
    return sorted(run.records(box, 0, emb.original_size), key=lambda r: -r.score)

"""CPU-friendly SAM training: interactive prompt simulation, checkpoints, resume, evaluation.

One step: encode ``images_per_step`` images once, pick up to ``objects_per_image``
objects per image, and for each object run the first prompt (a uniform positive point or
a noisy box) plus a randomly long interactive session (correction clicks from the error
region and rounds with only the previous logits as mask prompt, see
:mod:`napari_sam.train.prompts`). The rounds in between run without gradients; the loss
(:func:`napari_sam.train.losses.sam_loss`, on the 3 multimask outputs with the min-over-3
rule and on the single-mask output) is taken on the first round and on the last.

Frames: images are prepared like the predictor does (longest side resized to the
canvas, contrast-normalised to 0-255 RGB, SAM pixel normalisation, zero padding to a
square canvas); prompts are in canvas pixels, (x, y); low-res masks are canvas / 2.

Checkpoints (``out_dir/last.pt``, atomic) hold the model, optimizer, step, RNG states,
config and history, so ``train(cfg)`` with ``resume=True`` continues exactly where it
stopped (same batches, same result as an uninterrupted run). ``out_dir/best.pt`` holds
the weights with the best evaluation score.

The entry point :func:`train` takes a :class:`TrainConfig` and an optional progress
``callback(event: dict)``; events have ``kind`` "step", "eval" or "done".
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import prompts as P
from .synthetic import make_image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


# ----------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Training settings (all JSON-serialisable; stored in every checkpoint)."""

    out_dir: str = "runs/nsam"
    model: dict = field(default_factory=dict)  # overrides of model.small_encoder.NSAM_S
    init: str | None = None  # state_dict to start from (fine-tuning)
    canvas: int = 256  # training frame side (multiple of 32)
    steps: int = 3000  # length of the learning-rate schedule
    stop_at: int | None = None  # end this run early at this step (schedule unchanged)
    images_per_step: int = 4
    objects_per_image: int = 6
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    train_encoder: bool = True  # False: encoder frozen, embeddings cached per image
    # parameter-name prefixes: when given, only these parameters are trained (e.g.
    # ("mask_decoder.iou_prediction_head",) re-learns the IoU head on frozen masks)
    train_only: tuple[str, ...] = ()
    box_prob: float = 0.5  # first prompt is a box with this probability, else a point
    max_rounds: int = 4  # interactive rounds after the first, sampled in 0..max_rounds
    mask_only_prob: float = 0.2  # probability that a later round adds no point
    scale_range: tuple[float, float] = (0.6, 2.5)  # synthetic object-size multiplier
    pad_prob: float = 0.2  # non-square images padded inside the canvas
    uint8_passthrough: float = 0.7  # P(uint8 image used as is, like Contrast("auto"))
    kind: str = "mixed"
    # 0: off. N: positional encodings as in an N x N input, the canvas at a random place in
    # it (per image), so that a canvas pixel is encoded as at inference (a 512 input)
    pe_reference: int = 0
    # probability that the first prompt is only a mask: the object's mask, shifted and
    # grown or shrunk by a few pixels, as +-8 logits (what propagation gives a slice)
    mask_prompt_prob: float = 0.0
    # probability that a training image is a slice z of a synthetic stack (make_volume,
    # ``volume_depth`` slices, kinds ``volume_kinds``) and the prompts are the masks of
    # the objects on slice z +- 1, as propagation gives them: the target may have shrunk,
    # moved, or be empty (the object ended; in "dense" stacks another nucleus follows)
    volume_prob: float = 0.0
    volume_kinds: tuple[str, ...] = ("nuclei", "tubes", "mixed", "dense")
    volume_depth: int = 12
    # 0: the objects of a volume sample as they come (few have ended on the next slice).
    # s > 0: where some have ended, others are subsampled so that ended ones make about
    # this share, so the model learns to return an empty mask when the object is gone
    volume_end_share: float = 0.0
    # images drawn at canvas / f and resized by f (log-uniform in this range), so that
    # object edges, blur and noise also look like up-/down-sampled inputs
    resample_range: tuple[float, float] = (1.0, 1.0)
    # objects of a step drawn with probability ~ area ** size_power (0: uniform). Scenes
    # hold many small objects; 0.5 (~ radius) gives large ones their share of the loss
    size_power: float = 0.0
    # 0: evaluate at the training canvas. N: evaluation images of eval_size pixels
    # (default canvas) are resized to N like the predictor does (e.g. 256 -> 512), with
    # SAM's positional encoding: the numbers then match benchmarks/bench_quality.py
    eval_canvas: int = 0
    eval_size: int = 0
    # evaluation images smaller than eval_canvas enlarged by at most this (None: to fit;
    # 1.0: padded, like the predictor does for nsam models)
    eval_max_upscale: float | None = None
    seed: int = 0
    threads: int = 2
    ckpt_every: int = 50  # 0: no checkpoint files at all (fine-tuning in memory)
    eval_every: int = 250
    eval_images: int = 24
    eval_objects: int = 8
    eval_clicks: int = 3
    eval_seed: int = 1_000_000  # held-out synthetic seeds start here (training never uses them)
    patience: int = 0  # early stop after this many evaluations without improvement (0: off)
    # 0: off. d in (0, 1): keep an exponential moving average of the weights (after each
    # step ema = d * ema + (1 - d) * weights; BatchNorm statistics too); evaluations,
    # best.pt and the returned model use the average, training continues on the raw weights
    ema_decay: float = 0.0
    # 0: off. w > 0: adds w x a dense loss on the image embedding: a throw-away head (1x1
    # conv + pixel shuffle, not part of the model) predicts background / object interior /
    # object boundary at half the canvas resolution from the embedding, so that the
    # encoder learns every object's outline on every image, not only the sampled objects'
    aux_weight: float = 0.0
    # True: prompts with positive clicks are scored as the plugin shows them, after
    # keep_clicked_parts: the IoU head is regressed to those masks' IoU and evaluations
    # measure them (the mask loss stays on the raw logits)
    clicked_parts: bool = False
    resume: bool = True

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


# ----------------------------------------------------------------------------- data


def normalize_image(
    image: np.ndarray, low: float = 0.5, high: float = 99.5, uint8_passthrough: bool = True
) -> np.ndarray:
    """Any-dtype (H, W) or (H, W, 3) image -> float32 (H, W, 3) in [0, 255].

    Like the predictor's ``Contrast("auto")``: uint8 images pass unchanged (if
    ``uint8_passthrough``), any other dtype maps its ``low``/``high`` percentiles to 0/255.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W) or (H, W, 3), got shape {image.shape}")
    if uint8_passthrough and np.asarray(image).dtype == np.uint8:
        return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
    finite = np.isfinite(img)
    lo, hi = np.percentile(img[finite], [low, high]) if finite.any() else (0.0, 1.0)
    img = np.where(finite, img, lo)
    img = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img.astype(np.float32)


@dataclass
class Sample:
    """One training image in the canvas frame.

    ``image``: (3, S, S) float32, normalised and zero-padded; ``masks``: list of (S, S)
    bool object masks (in the canvas frame, padded); ``key``: cache key for embeddings.
    ``prompts``: where given, one (S, S) bool mask per object that is the object's first
    prompt (a neighbouring slice's mask); its target in ``masks`` may then be empty.
    """

    image: np.ndarray
    masks: list
    key: object = None
    labels: np.ndarray | None = None  # (S, S) instance ids, where a source keeps them
    prompts: list | None = None


def to_canvas(
    image,
    labels,
    canvas: int,
    low=0.5,
    high=99.5,
    min_area=8,
    uint8_passthrough=True,
    max_upscale: float | None = None,
) -> Sample:
    """Resize (longest side -> canvas, enlarging by at most ``max_upscale`` if given, like
    the predictor), normalise and pad one image with its labels."""
    import torch
    import torch.nn.functional as F

    labels = np.asarray(labels)
    img = normalize_image(image, low, high, uint8_passthrough)
    h, w = labels.shape
    if img.shape[:2] != (h, w):
        raise ValueError(f"image {img.shape[:2]} and labels {labels.shape} differ in size")
    s = canvas / max(h, w)
    if max_upscale is not None:
        s = min(s, max_upscale)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    t = torch.from_numpy(img).permute(2, 0, 1)[None]
    if (nh, nw) != (h, w):
        t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        idx_y = np.minimum((np.arange(nh) + 0.5) / s, h - 1).astype(int)
        idx_x = np.minimum((np.arange(nw) + 0.5) / s, w - 1).astype(int)
        labels = labels[idx_y][:, idx_x]
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    t = (t - mean) / std
    out = torch.zeros((1, 3, canvas, canvas))
    out[..., :nh, :nw] = t
    lab = np.zeros((canvas, canvas), labels.dtype)
    lab[:nh, :nw] = labels
    ids, counts = np.unique(lab, return_counts=True)
    masks = [lab == i for i, c in zip(ids, counts, strict=True) if i != 0 and c >= min_area]
    return Sample(out[0].numpy(), masks, labels=lab)


class SyntheticSource:
    """Endless synthetic training images (:func:`napari_sam.train.synthetic.make_image`)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def sample(self, rng: np.random.Generator) -> Sample:
        cfg = self.cfg
        if cfg.volume_prob and rng.random() < cfg.volume_prob:
            return self.volume_sample(rng)
        seed = int(rng.integers(0, cfg.eval_seed))  # never a held-out seed
        lo, hi = cfg.scale_range
        scale = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        bit_depth = [8, 16, None][rng.integers(3)]
        side = cfg.canvas
        lo, hi = cfg.resample_range
        if (lo, hi) != (1.0, 1.0):
            f = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            side = max(32, round(cfg.canvas / f))
            scale = scale * side / cfg.canvas  # object size in canvas pixels unchanged
        shape = (side, side)
        if rng.random() < cfg.pad_prob:
            shape = (side, int(rng.integers(side // 2, side)))
            if rng.random() < 0.5:
                shape = shape[::-1]
        image, labels = make_image(seed, shape, cfg.kind, bit_depth, scale=scale)
        low, high = rng.uniform(0, 1.0), rng.uniform(99.0, 100.0)
        passthrough = rng.random() < cfg.uint8_passthrough
        return to_canvas(image, labels, cfg.canvas, low, high, uint8_passthrough=passthrough)

    def volume_sample(self, rng: np.random.Generator) -> Sample:
        """Slice z of a new synthetic stack; objects are those on slice z - d (d = +-1, at
        least 20 pixels there), their prompts those masks, their targets their masks on z
        (possibly empty). Everything is drawn from ``rng``, so a resumed run matches."""
        from .synthetic import make_volume

        cfg = self.cfg
        depth = max(8, int(cfg.volume_depth))  # make_volume needs 8 slices
        for _ in range(8):
            seed = int(rng.integers(0, cfg.eval_seed))  # never a held-out seed
            kind = cfg.volume_kinds[int(rng.integers(len(cfg.volume_kinds)))]
            bit_depth = [8, 16, None][rng.integers(3)]
            vol, lab = make_volume(seed, (depth, cfg.canvas, cfg.canvas), kind, bit_depth)
            # with volume_end_share, up to 4 draws of (z, d) look for an object that ends
            for _ in range(4 if cfg.volume_end_share > 0 else 1):
                d = 1 if rng.random() < 0.5 else -1
                z = int(rng.integers(1, depth - 1))
                prev = lab[z - d]
                ids, counts = np.unique(prev[prev > 0], return_counts=True)
                ids = ids[counts >= 20]
                if (~np.isin(ids, lab[z])).any():
                    break
            if ids.size:
                break
        else:
            raise RuntimeError("no synthetic stack with objects in 8 tries")  # guard
        ended = ~np.isin(ids, lab[z])
        share = cfg.volume_end_share
        if share > 0 and ended.any() and not ended.all():
            keep = max(1, round(ended.sum() * (1 - share) / share))
            going = rng.permutation(ids[~ended])[:keep]
            ids = np.sort(np.concatenate([ids[ended], going]))
        low, high = rng.uniform(0, 1.0), rng.uniform(99.0, 100.0)
        passthrough = rng.random() < cfg.uint8_passthrough
        s = to_canvas(vol[z], lab[z], cfg.canvas, low, high, uint8_passthrough=passthrough)
        s.masks = [lab[z] == i for i in ids]
        s.prompts = [prev == i for i in ids]
        s.labels = None
        return s


class ArraySource:
    """Training images from arrays (fine-tuning on annotations): cycles in random order.

    Default: each image is resized to ``canvas`` (longest side) once. With ``frame``, each
    image is first brought to the scale the predictor uses
    (:func:`napari_sam.preprocess.input_scale` with ``frame`` and ``min_side``) and every sample is a random ``canvas`` x
    ``canvas`` crop of it (padded where smaller): objects keep the pixel size they have at
    inference while the training frame stays small (use with ``pe_reference = frame``).
    """

    def __init__(
        self,
        images: Sequence,
        labels: Sequence,
        canvas: int,
        frame: int | None = None,
        min_side: int | None = None,
        min_area: int = 8,
    ):
        if len(images) != len(labels) or not images:
            raise ValueError("images and labels must be non-empty lists of equal length")
        self.canvas, self.frame, self.min_area = canvas, frame, min_area
        self.samples = []
        for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
            if frame is None:
                s = to_canvas(im, lab, canvas)
            else:
                from napari_sam.preprocess import input_scale

                lab = np.asarray(lab)
                h, w = lab.shape
                # the predictor's geometry, without padding to the square frame
                scale = input_scale(h, w, frame, min_side)
                long = max(1, round(max(h, w) * scale))
                s = to_canvas(im, lab, long, min_area=min_area, max_upscale=scale)
            s.key = i
            if s.masks:
                self.samples.append(s)
        if not self.samples:
            raise ValueError("no labelled objects found in the training labels")

    def sample(self, rng: np.random.Generator) -> Sample:
        s = self.samples[int(rng.integers(len(self.samples)))]
        if self.frame is None:
            return s
        c = self.canvas
        lab = s.labels
        h, w = lab.shape
        # a crop around a random object pixel, so that every crop holds an object
        ys, xs = np.nonzero(lab)
        k = int(rng.integers(ys.size))
        y, x = int(ys[k]), int(xs[k])
        y0 = int(rng.integers(max(0, y - c + 1), min(y, h - c) + 1)) if h > c else 0
        x0 = int(rng.integers(max(0, x - c + 1), min(x, w - c) + 1)) if w > c else 0
        img = np.zeros((3, c, c), np.float32)
        crop = s.image[:, y0 : y0 + c, x0 : x0 + c]
        img[:, : crop.shape[1], : crop.shape[2]] = crop
        cl = np.zeros((c, c), lab.dtype)
        part = lab[y0 : y0 + c, x0 : x0 + c]
        cl[: part.shape[0], : part.shape[1]] = part
        ids, counts = np.unique(cl, return_counts=True)
        masks = [cl == i for i, n in zip(ids, counts, strict=True) if i and n >= self.min_area]
        if not masks:  # only a sliver of the chosen object is inside: train on it anyway
            masks = [cl == lab[y, x]]
        return Sample(np.ascontiguousarray(img), masks, (s.key, y0, x0))


def eval_set(cfg: TrainConfig, n: int | None = None) -> list[Sample]:
    """The fixed held-out synthetic set: seeds ``eval_seed + i``, kinds in rotation."""
    kinds = ["nuclei", "cells", "membrane", "elongated", "mixed"]
    out = []
    size = cfg.eval_size or cfg.canvas
    frame = cfg.eval_canvas or cfg.canvas
    for i in range(cfg.eval_images if n is None else n):
        rng = np.random.default_rng([cfg.eval_seed, i])
        scale = float(np.exp(rng.uniform(np.log(0.7), np.log(2.0))))
        image, labels = make_image(
            cfg.eval_seed + i, (size, size), kinds[i % 5], [8, 16][i % 2], scale=scale
        )
        up = (
            frame / size
            if cfg.eval_max_upscale is None
            else min(frame / size, cfg.eval_max_upscale)
        )
        s = to_canvas(image, labels, frame, min_area=30 * up**2, max_upscale=cfg.eval_max_upscale)
        # fixed subset of objects per image
        idx = rng.permutation(len(s.masks))[: cfg.eval_objects]
        s.masks = [s.masks[j] for j in sorted(idx)]
        s.key = ("eval", i)
        out.append(s)
    return out


# ----------------------------------------------------------------------------- model I/O


def build_model(cfg: TrainConfig):
    """Build the nsam model from ``cfg.model`` (+ ``cfg.init`` weights), canvas-sized."""
    from napari_sam.model.small_encoder import build_nsam, set_canvas

    init = None
    if cfg.init:
        ck = load_checkpoint(cfg.init)
        init = ck.get("model", ck)  # training checkpoint or plain state_dict
    # a high-resolution skip may be added to weights trained without it
    new_hires = bool((cfg.model or {}).get("hires_chans")) and init is not None
    model = build_nsam(cfg.model, checkpoint=init, new_hires=new_hires)
    set_canvas(model, cfg.canvas)
    return model


def _decode(model, emb, coords, labels, boxes, masks):
    """One decoder pass for K prompts on one image embedding (1, C, h, w).

    coords (K, N, 2) / labels (K, N) or None, boxes (K, 4) or None, masks (K, 1, 4h, 4w)
    or None. Returns logits (K, 4, 4h, 4w) (index 0: single-mask output, 1-3: multimask)
    and predicted IoU (K, 4).
    """
    import torch

    pts = (coords, labels) if coords is not None else None
    sparse, dense = model.prompt_encoder(points=pts, boxes=boxes, masks=masks)
    pe = model.prompt_encoder.get_dense_pe()
    # emb stays (1, C, h, w): the decoder repeats it for the K prompts
    logits, iou = model.mask_decoder.predict_masks(
        image_embeddings=emb,
        image_pe=pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
    )
    return logits, iou if isinstance(iou, torch.Tensor) else torch.as_tensor(iou)


def _stack_prompts(its: list[P.Interaction], torch):
    """Batch K interactions (same number of points each) into prompt tensors."""
    n = its[0].points.shape[0]
    coords = labels = boxes = masks = None
    if n:
        coords = torch.from_numpy(np.stack([it.points for it in its]))
        labels = torch.from_numpy(np.stack([it.labels for it in its]))
    if its[0].box is not None:
        boxes = torch.from_numpy(np.stack([it.box for it in its]))
    if its[0].mask_input is not None:
        masks = torch.stack([it.mask_input for it in its])
    return coords, labels, boxes, masks


def _low_res_targets(masks: list, torch, side: int | None = None) -> object:
    """(K, 1, side, side) soft targets from (S, S) bool masks (block average).

    ``side``: the decoder's low-res mask side, 4x the embedding side (S/2 for nsam,
    S/4 for the official stride-16 encoders); default S/2.
    """
    import torch.nn.functional as F

    t = torch.from_numpy(np.stack(masks)).float()[:, None]
    factor = 2 if side is None else t.shape[-1] // side
    return F.avg_pool2d(t, factor)


def pick_objects(masks: list, k: int, rng, size_power: float = 0.0) -> np.ndarray:
    """Indices of up to ``k`` distinct masks, drawn with probability ~ area ** size_power."""
    k = min(k, len(masks))
    if not size_power:
        return rng.choice(len(masks), size=k, replace=False)
    w = np.array([m.sum() for m in masks], float) ** size_power
    return rng.choice(len(masks), size=k, replace=False, p=w / w.sum())


def set_pe_frame(model, span: float = 1.0, offset=(0.0, 0.0)) -> None:
    """Place the model's input frame inside a larger positional-encoding frame (see
    ``PositionEmbeddingRandom``); ``set_pe_frame(model)`` restores SAM's encoding."""
    pe = model.prompt_encoder.pe_layer
    pe.frame_span = float(span)
    pe.frame_offset = (float(offset[0]), float(offset[1]))


def _pe_span(cfg: TrainConfig) -> float:
    return cfg.canvas / cfg.pe_reference if cfg.pe_reference else 1.0


def _mask_prompt(mask: np.ndarray, rng, side: int, torch, scale: float = 8.0):
    """(1, side, side) logits of a perturbed ``mask``: a neighbouring slice's mask as
    :func:`napari_sam.propagate.mask_to_logits` gives it to the model (+-``scale``)."""
    import torch.nn.functional as F

    m = P.perturb_mask(mask, rng)
    t = torch.from_numpy(m.astype(np.float32))[None, None]
    t = F.avg_pool2d(t, t.shape[-1] // side)
    return ((t[0] * 2 - 1) * scale).float()


def _upsample(logits, size):
    import torch.nn.functional as F

    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def _round_loss(logits, iou, target, shown=None):
    from .losses import sam_loss

    shown_multi = shown_single = None
    if shown is not None:
        shown_multi, shown_single = shown[:, 1:], shown[:, :1]
    multi = sam_loss(logits[:, 1:], iou[:, 1:], target, iou_logits=shown_multi)
    single = sam_loss(logits[:, :1], iou[:, :1], target, iou_logits=shown_single)
    return multi.total + single.total, multi


def _clicked_parts(logits, its: list, torch):
    """``keep_clicked_parts`` of training logits (K, M, h, w) in the canvas frame (side
    2 h), each row with its interaction's positive clicks (rows without: unchanged)."""
    from napari_sam._masks import keep_clicked_parts

    clicks = [it.points[it.labels == 1] for it in its]
    if not any(len(c) for c in clicks):
        return logits
    side = 2 * logits.shape[-1]
    with torch.no_grad():
        return keep_clicked_parts(logits.detach(), clicks, (side, side), (side, side), side)


AUX_CLASS_WEIGHTS = (1.0, 1.0, 3.0)  # background, interior, boundary (the rare class)


def aux_targets(sample: Sample, side: int) -> np.ndarray:
    """(side, side) int64 classes of the dense auxiliary loss: 0 background, 1 object
    interior, 2 object boundary (an object pixel with a 4-neighbour outside the object:
    background or another object), pooled from the canvas by blocks, boundary first."""
    lab = sample.labels
    if lab is None:
        lab = np.zeros(sample.image.shape[1:], np.int32)
        for i, m in enumerate(sample.masks):
            lab[m] = i + 1
    lab = np.asarray(lab)
    pad = np.pad(lab, 1, mode="edge")
    edge = np.zeros(lab.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy : dy + lab.shape[0], dx : dx + lab.shape[1]] != lab
    cls = np.where(lab > 0, np.where(edge, 2, 1), 0)
    f = lab.shape[0] // side
    if f < 1 or lab.shape[0] != side * f or lab.shape[1] != lab.shape[0]:
        raise ValueError(f"canvas {lab.shape} is not {side} x {side} blocks")
    return cls.reshape(side, f, side, f).max(axis=(1, 3)).astype(np.int64)


def make_aux_head(model, canvas: int):
    """The dense auxiliary head for ``model``'s embedding at ``canvas`` input: 1x1 conv to
    3 x f^2 channels, pixel shuffle by f, so the classes come out at canvas / 2."""
    import torch

    was = model.image_encoder.training
    model.image_encoder.eval()
    with torch.no_grad():
        e = model.image_encoder(torch.zeros(1, 3, canvas, canvas))
    model.image_encoder.train(was)
    chans, side = e.shape[1], e.shape[-1]
    f, rem = divmod(canvas // 2, side)
    if rem or f < 1:
        raise ValueError(
            f"aux_weight needs an embedding side ({side}) that divides half the canvas "
            f"({canvas // 2}); choose another canvas or set aux_weight=0"
        )
    return torch.nn.Sequential(torch.nn.Conv2d(chans, 3 * f * f, 1), torch.nn.PixelShuffle(f))


def aux_loss(head, emb, samples: list[Sample], torch):
    """Class-weighted cross-entropy of the head's prediction against :func:`aux_targets`."""
    import torch.nn.functional as F

    logits = head(emb)
    tgt = torch.from_numpy(np.stack([aux_targets(s, logits.shape[-1]) for s in samples]))
    w = torch.tensor(AUX_CLASS_WEIGHTS, dtype=logits.dtype)
    return F.cross_entropy(logits, tgt, weight=w)


def _session_step(model, emb, sample: Sample, obj_idx, cfg: TrainConfig, rng, torch):
    """Loss of one image's objects over a sampled interactive session."""
    masks = [sample.masks[i] for i in obj_idx]
    target = _low_res_targets(masks, torch, side=4 * emb.shape[-1])
    if sample.prompts is not None:  # a neighbouring slice's masks (volume_prob)
        kind = "volume"
        its = [
            P.Interaction(mask_input=_mask_prompt(sample.prompts[i], rng, target.shape[-1], torch))
            for i in obj_idx
        ]
    elif cfg.mask_prompt_prob and rng.random() < cfg.mask_prompt_prob:
        kind = "mask"
        its = [
            P.Interaction(mask_input=_mask_prompt(m, rng, target.shape[-1], torch)) for m in masks
        ]
    else:
        kind = "box" if rng.random() < cfg.box_prob else "point"
        its = [P.start(m, rng, kind) for m in masks]
    n_rounds = int(rng.integers(0, cfg.max_rounds + 1))
    total = 0.0
    stats = {}
    size = masks[0].shape
    for r in range(n_rounds + 1):
        grad = r == 0 or r == n_rounds
        with torch.set_grad_enabled(grad):
            logits, iou = _decode(model, emb, *_stack_prompts(its, torch))
        if grad:
            shown = _clicked_parts(logits, its, torch) if cfg.clicked_parts else None
            loss, multi = _round_loss(logits, iou, target, shown)
            total = total + loss
            if r == 0:
                stats["iou0"] = float(multi.actual_iou.max(1).values.mean())
                stats["kind"] = kind
        if r == n_rounds:
            break
        with torch.no_grad():
            multi_logits = logits[:, 1:].detach()
            # previous mask: the best of the three (min-loss choice), as SAM's training
            actual = (multi_logits > 0).flatten(2)
            t = (target > 0.5).flatten(2)
            inter = (actual & t).sum(-1).float()
            union = (actual | t).sum(-1).float().clamp(min=1)
            best = (inter / union).argmax(1)
            prev = multi_logits[torch.arange(len(its)), best][:, None]  # K x 1 x h x w
            pred = (_upsample(prev, size) > 0)[:, 0].numpy()
        add_point = rng.random() >= cfg.mask_only_prob
        mode = "center" if rng.random() < 0.5 else "uniform"
        for k, it in enumerate(its):
            it.mask_input = prev[k]
            if add_point:
                c = P.correction_point(pred[k], masks[k], rng, mode)
                if c is None:  # perfect already: a padding point keeps shapes aligned
                    it.points = np.concatenate([it.points, np.zeros((1, 2), np.float32)])
                    it.labels = np.concatenate([it.labels, np.array([-1], np.int64)])
                else:
                    it.add_point(c[0][0], c[1])
    return total / (2 if n_rounds else 1), stats


# ----------------------------------------------------------------------------- eval


def _iou_full(logits, size, tgt):
    """IoU of up-sampled ``logits`` (K, 1, h, w) > 0 with ``tgt`` (K, H, W) bool -> (K,), masks."""
    pred = (_upsample(logits, size) > 0)[:, 0]
    inter = (pred & tgt).flatten(1).sum(1).float()
    union = (pred | tgt).flatten(1).sum(1).float().clamp(min=1)
    return (inter / union).numpy(), pred.numpy()


def evaluate(
    model,
    samples: list[Sample],
    n_clicks: int = 3,
    callback=None,
    pe_span: float = 1.0,
    mask_prompt: bool = False,
    clicked_parts: bool = False,
) -> dict:
    """Mean IoU on ``samples``: 1 box, 1 point, and point + 1..n_clicks corrections.

    Box: single-mask output (``multimask_output=False``) and the highest-predicted-IoU of
    the 3 multimask outputs (``box3``). Point: highest predicted IoU of the 3 (what the
    plugin shows by default). Corrections: centre-of-error clicks with the previous
    low-res logits as mask prompt, single-mask output. IoU at the canvas resolution.
    ``pe_span`` < 1: the canvas sits in the middle of a larger positional-encoding frame
    (``TrainConfig.pe_reference``). ``mask_prompt``: also ``mask``, the best of 3 by
    predicted IoU from a perturbed copy of the object's mask as the only prompt (what
    propagation asks of the model). ``clicked_parts``: point and click masks as the plugin
    shows them by default (``keep_clicked_parts``; the filtered logits are fed back).
    """
    import torch

    model.eval()
    set_pe_frame(model, pe_span, ((1 - pe_span) / 2,) * 2)
    ious: dict[str, list] = {"box": [], "box3": [], "point": []}
    for c in range(1, n_clicks + 1):
        ious[f"click{c}"] = []
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for si, s in enumerate(samples):
            if not s.masks:
                continue
            emb = model.image_encoder(torch.from_numpy(s.image)[None])
            size = s.masks[0].shape
            gt = np.stack(s.masks)
            tgt = torch.from_numpy(gt)

            def iou_of(logits, size=size, tgt=tgt):
                return _iou_full(logits, size, tgt)

            boxes = torch.from_numpy(np.stack([P.mask_box(m) for m in s.masks]))
            logits, iou = _decode(model, emb, None, None, boxes, None)
            ious["box"] += list(iou_of(logits[:, :1])[0])
            pick = iou[:, 1:].argmax(1) + 1
            ious["box3"] += list(iou_of(logits[torch.arange(len(pick)), pick][:, None])[0])
            if mask_prompt:
                side = 4 * emb.shape[-1]
                mp = torch.stack([_mask_prompt(m, rng, side, torch) for m in s.masks])
                logits, iou = _decode(model, emb, None, None, None, mp)
                pick = iou[:, 1:].argmax(1) + 1
                v = iou_of(logits[torch.arange(len(pick)), pick][:, None])[0]
                ious.setdefault("mask", []).extend(v)
            its = [P.start(m, rng, "point") for m in s.masks]
            # deterministic first point: the object's innermost pixel (centre click)
            for it, m in zip(its, s.masks, strict=True):
                it.points[0] = P.correction_point(np.zeros_like(m), m, mode="center")[0][0]
            logits, iou = _decode(model, emb, *_stack_prompts(its, torch))
            if clicked_parts:
                logits = _clicked_parts(logits, its, torch)
            pick = iou[:, 1:].argmax(1) + 1
            prev = logits[torch.arange(len(pick)), pick][:, None]
            v, pred = iou_of(prev)
            ious["point"] += list(v)
            for c in range(1, n_clicks + 1):
                for k, it in enumerate(its):
                    it.mask_input = prev[k]
                    cp = P.correction_point(pred[k], s.masks[k], mode="center")
                    if cp is None:
                        it.points = np.concatenate([it.points, np.zeros((1, 2), np.float32)])
                        it.labels = np.concatenate([it.labels, np.array([-1], np.int64)])
                    else:
                        it.add_point(cp[0][0], cp[1])
                logits, iou = _decode(model, emb, *_stack_prompts(its, torch))
                if clicked_parts:
                    logits = _clicked_parts(logits, its, torch)
                prev = logits[:, :1]
                v, pred = iou_of(prev)
                ious[f"click{c}"] += list(v)
            if callback:
                callback({"kind": "eval_progress", "done": si + 1, "total": len(samples)})
    set_pe_frame(model)
    out = {k: float(np.mean(v)) if v else float("nan") for k, v in ious.items()}
    out["objects"] = len(ious["box"])
    return out


def score(metrics: dict) -> float:
    """Model-selection score: mean of box and point mIoU (and ``mask`` if measured)."""
    keys = ["box", "point"] + (["mask"] if "mask" in metrics else [])
    return float(np.mean([metrics[k] for k in keys]))


# ----------------------------------------------------------------------------- checkpoints


def _rng_state(rng, torch):
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state()}


def _set_rng_state(rng, state, torch):
    rng.bit_generator.state = state["numpy"]
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    path, model, opt, step, rng, cfg, history, best, torch, ema=None, aux=None
) -> None:
    """Atomic write of the full training state to ``path`` (``ema``: the weight average,
    ``aux``: the auxiliary head of ``cfg.aux_weight``)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    state = {
        "model": model.state_dict(),
        **({"ema": ema} if ema is not None else {}),
        **({"aux": aux.state_dict()} if aux is not None else {}),
        "optimizer": opt.state_dict(),
        "step": step,
        "rng": _rng_state(rng, torch),
        "config": cfg.to_json(),
        "model_config": dict(getattr(model, "nsam_config", {})),
        "history": history,
        "best": best,
    }
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a training checkpoint written by :func:`save_checkpoint` (a dict)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def export_weights(model, path, metrics: dict | None = None, half: bool = True) -> dict:
    """Write the model's state_dict (float16 if ``half``) and a JSON sidecar of config+metrics."""
    import hashlib

    import torch

    path = Path(path)
    state = {
        k: (v.half() if half and v.is_floating_point() else v).clone()
        for k, v in model.state_dict().items()
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    info = {
        "model_type": model.nsam_config.get("model_type", "nsam_s"),
        "config": dict(model.nsam_config),
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "bytes": path.stat().st_size,
        "dtype": "float16" if half else "float32",
        "metrics": metrics or {},
    }
    path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ----------------------------------------------------------------------------- loop


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def _trains(name: str, cfg: TrainConfig) -> bool:
    """Whether parameter ``name`` is trained under ``cfg``."""
    if not cfg.train_encoder and name.startswith("image_encoder."):
        return False
    only = (cfg.train_only,) if isinstance(cfg.train_only, str) else cfg.train_only
    return not only or any(name.startswith(p) for p in only)


def train(
    cfg: TrainConfig,
    callback: Callable[[dict], None] | None = None,
    source=None,
    eval_samples: list[Sample] | None = None,
    should_stop: Callable[[], bool] | None = None,
    model=None,
):
    """Train (or resume) and return ``(model, history)`` (with ``cfg.ema_decay`` the model
    holds the weight average).

    Args:
        cfg: settings; ``cfg.out_dir`` receives ``last.pt``, ``best.pt``, ``log.jsonl``.
        callback: called with dict events ("step": step, loss, lr, seconds; "eval":
            step, metrics; "done": step, reason).
        source: object with ``sample(rng) -> Sample`` (default :class:`SyntheticSource`).
        eval_samples: held-out samples (default :func:`eval_set`).
        should_stop: polled every step (e.g. a cancel button); stops after a checkpoint.
        model: start from this SAM model (any type, e.g. from ``load_model``; trained in
            place, on the CPU, its input frame must be ``cfg.canvas``) instead of building
            the nsam model of ``cfg.model`` / ``cfg.init`` (see :mod:`napari_sam.finetune`).
    """
    import torch

    torch.set_num_threads(max(1, int(cfg.threads)))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last = out / "last.pt"
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if model is None:
        model = build_model(cfg)
    # parameters the caller froze beforehand (fine-tuning chooses parts) stay frozen
    trained = {n for n, p in model.named_parameters() if p.requires_grad and _trains(n, cfg)}
    params = [p for n, p in model.named_parameters() if n in trained]
    if not params:
        raise ValueError(
            f"train_only={cfg.train_only!r} matches no parameter of the model; give "
            "prefixes of its parameter names, e.g. 'mask_decoder.iou_prediction_head'"
        )
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    frozen_norms = [
        m
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        and not any(f"{name}.{n}" in trained for n, _ in m.named_parameters())
    ]
    aux = None
    if cfg.aux_weight:
        if cfg.aux_weight < 0 or not cfg.train_encoder:
            raise ValueError(
                f"aux_weight={cfg.aux_weight} needs aux_weight > 0 and train_encoder=True "
                "(it trains the image encoder); set aux_weight=0 otherwise"
            )
        aux = make_aux_head(model, cfg.canvas)
        params = params + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history, best = 0, [], {"score": -1.0, "step": -1, "metrics": None}
    stale = 0
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    ema = None
    if cfg.ema_decay:
        ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg.resume and last.exists():
        ck = load_checkpoint(last)
        model.load_state_dict(ck["model"])
        if ema is not None:
            ema = ck.get("ema") or {k: v.detach().clone() for k, v in ck["model"].items()}
        if aux is not None:
            if "aux" not in ck:
                raise ValueError(
                    f"{last} was written without aux_weight; resume it with aux_weight=0 "
                    "or start a new out_dir"
                )
            aux.load_state_dict(ck["aux"])
        opt.load_state_dict(ck["optimizer"])
        step, history, best = ck["step"], ck["history"], ck["best"]
        _set_rng_state(rng, ck["rng"], torch)
        stale = sum(h["step"] > best["step"] for h in history)
    source = source or SyntheticSource(cfg)
    if eval_samples is None and cfg.eval_every:
        eval_samples = eval_set(cfg)
    log = open(out / "log.jsonl", "a")  # noqa: SIM115
    emb_cache: dict = {}
    reason = "steps"

    def emit(ev):
        log.write(json.dumps(ev) + "\n")
        log.flush()
        if callback:
            callback(ev)

    def run_eval():
        nonlocal stale, best
        from napari_sam.model.small_encoder import set_canvas

        raw = None
        if ema is not None:  # evaluate (and keep as best) the weight average
            raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.load_state_dict(ema)

        if cfg.eval_canvas:
            set_canvas(model, cfg.eval_canvas)
        m = evaluate(
            model,
            eval_samples,
            cfg.eval_clicks,
            pe_span=1.0 if cfg.eval_canvas else _pe_span(cfg),
            mask_prompt=cfg.mask_prompt_prob > 0,
            clicked_parts=cfg.clicked_parts,
        )
        if cfg.eval_canvas:
            set_canvas(model, cfg.canvas)
        sc = score(m)
        history.append({"step": step, **m})
        improved = sc > best["score"]
        if improved:
            best = {"score": sc, "step": step, "metrics": m}
            stale = 0
            torch.save(
                {
                    "model": model.state_dict(),
                    "model_config": dict(getattr(model, "nsam_config", {})),
                    "metrics": m,
                    "step": step,
                },
                out / "best.pt",
            )
        else:
            stale += 1
        if raw is not None:
            model.load_state_dict(raw)
        emit({"kind": "eval", "step": step, "score": sc, "best": improved, **m})

    try:
        end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
        while step < end:
            if should_stop is not None and should_stop():
                reason = "stopped"
                break
            t0 = time.perf_counter()
            model.train()
            for m in frozen_norms:  # frozen BatchNorm layers keep their statistics
                m.eval()
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            samples = [source.sample(rng) for _ in range(cfg.images_per_step)]
            samples = [s for s in samples if s.masks]
            if not samples:
                step += 1
                continue
            x = torch.from_numpy(np.stack([s.image for s in samples]))
            if cfg.train_encoder:
                emb = model.image_encoder(x)
            else:
                embs = []
                for s in samples:
                    key = s.key
                    if key is None or key not in emb_cache:
                        with torch.no_grad():
                            e = model.image_encoder(torch.from_numpy(s.image)[None])[0]
                        if key is not None:
                            emb_cache[key] = e
                    else:
                        e = emb_cache[key]
                    embs.append(e)
                emb = torch.stack(embs)
            loss = 0.0
            stats = []
            for i, s in enumerate(samples):
                idx = pick_objects(
                    s.prompts or s.masks, cfg.objects_per_image, rng, cfg.size_power
                )
                if cfg.pe_reference:
                    span = _pe_span(cfg)
                    set_pe_frame(model, span, rng.uniform(0, 1 - span, 2))
                li, st = _session_step(model, emb[i : i + 1], s, idx, cfg, rng, torch)
                loss = loss + li / len(samples)
                stats.append(st)
            if aux is not None:
                loss = loss + cfg.aux_weight * aux_loss(aux, emb, samples, torch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            if ema is not None:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.is_floating_point():
                            ema[k].mul_(cfg.ema_decay).add_(v, alpha=1 - cfg.ema_decay)
                        else:
                            ema[k].copy_(v)
            step += 1
            emit(
                {
                    "kind": "step",
                    "step": step,
                    "loss": float(loss.detach()),
                    "iou0": float(np.mean([s["iou0"] for s in stats])),
                    "lr": opt.param_groups[0]["lr"],
                    "seconds": time.perf_counter() - t0,
                }
            )
            if cfg.eval_every and step % cfg.eval_every == 0:
                run_eval()
            if cfg.ckpt_every and (step % cfg.ckpt_every == 0 or step == end):
                save_checkpoint(last, model, opt, step, rng, cfg, history, best, torch, ema, aux)
            if cfg.patience and stale >= cfg.patience:
                reason = "early_stop"
                break
        if cfg.ckpt_every:
            save_checkpoint(last, model, opt, step, rng, cfg, history, best, torch, ema, aux)
        if ema is not None:
            model.load_state_dict(ema)
    finally:
        set_pe_frame(model)
        emit({"kind": "done", "step": step, "reason": reason, "best": best["score"]})
        log.close()
    return model, history


def weights_path(cfg: TrainConfig) -> Path:
    """Weights a run hands on: ``best.pt`` if an evaluation ran, else ``last.pt``."""
    out = Path(cfg.out_dir)
    return out / "best.pt" if (out / "best.pt").exists() else out / "last.pt"


def load_best(path) -> dict:
    """``{"model": Sam, "metrics": dict}`` from a ``best.pt``/``last.pt`` of :func:`train`."""
    from napari_sam.model.small_encoder import build_nsam

    ck = load_checkpoint(path)
    model = build_nsam(ck["model_config"], checkpoint=ck["model"])
    return {"model": model, "metrics": ck.get("metrics") or ck.get("best", {}).get("metrics")}

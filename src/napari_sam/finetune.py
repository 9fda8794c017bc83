"""Fine-tune a SAM model on your own annotations (images + instance labels).

The pure core of the "Fine-tune SAM" widget, usable from scripts::

    from napari_sam import load_model
    from napari_sam.finetune import FinetuneConfig, finetune

    base = load_model()                          # or "vit_b", a checkpoint path, ...
    result = finetune(base, [image], [labels], FinetuneConfig(steps=200),
                      save_to="my_model.pt")
    print(result.before["box"], "->", result.after["box"])
    sam = load_model("my_model.pt")              # the fine-tuned model

What happens:

1. **Inputs.** Pairs of ``image`` ``(H, W)`` / ``(H, W, 3)`` and ``labels`` ``(H, W)``
   (instance ids, 0 = background), or stacks ``(Z, H, W[, 3])`` with labels ``(Z, H, W)``
   of which the slices with at least one object are used (:func:`annotated_pairs`).
2. **Held-out split** (:func:`split_annotations`): with 4 or more annotated images, a
   fraction of the images is held out; with fewer, a fraction of the objects of every
   image (held-out objects are then never a training target, though their pixels are in
   the training images).
3. **Before**: the base model's held-out mean IoU through the plugin's predictor
   (:func:`napari_sam.train.quality.interactive_miou`: 1 box, 1 point, and after 1..k
   corrective clicks).
4. **Training** with the project's loop (:func:`napari_sam.train.loop.train`: SAM's
   losses, simulated boxes, points and correction rounds) on a copy of the model (the
   model passed in is never changed), on the CPU, in the model's own input frame. What is
   trained: the mask decoder (``"decoder"``), also the prompt encoder
   (``"decoder+prompt"``) or everything (``"all"``). With a frozen image encoder every
   image is encoded once and its embedding cached.
5. **After**: the same held-out evaluation; then the weights are saved atomically
   (:func:`save_finetuned`: a plain SAM state_dict ``.pt`` plus a ``.json`` sidecar with
   the base model, settings and metrics; the project's own models need the sidecar to be
   rebuilt) and can be loaded with ``napari_sam.load_model(path)``.

``progress(event)`` receives dicts with ``stage`` ("before", "train", "after", "save"),
``done`` and ``total`` (and ``loss`` while training); ``should_stop()`` is polled every
step and after every evaluated image: when it returns True, :func:`finetune` returns
early with ``cancelled=True``, the model as trained so far, no "after" numbers and no
file written.

No Qt or napari; torch is imported on first use.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_PARTS = {
    "decoder": ("mask_decoder",),
    "decoder+prompt": ("mask_decoder", "prompt_encoder"),
    "all": ("mask_decoder", "prompt_encoder", "image_encoder"),
}
SPLITS = ("auto", "images", "objects")
MIN_IMAGES_FOR_IMAGE_SPLIT = 4

__all__ = [
    "FinetuneCancelled",
    "FinetuneConfig",
    "FinetuneResult",
    "Split",
    "annotated_pairs",
    "evaluate_held_out",
    "finetune",
    "save_finetuned",
    "split_annotations",
]


class FinetuneCancelled(Exception):
    """Raised inside the evaluation when ``should_stop()`` returned True (internal)."""


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (JSON-serialisable; stored in the checkpoint's sidecar).

    steps: optimisation steps; train: one of :data:`TRAIN_PARTS`; held_out: fraction of
    images/objects kept for evaluation (0: no evaluation); split: "auto", "images" or
    "objects"; lr: peak learning rate (cosine schedule with ``warmup`` steps, default 10 %
    of ``steps``); images_per_step, objects_per_image: batch size; max_rounds: simulated
    correction rounds per object after the first prompt (0..max_rounds); box_prob:
    probability that the first prompt is a box; eval_clicks: corrective clicks in the
    evaluation; eval_max_objects: at most this many held-out objects per image (None: all);
    min_area: objects smaller than this (pixels) are ignored; canvas: training frame side
    for the project's own (nsam) models, whose weights do not depend on the frame (None:
    the model's input size; a smaller frame trains several times faster, the evaluation
    and the saved model always use the model's own size); official SAM models always
    train in their own frame; seed: split and training randomness; threads: torch
    threads (None: leave as is).
    """

    steps: int = 200
    train: str = "decoder"
    held_out: float = 0.2
    split: str = "auto"
    lr: float = 5e-4
    warmup: int | None = None
    images_per_step: int = 4
    objects_per_image: int = 6
    max_rounds: int = 3
    box_prob: float = 0.5
    eval_clicks: int = 3
    eval_max_objects: int | None = 40
    min_area: int = 20
    canvas: int | None = 256
    seed: int = 0
    threads: int | None = None

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.train not in TRAIN_PARTS:
            raise ValueError(f"train must be one of {list(TRAIN_PARTS)}, got {self.train!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not (isinstance(self.steps, (int, np.integer)) and self.steps >= 1):
            raise ValueError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if not 0.0 <= self.held_out < 1.0:
            raise ValueError(f"held_out must be a fraction in [0, 1), got {self.held_out!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("images_per_step", "objects_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.canvas is not None and (self.canvas < 64 or self.canvas % 32):
            raise ValueError(f"canvas must be a multiple of 32 and >= 64, got {self.canvas!r}")
        if self.max_rounds < 0 or self.eval_clicks < 0 or self.min_area < 1:
            raise ValueError("max_rounds and eval_clicks must be >= 0 and min_area >= 1")
        if not 0.0 <= self.box_prob <= 1.0:
            raise ValueError(f"box_prob must be in [0, 1], got {self.box_prob!r}")


@dataclass
class Split:
    """Training and held-out (image, labels) pairs; all 2D, labels ``(H, W)`` int."""

    train_images: list
    train_labels: list
    test_images: list
    test_labels: list
    by: str  # "images" or "objects"
    n_train_objects: int
    n_test_objects: int

    def summary(self) -> dict:
        return {
            "by": self.by,
            "train_images": len(self.train_images),
            "test_images": len(self.test_images),
            "train_objects": self.n_train_objects,
            "test_objects": self.n_test_objects,
        }


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    model: the fine-tuned model (CPU, eval mode); before/after: held-out mean IoUs
    (``box``, ``box3``, ``point``, ``click1``.., ``objects``; empty without held-out
    data, ``after`` None when cancelled); steps: steps done; losses: training loss per
    step; path: the saved checkpoint (None if not saved).
    """

    model: Any
    before: dict
    after: dict | None
    steps: int
    cancelled: bool
    losses: list = field(default_factory=list)
    split: dict = field(default_factory=dict)
    path: Path | None = None
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    if labels.dtype == bool:
        return labels.astype(np.int32)
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.mod(labels, 1) == 0):
            labels = labels.astype(np.int64)
        else:
            raise TypeError(
                f"{where}: labels must be integer instance ids (0 = background), got dtype "
                f"{labels.dtype}; pick a labels layer, not an image layer"
            )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: labels contain negative ids; ids must be >= 0")
    return labels


def _check_image(image: np.ndarray, shape: tuple, where: str) -> None:
    if image.shape[: len(shape)] != shape:
        raise ValueError(
            f"{where}: image {image.shape} and labels {shape} do not have the same "
            "size; pick the labels that were drawn on this image"
        )
    extra = image.shape[len(shape) :]
    if extra not in ((), (3,)):
        raise ValueError(
            f"{where}: image must be gray or RGB (last axis 3), got shape {image.shape}; "
            "pick one channel"
        )
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool):
        raise TypeError(f"{where}: image must be numeric, got dtype {image.dtype}")


def annotated_pairs(image, labels, where: str = "pair") -> list[tuple[np.ndarray, np.ndarray]]:
    """2D (image, labels) pairs from one image or stack and its labels.

    ``labels`` ``(H, W)`` with ``image`` ``(H, W)`` or ``(H, W, 3)``: one pair.
    ``labels`` ``(Z, H, W)`` with ``image`` ``(Z, H, W)`` or ``(Z, H, W, 3)``: one pair per
    slice that has at least one object (numpy, dask or zarr arrays; read slice by slice).
    """
    lshape = tuple(np.shape(labels))
    ishape = tuple(np.shape(image))
    if len(lshape) == 2:
        lab = _check_labels(np.asarray(labels), where)
        img = np.asarray(image)
        _check_image(img, lshape, where)
        return [(img, lab)]
    if len(lshape) == 3:
        _check_image(np.empty(ishape, np.uint8), lshape, where)
        out = []
        for z in range(lshape[0]):
            lab = np.asarray(labels[z])
            if lab.any():
                out.append((np.asarray(image[z]), _check_labels(lab, f"{where}, slice {z}")))
        return out
    raise ValueError(
        f"{where}: labels must be 2D (H, W) or a 3D stack (Z, H, W), got shape {lshape}"
    )


def _as_pairs(images, labels) -> list[tuple[np.ndarray, np.ndarray]]:
    single = not isinstance(labels, (list, tuple))
    if single:
        images, labels = [images], [labels]
    if not isinstance(images, (list, tuple)) or len(images) != len(labels):
        raise ValueError(
            "images and labels must be two lists of the same length (or one image and its labels)"
        )
    pairs = []
    for i, (im, lab) in enumerate(zip(images, labels, strict=True)):
        pairs += annotated_pairs(im, lab, where=f"image {i}")
    return pairs


def _objects(lab: np.ndarray, min_area: int) -> np.ndarray:
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    return ids[counts >= min_area]


def split_annotations(
    images, labels, held_out: float = 0.2, by: str = "auto", seed: int = 0, min_area: int = 20
) -> Split:
    """Split annotated images into training and held-out pairs.

    Args:
        images, labels: lists of 2D pairs (see :func:`annotated_pairs`), or one pair.
        held_out: fraction of images (``by="images"``) or of each image's objects
            (``by="objects"``) kept out of training; at least one when > 0.
        by: "images", "objects", or "auto" (images if there are at least
            :data:`MIN_IMAGES_FOR_IMAGE_SPLIT` annotated images, else objects).
        min_area: objects smaller than this many pixels are ignored.

    Raises:
        ValueError: no objects, or too few to keep some for training and some held out.
    """
    if by not in SPLITS:
        raise ValueError(f"by must be one of {SPLITS}, got {by!r}")
    pairs = _as_pairs(images, labels)
    objs = [_objects(lab, min_area) for _, lab in pairs]
    keep = [i for i, o in enumerate(objs) if o.size]
    pairs, objs = [pairs[i] for i in keep], [objs[i] for i in keep]
    total = int(sum(o.size for o in objs))
    if total == 0:
        raise ValueError(
            f"no annotated objects (of at least {min_area} pixels) found in the labels; "
            "annotate some objects first"
        )
    rng = np.random.default_rng(seed)
    if by == "auto":
        by = "images" if len(pairs) >= MIN_IMAGES_FOR_IMAGE_SPLIT else "objects"
    if held_out <= 0:
        return Split([p[0] for p in pairs], [p[1] for p in pairs], [], [], by, total, 0)
    if by == "images":
        if len(pairs) < 2:
            raise ValueError(
                "a held-out split by images needs at least 2 annotated images; annotate "
                "another image or split by objects"
            )
        n_test = min(len(pairs) - 1, max(1, round(held_out * len(pairs))))
        test = set(rng.permutation(len(pairs))[:n_test].tolist())
        tr = [i for i in range(len(pairs)) if i not in test]
        te = sorted(test)
        return Split(
            [pairs[i][0] for i in tr],
            [pairs[i][1] for i in tr],
            [pairs[i][0] for i in te],
            [pairs[i][1] for i in te],
            "images",
            int(sum(objs[i].size for i in tr)),
            int(sum(objs[i].size for i in te)),
        )
    if total < 2:
        raise ValueError(
            "only 1 annotated object: fine-tuning with a held-out check needs at least 2 "
            "(annotate more objects, or set the held-out fraction to 0)"
        )
    # by objects: the same fraction of every image, at least one overall
    n_test = [int(np.floor(held_out * o.size)) for o in objs]
    if sum(n_test) == 0:
        n_test[int(np.argmax([o.size for o in objs]))] = 1
    split = Split([], [], [], [], "objects", 0, 0)
    for (img, lab), o, k in zip(pairs, objs, n_test, strict=True):
        test_ids = rng.permutation(o)[:k]
        train_ids = np.setdiff1d(o, test_ids)
        if train_ids.size:
            split.train_images.append(img)
            split.train_labels.append(np.where(np.isin(lab, train_ids), lab, 0))
            split.n_train_objects += int(train_ids.size)
        if test_ids.size:
            split.test_images.append(img)
            split.test_labels.append(np.where(np.isin(lab, test_ids), lab, 0))
            split.n_test_objects += int(test_ids.size)
    if split.n_train_objects == 0:
        raise ValueError("no objects left for training; lower the held-out fraction")
    return split


# ----------------------------------------------------------------------------- evaluation


def evaluate_held_out(
    model,
    images: Sequence,
    labels: Sequence,
    n_clicks: int = 3,
    max_objects: int | None = 40,
    min_area: int = 20,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Held-out mean IoUs of ``model`` through the plugin's predictor (empty dict if no data).

    See :func:`napari_sam.train.quality.interactive_miou` for the protocol.
    Raises :class:`FinetuneCancelled` when ``should_stop()`` becomes True.
    """
    if not images:
        return {}
    from napari_sam.predictor import SamPredictor
    from napari_sam.train.quality import interactive_miou

    def report(done, total):
        if should_stop is not None and should_stop():
            raise FinetuneCancelled
        if progress is not None:
            progress(done, total)

    if should_stop is not None and should_stop():
        raise FinetuneCancelled
    predictor = SamPredictor(model, cache_bytes=0)
    return interactive_miou(
        predictor,
        list(images),
        list(labels),
        n_clicks=n_clicks,
        max_objects=max_objects,
        min_area=min_area,
        seed=seed,
        progress=report,
    )


# ----------------------------------------------------------------------------- saving


def _paths(path) -> tuple[Path, Path]:
    path = Path(path).expanduser()
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"checkpoint file name must end in .pt or .pth, got {path.name!r}")
    return path, path.with_suffix(".json")


def check_save_path(path, overwrite: bool = False) -> Path:
    """Fail early (before training) if the checkpoint or its sidecar cannot be written."""
    from napari_sam.io.atomic import check_destination

    weights, sidecar = _paths(path)
    check_destination(weights, overwrite)
    check_destination(sidecar, overwrite)
    if not weights.parent.is_dir():
        raise FileNotFoundError(
            f"cannot save {weights}: the folder {weights.parent} does not exist"
        )
    return weights


def save_finetuned(model, path, info: dict | None = None, overwrite: bool = False) -> Path:
    """Save ``model``'s weights to ``path`` (``.pt``/``.pth``) and ``info`` beside it.

    The weights are a plain float32 SAM state_dict (``napari_sam.load_model(path)`` loads
    it); the sidecar ``<stem>.json`` holds ``info`` plus ``model_type``, ``config`` (the
    architecture of the project's own models, needed to rebuild them), ``sha256`` and
    ``bytes``. Both are written atomically; existing files are refused unless
    ``overwrite`` (``FileExistsError``).
    """
    import torch

    from napari_sam.io.atomic import atomic_path, atomic_write_text

    weights, sidecar = _paths(path)
    check_save_path(weights, overwrite)
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    with atomic_path(weights, overwrite=overwrite) as tmp:
        torch.save(state, tmp)
    nsam = getattr(model, "nsam_config", None)
    meta = dict(info or {})
    meta.update(
        {
            "model_type": (nsam or {}).get("model_type") or _detect(state),
            "config": dict(nsam) if nsam else None,
            "file": weights.name,
            "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "bytes": weights.stat().st_size,
            "dtype": "float32",
        }
    )
    atomic_write_text(sidecar, json.dumps(meta, indent=2, default=_json) + "\n", overwrite=True)
    return weights


def _detect(state) -> str:
    from napari_sam.model.build import detect_model_type

    try:
        return detect_model_type(state)
    except ValueError:
        return "custom"


def _json(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- fine-tuning


def _set_trainable(model, parts: tuple[str, ...]) -> None:
    for name in ("image_encoder", "prompt_encoder", "mask_decoder"):
        for p in getattr(model, name).parameters():
            p.requires_grad_(name in parts)


def finetune(
    model,
    images,
    labels,
    config: FinetuneConfig | None = None,
    *,
    save_to: str | os.PathLike | None = None,
    overwrite: bool = False,
    base_name: str = "",
    progress: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on annotated images; see the module docstring.

    Args:
        model: a SAM model (``napari_sam.load_model`` / ``build_sam`` / the project's own);
            not modified.
        images, labels: one image and its labels, or two equal-length lists; each image
            ``(H, W)``/``(H, W, 3)`` with labels ``(H, W)``, or a stack ``(Z, H, W[, 3])``
            with labels ``(Z, H, W)`` (annotated slices are used). Labels are instance ids.
        config: :class:`FinetuneConfig` (default settings if None).
        save_to: write the result here (``.pt``/``.pth`` + ``.json``) unless cancelled;
            checked before training starts.
        overwrite: replace existing files at ``save_to``.
        base_name: name of the base model, recorded in the sidecar.
        progress: ``progress(event: dict)``, see the module docstring.
        should_stop: polled during evaluation and every training step.

    Returns:
        :class:`FinetuneResult`.
    """
    import torch

    from napari_sam.train import loop

    cfg = config or FinetuneConfig()
    cfg.check()
    for attr in ("image_encoder", "prompt_encoder", "mask_decoder"):
        if not hasattr(model, attr):
            raise TypeError(f"model has no {attr!r}: pass a SAM model (napari_sam.load_model)")
    if save_to is not None:
        save_to = check_save_path(save_to, overwrite)
    t0 = time.perf_counter()
    split = split_annotations(images, labels, cfg.held_out, cfg.split, cfg.seed, cfg.min_area)
    emit = progress or (lambda ev: None)
    stop = should_stop or (lambda: False)

    work = copy.deepcopy(model).to("cpu").float().eval()
    img_size = int(work.image_encoder.img_size)
    canvas = img_size
    resizable = getattr(work, "nsam_config", None) is not None
    if resizable and cfg.canvas is not None:
        canvas = min(img_size, int(cfg.canvas))

    def evaluate(stage):
        n = len(split.test_images)
        emit({"stage": stage, "done": 0, "total": n})
        with torch.inference_mode():
            return evaluate_held_out(
                work,
                split.test_images,
                split.test_labels,
                n_clicks=cfg.eval_clicks,
                max_objects=cfg.eval_max_objects,
                min_area=cfg.min_area,
                seed=cfg.seed,
                progress=lambda d, t: emit({"stage": stage, "done": d, "total": t}),
                should_stop=stop,
            )

    result = FinetuneResult(
        model=work,
        before={},
        after=None,
        steps=0,
        cancelled=False,
        split=split.summary(),
        config=asdict(cfg),
    )
    try:
        result.before = evaluate("before")
    except FinetuneCancelled:
        result.cancelled = True
        result.seconds = time.perf_counter() - t0
        return result

    parts = TRAIN_PARTS[cfg.train]
    _set_trainable(work, parts)
    losses: list[float] = []
    stopped = {"flag": False}

    def on_event(ev):
        if ev["kind"] == "step":
            losses.append(float(ev["loss"]))
            emit({"stage": "train", "done": ev["step"], "total": cfg.steps, "loss": ev["loss"]})
        elif ev["kind"] == "done" and ev["reason"] == "stopped":
            stopped["flag"] = True

    with tempfile.TemporaryDirectory(prefix="napari-sam-finetune-") as tmp:
        tcfg = loop.TrainConfig(
            out_dir=tmp,
            canvas=canvas,
            steps=cfg.steps,
            images_per_step=min(cfg.images_per_step, len(split.train_images)),
            objects_per_image=cfg.objects_per_image,
            lr=cfg.lr,
            warmup=cfg.warmup if cfg.warmup is not None else max(1, cfg.steps // 10),
            train_encoder="image_encoder" in parts,
            box_prob=cfg.box_prob,
            max_rounds=cfg.max_rounds,
            seed=cfg.seed,
            threads=cfg.threads or torch.get_num_threads(),
            ckpt_every=0,
            eval_every=0,
            patience=0,
            resume=False,
        )
        source = loop.ArraySource(split.train_images, split.train_labels, canvas)
        emit({"stage": "train", "done": 0, "total": cfg.steps})
        if canvas != img_size:
            from napari_sam.model.small_encoder import set_canvas

            set_canvas(work, canvas)
        try:
            loop.train(tcfg, callback=on_event, source=source, should_stop=stop, model=work)
        finally:
            if canvas != img_size:
                set_canvas(work, img_size)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    result.losses, result.steps = losses, len(losses)
    if stopped["flag"]:
        result.cancelled = True
        result.seconds = time.perf_counter() - t0
        return result
    try:
        result.after = evaluate("after")
    except FinetuneCancelled:
        result.cancelled = True
        result.seconds = time.perf_counter() - t0
        return result
    if save_to is not None:
        emit({"stage": "save", "done": 0, "total": 1})
        info = {
            "base_model": base_name,
            "finetune": asdict(cfg),
            "steps": result.steps,
            "split": result.split,
            "metrics": {"before": result.before, "after": result.after},
        }
        result.path = save_finetuned(work, save_to, info, overwrite=overwrite)
        emit({"stage": "save", "done": 1, "total": 1})
    result.seconds = time.perf_counter() - t0
    return result

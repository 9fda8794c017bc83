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
2. **Held-out split** (:func:`napari_sam.finetune_data.split_annotations`): with 4 or more annotated images, a
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

from napari_sam.finetune_data import SPLITS, Split, annotated_pairs, split_annotations

TRAIN_PARTS = {
    "decoder": ("mask_decoder",),
    "decoder+prompt": ("mask_decoder", "prompt_encoder"),
    "all": ("mask_decoder", "prompt_encoder", "image_encoder"),
}

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
    clicked_parts_only: bool = True,
) -> dict:
    """Held-out mean IoUs of ``model`` through the plugin's predictor (empty dict if no data).

    See :func:`napari_sam.train.quality.interactive_miou` for the protocol; clicks keep
    only the mask parts they touch, as in the annotator (``clicked_parts_only``).
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
        clicked_parts_only=clicked_parts_only,
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
            # a smaller frame than the model's: crops at the predictor's scale, placed in
            # the model's positional-encoding frame (as the model was trained)
            pe_reference=img_size if canvas != img_size else 0,
        )
        if canvas != img_size:
            source = loop.ArraySource(
                split.train_images,
                split.train_labels,
                canvas,
                frame=img_size,
                min_side=getattr(work, "input_min_side", None),
                min_area=cfg.min_area,
            )
        else:
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

"""Named training recipes: the exact settings that produced a shipped model.

A recipe is a list of phases; each phase is a dict of :class:`~napari_sam.train.loop.TrainConfig`
fields. Phase ``i`` runs in ``<out>/phase<i>``, and phase ``i + 1`` starts from the
weights of phase ``i`` (``init``), with a fresh optimizer. ``napari-sam train --recipe
NAME --out DIR`` runs (or resumes) all phases; see docs/models.md.
"""

from __future__ import annotations

RECIPES: dict[str, list[dict]] = {
    # The embedded default model (model_type "nsam_s"), trained from scratch on
    # napari_sam.train.synthetic images only, CPU, 1 thread.
    "nsam_s": [
        {
            "canvas": 160,
            "steps": 1400,
            "images_per_step": 4,
            "objects_per_image": 6,
            "max_rounds": 3,
            "scale_range": [0.5, 1.8],
            "uint8_passthrough": 0.7,
            "lr": 1e-3,
            "warmup": 100,
            "eval_every": 200,
            "eval_images": 20,
            "ckpt_every": 25,
            "threads": 1,
            "seed": 0,
        },
        {  # continued from phase 0's best weights: warm restart at half the lr, larger
            # canvas and objects up to 2.5x (images up-sampled by the predictor)
            "canvas": 192,
            "steps": 800,
            "images_per_step": 4,
            "objects_per_image": 6,
            "max_rounds": 3,
            "scale_range": [0.5, 2.5],
            "uint8_passthrough": 0.7,
            "lr": 5e-4,
            "warmup": 50,
            "eval_every": 200,
            "eval_images": 20,
            "ckpt_every": 25,
            "threads": 1,
            "seed": 1,
        },
        {  # session 2: a long run from phase 1's best weights (the model shipped before
            # it), same data settings, warm restart at half the lr
            "canvas": 192,
            "steps": 7000,
            "images_per_step": 4,
            "objects_per_image": 6,
            "max_rounds": 3,
            "scale_range": [0.5, 2.5],
            "uint8_passthrough": 0.7,
            "lr": 5e-4,
            "warmup": 100,
            "eval_every": 500,
            "eval_images": 20,
            "ckpt_every": 25,
            "threads": 1,
            "seed": 2,
        },
    ],
}


def recipe(name: str) -> list[dict]:
    """The phases of recipe ``name`` (copies)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
    return [dict(p) for p in RECIPES[name]]

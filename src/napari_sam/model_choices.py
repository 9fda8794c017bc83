"""The models a user can pick in the GUI, and how each becomes a pair of predictors.

A :class:`ModelChoice` is a label for a list plus a loader. The list is built from what
is installed: the weights registry (``napari_sam.model.registry.MODELS``; downloaded on
first use), untrained tiny models for testing (random weights, labelled as such), and
local checkpoint files. Nothing here imports torch, Qt or napari at import time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

UNTRAINED_TAG = "untrained (testing)"

#: Small random-init configurations offered for testing, by build name (``model/build.py``).
UNTRAINED_CONFIGS = ("test_vit",)


@dataclass(frozen=True)
class ContrastSetting:
    """How image values become SAM's 8-bit input (mirrors ``napari_sam.preprocess.Contrast``).

    mode: ``"auto"`` (uint8 as is, else percentiles), ``"percentile"`` (``low``/``high``
    percentiles of the slice), ``"window"`` (``vmin``/``vmax`` image values, e.g. the
    napari layer's contrast limits or a CT window), ``"minmax"`` (the slice's range).
    """

    mode: str = "auto"
    low: float = 0.5
    high: float = 99.5
    vmin: float | None = None
    vmax: float | None = None

    def __post_init__(self):
        if self.mode not in ("auto", "percentile", "window", "minmax"):
            raise ValueError(
                "contrast mode must be 'auto', 'percentile', 'window' or 'minmax', "
                f"not {self.mode!r}"
            )
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(f"contrast percentiles need 0 <= low < high <= 100: {self}")
        if self.mode == "window" and not (
            self.vmin is not None and self.vmax is not None and self.vmin < self.vmax
        ):
            raise ValueError(f"a contrast window needs vmin < vmax, got {self.vmin}, {self.vmax}")


def _default_predictor(model, contrast: ContrastSetting):
    """The project's predictor for a model (``napari_sam.predictor.SamPredictor``)."""
    from napari_sam.predictor import SamPredictor
    from napari_sam.preprocess import Contrast

    c = Contrast(
        mode=contrast.mode,
        low=contrast.low,
        high=contrast.high,
        vmin=contrast.vmin,
        vmax=contrast.vmax,
    )
    # cache_bytes=0: the annotator keeps the per-slice embeddings (one cache, one budget)
    return SamPredictor(model, contrast=c, cache_bytes=0)


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model list.

    ``load(device) -> model`` builds the model on a device (``"auto"``, ``"cpu"``, ...),
    possibly downloading weights (call it in a worker thread). ``make_predictor(model,
    contrast)`` wraps it; the GUI makes two (one decodes, one encodes in a worker).
    """

    key: str
    label: str
    load: Callable[[str], object]
    trained: bool = True
    needs_download: bool = False
    make_predictor: Callable = field(default=_default_predictor)

    def predictors(self, model, contrast: ContrastSetting | None = None, tta: int | None = None):
        """(decoder, encoder) predictors; ``tta`` sets their test-time views (None: the
        model's default; predictors without views ignore it)."""
        contrast = contrast or ContrastSetting()
        pair = self.make_predictor(model, contrast), self.make_predictor(model, contrast)
        if tta is not None:
            for p in pair:
                if hasattr(p, "tta"):
                    p.tta = tta
        return pair


def _registry_choices() -> list[ModelChoice]:
    try:
        from napari_sam.model import registry
    except ImportError:
        return []
    choices = []
    for name, info in registry.MODELS.items():
        try:
            local = registry.cached_path(name).is_file()
        except Exception:  # an unusable cache dir must not hide the list
            local = False
        size = f"{info.size_bytes / 1e6:.0f} MB" if getattr(info, "size_bytes", None) else ""
        where = "cached" if local else f"download {size}".strip()
        desc = getattr(info, "description", "") or info.model_type
        label = f"{name}: {desc} ({where})"

        def load(device, _name=name):
            return registry.load_model(_name, device=device)

        choices.append(ModelChoice(name, label, load, trained=True, needs_download=not local))
    return choices


def _untrained_choices() -> list[ModelChoice]:
    try:
        from napari_sam.model import build
    except ImportError:
        return []
    configs = getattr(build, "CONFIGS", {})
    out = []
    for cfg in (c for c in UNTRAINED_CONFIGS if c in configs):

        def load(device, _cfg=cfg):
            return build_untrained(_cfg, device)

        out.append(ModelChoice(f"untrained:{cfg}", f"{cfg}: {UNTRAINED_TAG}", load, False))
    return out


def build_untrained(config: str, device: str = "cpu", seed: int = 0):
    """A randomly initialised model of a build config, seeded (reproducible)."""
    import torch

    from napari_sam.model.build import build_sam

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = build_sam(config)
    finally:
        torch.random.set_rng_state(state)
    return model.to(_device(device)).eval()


def _device(device: str):
    try:
        from napari_sam.devices import select_device
    except ImportError:
        import torch

        return torch.device("cpu" if device == "auto" else device)
    return select_device(device)


def file_choice(path: str | os.PathLike) -> ModelChoice:
    """A local checkpoint file (type detected from its keys)."""
    path = Path(path).expanduser()

    def load(device):
        from napari_sam.model.registry import load_model

        return load_model(path, device=device)

    return ModelChoice(f"file:{path}", f"{path.name} (local file)", load)


def _user_choices() -> list[ModelChoice]:
    """The user's own models (e.g. fine-tuned: ``napari_sam.model.user_models``)."""
    try:
        from napari_sam.model.user_models import list_user_models

        found = list_user_models()
    except Exception:  # an unusable cache dir must not hide the list
        return []
    out = []
    for m in found:
        c = file_choice(m.path)
        out.append(ModelChoice(f"user:{m.path}", f"{m.name} (your model)", c.load))
    return out


def _bundled_choices() -> list[ModelChoice]:
    """The project's default model, shipped with the package (``napari_sam/weights``)."""
    try:
        from napari_sam.model.small_encoder import default_weights
    except ImportError:
        return []
    path = default_weights()
    if not path.is_file():
        return []

    def load(device):
        from napari_sam.model.registry import load_model

        return load_model(None, device=device)

    return [ModelChoice("default", f"{path.stem}: napari-sam default model (bundled)", load)]


def default_choices() -> list[ModelChoice]:
    """The model list: official models already downloaded (stronger than the bundled one),
    the bundled default model, your models, then downloads, then untrained test models."""
    reg = _registry_choices()
    cached = [c for c in reg if not c.needs_download]
    remote = [c for c in reg if c.needs_download]
    return [*cached, *_bundled_choices(), *_user_choices(), *remote, *_untrained_choices()]


def preferred_index(choices: list[ModelChoice]) -> int | None:
    """Which choice to start with: a trained model available without a download, else an
    untrained one (clearly labelled), else None (a download needs the user's consent)."""
    for i, c in enumerate(choices):
        if c.trained and not c.needs_download:
            return i
    for i, c in enumerate(choices):
        if not c.trained:
            return i
    return None


def available_devices() -> list[str]:
    """``["auto", ...devices here]`` for a device picker (imports torch)."""
    try:
        from napari_sam.devices import available_devices as found
    except ImportError:
        import torch

        def found():
            return (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]

    return ["auto", *found()]

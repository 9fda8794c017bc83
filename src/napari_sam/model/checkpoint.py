"""Reading SAM checkpoint files safely and finding the SAM state_dict inside them.

torch is imported on first use. Files are read with ``torch.load(weights_only=True)``, so
a checkpoint can hold tensors and plain containers but never run code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")


class CheckpointError(ValueError):
    """A file is not a readable SAM checkpoint."""


def extract_sam_state_dict(obj: Any, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The SAM state_dict inside a loaded checkpoint object.

    Accepts a plain SAM state_dict (official SAM, MobileSAM), micro-sam/torch_em files
    ``{"model_state": ..., "decoder_state": ...}`` (the extra decoder is ignored) and
    ``{"state_dict": ...}``; strips a ``sam.`` or ``module.`` prefix shared by the SAM keys.
    """
    import torch

    if isinstance(obj, Mapping):
        for key in ("model_state", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{origin} does not contain a state_dict (found {type(obj).__name__})."
        )
    state = dict(obj)
    for prefix in ("sam.", "module."):
        if not any(k.startswith(_SAM_PARTS) for k in state) and any(
            k.startswith(tuple(prefix + p for p in _SAM_PARTS)) for k in state
        ):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    missing = [p.rstrip(".") for p in _SAM_PARTS if not any(k.startswith(p) for k in state)]
    if missing:
        sample = ", ".join(list(state)[:4])
        raise CheckpointError(
            f"{origin} is not a SAM checkpoint: no {', '.join(missing)} weights "
            f"(its keys start with: {sample}, ...)."
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{origin} has non-tensor entries, e.g. {bad[0]!r}.")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file safely (``weights_only=True``) and return its SAM state_dict."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            raise CheckpointError(_corrupt_message(path)) from e
        raise CheckpointError(
            f"{path} holds Python objects besides weights (e.g. {found.group(1)}), which "
            "are not loaded for safety. Save only the model's state_dict and try again."
        ) from e
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{_corrupt_message(path)} ({e})") from e
    return extract_sam_state_dict(obj, origin=str(path))


def _corrupt_message(path: Path) -> str:
    return (
        f"{path} is not a readable PyTorch checkpoint: the file is truncated, corrupt or in "
        "another format. Download it again (a registry name is re-verified by "
        "`napari-sam download NAME`)"
    )

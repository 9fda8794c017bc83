"""napari-sam: Segment Anything for scientific and medical image annotation.

Importing this package is cheap: torch and the model code are imported on first
use of the names below.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "build_sam": ("napari_sam.model.build", "build_sam"),
    "load_model": ("napari_sam.model.registry", "load_model"),
    "SamPredictor": ("napari_sam.predictor", "SamPredictor"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'napari_sam' has no attribute {name!r}")

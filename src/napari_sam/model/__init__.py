"""SAM model code (PyTorch): image encoders, prompt encoder, mask decoder, builders.

Importing this package does not import torch; the names below load on first use.
"""

from __future__ import annotations

_LAZY = {
    "Sam": ("napari_sam.model.sam", "Sam"),
    "build_sam": ("napari_sam.model.build", "build_sam"),
    "build_sam_from_parts": ("napari_sam.model.build", "build_sam_from_parts"),
    "detect_model_type": ("napari_sam.model.build", "detect_model_type"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'napari_sam.model' has no attribute {name!r}")

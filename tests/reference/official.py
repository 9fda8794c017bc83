"""Import the official segment-anything 1.0 package (PyPI) as a test/benchmark reference.

segment-anything imports a few torchvision names at package import, and no CPU build of
torchvision exists here. This module installs a minimal stand-in for exactly those
names before importing it:

- ``torchvision.transforms.functional.resize`` / ``to_pil_image``: used only on uint8
  HxWxC numpy images by ``ResizeLongestSide.apply_image``; torchvision's PIL path calls
  ``PIL.Image.resize(size[::-1], BILINEAR)``, reproduced here.
- ``torchvision.ops.boxes.batched_nms`` / ``box_area``: used by the automatic mask
  generator; plain torch versions with torchvision's semantics.

Usage: ``from reference.official import segment_anything`` (tests/ on sys.path), or
``official_available()`` to skip when the package is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _box_iou(a, b):
    import torch

    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (_box_area(a)[:, None] + _box_area(b)[None, :] - inter)


def _nms(boxes, scores, iou_threshold):
    import torch

    order = torch.argsort(scores, descending=True)
    keep = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    ious = _box_iou(boxes, boxes)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= ious[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _batched_nms(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        import torch

        return torch.empty((0,), dtype=torch.long)
    # Offset boxes per category so that boxes of different categories never overlap.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _to_pil_image(image):
    from PIL import Image

    return Image.fromarray(image)


def _resize(image, size):
    from PIL import Image

    height, width = size
    return image.resize((width, height), Image.BILINEAR)


def install_torchvision_standin() -> None:
    if "torchvision" in sys.modules:
        return
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    functional.resize = _resize
    functional.to_pil_image = _to_pil_image
    boxes.batched_nms = _batched_nms
    boxes.box_area = _box_area
    tv.transforms, transforms.functional, tv.ops, ops.boxes = transforms, functional, ops, boxes
    for name, mod in {
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes,
    }.items():
        sys.modules[name] = mod


def official_available() -> bool:
    return importlib.util.find_spec("segment_anything") is not None


def import_official():
    """Return the official ``segment_anything`` package (raises ImportError if absent)."""
    install_torchvision_standin()
    return importlib.import_module("segment_anything")

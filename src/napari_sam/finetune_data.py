"""Annotated images for fine-tuning: (image, labels) pairs and held-out splits.

Images are ``(H, W)`` gray or ``(H, W, 3)`` RGB, any numeric dtype; labels ``(H, W)``
instance ids (0 = background). Stacks ``(Z, H, W[, 3])`` with labels ``(Z, H, W)`` give one
pair per annotated slice. numpy only (no torch, Qt or napari); bad input raises
ValueError/TypeError naming the image and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("auto", "images", "objects")
MIN_IMAGES_FOR_IMAGE_SPLIT = 4

__all__ = ["MIN_IMAGES_FOR_IMAGE_SPLIT", "SPLITS", "Split", "annotated_pairs", "split_annotations"]


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

"""The napari layers the annotator works with, and the one data<->world mapping.

Every helper layer copies the image layer's geometry (scale, translate, rotate, shear,
affine), so its data coordinates *are* the image's pixel coordinates; candidate layers
hold a single plane and are shifted onto it with :func:`napari_sam.slicing.plane_translate`.
The only world -> data step is :func:`slice_key`, through the image layer's own
``world_to_data``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from napari_sam.slicing import (
    drop_to_plane,
    key_from_point,
    lift_points,
    on_plane,
    plane_axes,
    plane_layer_shape,
    plane_shape,
    plane_translate,
)

ROLE = "napari_sam"  # key in layer.metadata naming a helper layer's role

POSITIVE, NEGATIVE = "positive", "negative"
POINT_COLORS = ["#00e676", "#ff1744"]  # positive green, negative red
CANDIDATE_COLORS = ["#2979ff", "#ff9100", "#d500f9"]  # blue, orange, purple
SELECTED_OPACITY, DIMMED_OPACITY = 0.6, 0.18


def image_data(layer):
    """Full-resolution data of an image layer (level 0 of a multiscale pyramid)."""
    return layer.data[0] if layer.multiscale else layer.data


def geometry(layer) -> dict:
    """Keyword arguments giving a new layer the image layer's placement in the world."""
    return {
        "scale": np.asarray(layer.scale),
        "translate": np.asarray(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "affine": layer.affine.affine_matrix,
    }


def plane_geometry(layer, key, shape=None, size=None) -> dict:
    """Geometry of a layer holding only plane ``key`` of the image layer.

    ``size``: ``(h, w)`` when the layer holds the plane at a reduced size (``shape``: the
    image's spatial shape): each layer pixel then covers a block of ``H / h x W / w``
    image pixels (see :func:`napari_sam.slicing.plane_translate`).
    """
    from napari.utils.transforms import CompositeAffine

    geo = geometry(layer)
    lin = CompositeAffine(
        scale=geo["scale"], rotate=geo["rotate"], shear=geo["shear"], ndim=layer.ndim
    ).linear_matrix
    block = None
    if size is not None and tuple(size) != plane_shape(shape, key):
        (H, W), (h, w) = plane_shape(shape, key), size
        block = (H / h, W / w)
        r, c = plane_axes(key)
        geo["scale"] = np.array(geo["scale"], dtype=np.float64)
        geo["scale"][r] *= block[0]
        geo["scale"][c] *= block[1]
    geo["translate"] = plane_translate(
        key, np.asarray(layer.scale), geo["translate"], linear=lin, block=block
    )
    return geo


def set_geometry(target, geo: dict) -> None:
    for name in ("scale", "rotate", "shear", "affine", "translate"):
        setattr(target, name, geo[name])


def slice_key(viewer, layer, shape):
    """The image plane on screen: ``(key, reason)``; key None with a reason if there is none.

    ``viewer.dims.point`` (world) goes to the layer's data frame through its own
    ``world_to_data`` (scale, translate, rotate, shear, affine, and slice origins).
    """
    if viewer.dims.ndisplay != 2:
        return None, "switch to the 2D view (toggle 2D/3D button) to annotate"
    offset = viewer.dims.ndim - layer.ndim
    displayed = [a - offset for a in viewer.dims.displayed]
    if any(a < 0 for a in displayed):
        return None, "the displayed axes are not axes of the image layer"
    point = np.asarray(layer.world_to_data(viewer.dims.point))
    key = key_from_point(point, displayed, shape)
    if key is None:
        return None, "the current slice is outside the image: move the slider onto it"
    return key, ""


# ------------------------------------------------------------------ prompt layers
def make_points_layer(viewer, image_layer, ndim: int):
    features = pd.DataFrame({"label": pd.Categorical([], categories=[POSITIVE, NEGATIVE])})
    layer = viewer.add_points(
        np.zeros((0, ndim)),
        ndim=ndim,
        name="SAM points",
        features=features,
        feature_defaults={"label": POSITIVE},
        face_color="label",
        face_color_cycle=POINT_COLORS,
        border_color="white",
        border_width=0.1,
        size=max(
            3.0,
            0.015
            * max(
                image_layer.data.shape[-2:]
                if not image_layer.rgb
                else image_layer.data.shape[-3:-1]
            ),
        ),
        metadata={ROLE: "points"},
        **geometry(image_layer),
    )
    layer.mode = "add"
    return layer


def make_box_layer(viewer, image_layer, ndim: int):
    layer = viewer.add_shapes(
        None,
        ndim=ndim,
        name="SAM box",
        edge_color="#ffea00",
        face_color="transparent",
        edge_width=2,
        metadata={ROLE: "box"},
        **geometry(image_layer),
    )
    layer.mode = "add_rectangle"
    return layer


def read_points(layer, key):
    """Points of the layer on plane ``key``: ``(N, 2) (row, col)`` and ``(N,)`` 1/0 labels."""
    data = np.asarray(layer.data)
    if data.size == 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int32)
    keep = on_plane(data, key)
    labels = np.asarray(layer.features["label"] != NEGATIVE, dtype=np.int32)
    return drop_to_plane(data[keep], key), labels[keep]


def write_points(layer, prompts_by_key) -> None:
    """Replace the layer's points with every plane's prompts (dict key -> Prompts)."""
    chunks, labels = [], []
    for key, p in prompts_by_key.items():
        if len(p.points):
            chunks.append(lift_points(p.points, key))
            labels += [POSITIVE if v else NEGATIVE for v in p.labels]
    data = np.concatenate(chunks) if chunks else np.zeros((0, layer.ndim))
    layer.selected_data = set()
    layer.data = data
    layer.features = pd.DataFrame(
        {"label": pd.Categorical(labels, categories=[POSITIVE, NEGATIVE])}
    )
    layer.refresh_colors()


def read_box(layer, key):
    """The latest shape of the layer on plane ``key`` as ``(r0, c0, r1, c1)`` or None.

    Any shape counts by its bounding box (the layer is meant for rectangles).
    """
    boxes = [s for s in layer.data if on_plane(s[:1], key)[0]]
    if not boxes:
        return None
    rc = drop_to_plane(boxes[-1], key)
    return np.array([rc[:, 0].min(), rc[:, 1].min(), rc[:, 0].max(), rc[:, 1].max()])


def write_boxes(layer, prompts_by_key) -> None:
    rects = []
    for key, p in prompts_by_key.items():
        if p.box is not None:
            r0, c0, r1, c1 = p.box
            rects.append(lift_points([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], key))
    layer.selected_data = set()
    layer.data = []
    if rects:
        layer.add_rectangles(rects)


# --------------------------------------------------------------- candidate layers
def make_candidate_layer(viewer, image_layer, index: int, key, shape, size=None):
    """A Labels layer for candidate ``index`` on plane ``key``, at the plane's size or
    ``size`` ``(h, w)`` (a reduced size, placed with :func:`plane_geometry`)."""
    from napari.utils.colormaps import DirectLabelColormap

    cmap = DirectLabelColormap(
        color_dict={0: "transparent", 1: CANDIDATE_COLORS[index], None: "transparent"}
    )
    return viewer.add_labels(
        np.zeros(plane_layer_shape(shape, key, size), dtype=np.uint8),
        name=f"SAM candidate {index + 1}",
        colormap=cmap,
        opacity=DIMMED_OPACITY,
        blending="translucent_no_depth",
        metadata={ROLE: f"candidate{index}"},
        **plane_geometry(image_layer, key, shape, size),
    )


def show_candidate(layer, mask2d, key, shape, name: str, selected: bool, size=None) -> None:
    """Put one candidate mask (``(H, W)`` bool or None) on its layer, on plane ``key``.

    ``size``: ``(h, w)`` of the mask when it is at a reduced size (the layer's geometry
    must match, see :func:`plane_geometry`).

    Writes into the layer's array and refreshes it when the shape fits (cheaper in napari
    than assigning a new array) without recomputing the layer-list thumbnail (a few ms per
    layer; the widget refreshes thumbnails once the clicks pause); attribute changes only
    when needed.
    """
    target = plane_layer_shape(shape, key, size)
    data = layer.data
    if data.shape != target or data.dtype != np.uint8:
        data = np.zeros(target, dtype=np.uint8)
        if mask2d is not None:
            np.copyto(data, mask2d.reshape(target))
        layer.data = data
    elif mask2d is None:
        if data.any():
            data[...] = 0
            layer.refresh(thumbnail=False)
    else:
        np.copyto(data, mask2d.reshape(target))
        layer.refresh(thumbnail=False)
    opacity = SELECTED_OPACITY if selected else DIMMED_OPACITY
    if layer.opacity != opacity:
        layer.opacity = opacity
    if layer.name != name:
        layer.name = name


def size_names(masks) -> list[str]:
    """Name each of three masks by area rank: sub-part < part < whole."""
    areas = np.asarray([m.sum() for m in masks])
    ranks = np.argsort(np.argsort(areas, kind="stable"), kind="stable")
    return [("sub-part", "part", "whole")[r] for r in ranks]


# ---------------------------------------------------------------- objects layer
def make_objects_layer(viewer, image_layer, labels):
    return viewer.add_labels(
        labels,
        name=f"{image_layer.name} SAM objects",
        metadata={ROLE: "objects", "image": image_layer.name},
        **geometry(image_layer),
    )


def find_layer(viewer, role: str, **match):
    for layer in viewer.layers:
        md = layer.metadata
        if md.get(ROLE) == role and all(md.get(k) == v for k, v in match.items()):
            return layer
    return None

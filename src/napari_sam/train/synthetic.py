"""Procedural microscopy-like images and stacks with instance labels.

Deterministic by seed, numpy/scipy only (no torch), fast enough to generate training data
on the fly (a 256 x 256 image takes a few tens of milliseconds).

What an image contains (the ``kind`` argument picks the scene):

- ``"nuclei"``: star-convex blobs (ellipses with low-frequency boundary harmonics) with
  texture (chromatin-like smooth noise, bright speckles, dark nucleoli), radial
  profiles, a wide spread of sizes and intensities (dim objects included), touching and
  partly overlapping neighbours (the object drawn last is on top; labels follow).
- ``"cells"``: larger irregular cells with a cytoplasm stain, often with a brighter
  nucleus inside; a dense ``tissue`` variant fills a region with touching cells
  (a noisy Voronoi tessellation) separated by thin dark gaps or bright membranes.
- ``"membrane"``: ring-like objects: only a band along the boundary is stained
  (membrane, vesicles); the instance label covers the whole enclosed area.
- ``"elongated"``: rods, bent rods and thin fibres (bacteria, mitochondria-like).
- ``"mixed"`` (default): one of the above or a combination of two.

Then the image formation: objects are drawn on an uneven background (smooth gradient
and illumination fall-off, faint out-of-focus haze, small unlabelled debris), blurred
by a Gaussian PSF so that boundaries are soft like real optics, some scenes are rendered
with inverted contrast (dark objects on a bright background), and noise is applied:
Poisson shot noise at a random photon budget plus Gaussian read noise. The result is
quantised to ``uint8`` (8-bit), ``uint16`` (16-bit, camera offset and a random part of
the range used) or returned as ``float32``.

Labels are ``int32`` of the same shape: 0 background, objects 1..N (consecutive). The
label of an object is its un-blurred shape; blur is symmetric around it, so the
half-maximum boundary of the intensity lies on the label boundary.

Public API::

    image, labels = make_image(seed, shape=(256, 256), kind="mixed", bit_depth=8)
    volume, labels = make_volume(seed, shape=(32, 128, 128), kind="mixed", bit_depth=16)

``make_volume`` objects are ellipsoids (nuclei) and tubes (z-running, slowly drifting in
x/y) with a known, finite z-extent: ``z_extent(labels, i)`` returns the first and last z
of object ``i``. Axis order is always numpy's: images ``(rows, cols)`` = ``(y, x)``,
volumes ``(z, y, x)``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

KINDS = ("nuclei", "cells", "membrane", "elongated", "mixed")
VOLUME_KINDS = ("nuclei", "tubes", "mixed", "dense")
BIT_DEPTHS = (8, 16, None)

__all__ = [
    "BIT_DEPTHS",
    "KINDS",
    "VOLUME_KINDS",
    "make_image",
    "make_volume",
    "z_extent",
]


# ----------------------------------------------------------------------------- checks


def _check_shape(shape, ndim: int, minimum: int) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of {ndim} ints, got {shape!r}") from None
    if len(shape) != ndim:
        raise ValueError(f"shape must have {ndim} entries, got {shape!r}")
    if min(shape) < minimum:
        raise ValueError(f"every side of shape must be >= {minimum} pixels, got {shape!r}")
    return shape


def _check_bit_depth(bit_depth) -> None:
    if bit_depth not in BIT_DEPTHS:
        raise ValueError(f"bit_depth must be 8, 16 or None (float32), got {bit_depth!r}")


# ----------------------------------------------------------------------------- shapes


class _Shape:
    """One rasterised object in a bounding box of the canvas.

    ``inside``: bool mask in the box; ``depth``: distance from the boundary inwards in
    pixels (approximate, >= 0 inside), used for membrane bands and radial profiles;
    ``rel``: normalised radius in [0, 1] inside (0 centre, 1 boundary).
    """

    __slots__ = ("center", "depth", "inside", "rel", "sl")

    def __init__(self, sl, inside, depth, rel):
        self.sl, self.inside, self.depth, self.rel = sl, inside, depth, rel
        self.center = None


def _box(center, half, shape):
    """Slices of the box ``center +- half`` clipped to ``shape`` (or None if outside)."""
    sl = []
    for c, h, n in zip(center, half, shape, strict=True):
        lo, hi = max(int(np.floor(c - h)), 0), min(int(np.ceil(c + h)) + 1, n)
        if hi - lo < 2:
            return None
        sl.append(slice(lo, hi))
    return tuple(sl)


def _grid(sl, center):
    """Pixel-centre coordinates of box ``sl`` relative to ``center`` (y, x), float32."""
    y = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None] - np.float32(center[0])
    x = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :] - np.float32(center[1])
    return y, x


def _star(rng, center, radius, aspect, angle, roughness, shape):
    """Ellipse of mean ``radius`` and ``aspect`` >= 1, boundary perturbed by harmonics 2..5."""
    a, b = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    k = np.arange(2, 6)
    amp = roughness * rng.uniform(0.3, 1.0, k.size) / k
    phase = rng.uniform(0, 2 * np.pi, k.size)
    half = a * (1 + amp.sum()) + 2
    sl = _box(center, (half, half), shape)
    if sl is None:
        return None
    y, x = _grid(sl, center)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = (x * c + y * s) / a, (-x * s + y * c) / b
    rho = np.sqrt(u * u + v * v)
    theta = np.arctan2(v, u)
    bound = 1 + sum(m * np.cos(kk * theta + p) for m, kk, p in zip(amp, k, phase, strict=True))
    rel = rho / bound
    inside = rel < 1
    if inside.sum() < 4:
        return None
    depth = (1 - rel) * np.float32(radius)
    return _Shape(sl, inside, depth, np.clip(rel, 0, 1))


def _rod(rng, center, length, width, angle, bend, shape):
    """Capsule of ``length`` x ``width`` bent by curvature ``bend`` (1/pixels)."""
    half = length / 2 + width + abs(bend) * length**2 / 8 + 2
    sl = _box(center, (half, half), shape)
    if sl is None:
        return None
    y, x = _grid(sl, center)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = x * c + y * s, -x * s + y * c
    v = v - np.float32(bend) * u * u / 2
    # width tapers a little towards the ends; distance to the centre segment
    w = width / 2 * (1 - 0.25 * np.clip(np.abs(u) / (length / 2 + 1e-6), 0, 1) ** 2)
    du = np.maximum(np.abs(u) - length / 2, 0)
    d = np.sqrt(du * du + v * v)
    inside = d < w
    if inside.sum() < 4:
        return None
    return _Shape(sl, inside, np.maximum(w - d, 0), np.clip(d / w, 0, 1))


# ----------------------------------------------------------------------------- fields


def _smooth_noise(rng, shape, sigma):
    """Zero-mean, unit-std smooth Gaussian noise field of ``shape`` with scale ``sigma``."""
    # Generate at reduced resolution for large sigma (fast), then zoom up.
    factor = max(1, int(sigma // 3))
    small = tuple(max(2, -(-n // factor)) for n in shape)
    f = ndi.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / factor)
    if factor > 1:
        f = ndi.zoom(f, [n / m for n, m in zip(shape, small, strict=True)], order=1)
        f = f[tuple(slice(0, n) for n in shape)]
    f -= f.mean()
    return f / (f.std() + 1e-6)


def _background(rng, shape):
    """Uneven background in [0, ~0.3] and a multiplicative illumination field in (0, 1]."""
    ndim = len(shape)
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    grad = sum(rng.normal(0, 1) * g for g in grids) / np.sqrt(ndim)
    level = rng.uniform(0.0, 0.15)
    bg = (
        level
        + rng.uniform(0, 0.06) * grad
        + rng.uniform(0, 0.04) * _smooth_noise(rng, shape, max(shape) / 6)
    )
    # Illumination: vignetting around a random centre, strength 0..40 %.
    centre = [rng.uniform(-0.5, 0.5) for _ in shape]
    r2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    illum = 1 - rng.uniform(0, 0.4) * np.clip(r2 / 2, 0, 1)
    return np.clip(bg, 0, None).astype(np.float32), illum.astype(np.float32)


# ----------------------------------------------------------------------------- painting


class _Canvas:
    """Float intensity + int32 labels; objects are painted on top of each other."""

    def __init__(self, rng, shape):
        self.rng = rng
        self.shape = shape
        self.image = np.zeros(shape, np.float32)
        self.labels = np.zeros(shape, np.int32)
        self.n = 0
        # Shared texture fields: fine (chromatin) and coarse (uneven staining).
        self.tex_fine = _smooth_noise(rng, shape, rng.uniform(0.7, 1.5))
        self.tex_coarse = _smooth_noise(rng, shape, rng.uniform(3, 6))

    def free(self, shp: _Shape, max_overlap: float) -> bool:
        """True if the shape overlaps existing objects by at most ``max_overlap`` of its area."""
        taken = self.labels[shp.sl][shp.inside] > 0
        return taken.mean() <= max_overlap

    def paint(self, shp: _Shape, value, label: bool = True):
        """Overwrite intensity inside the shape with ``value`` (array over the box or scalar)."""
        region = self.image[shp.sl]
        vals = np.broadcast_to(np.asarray(value, np.float32), region.shape)
        region[shp.inside] = vals[shp.inside]
        if label:
            self.n += 1
            self.labels[shp.sl][shp.inside] = self.n

    def texture(self, shp: _Shape, fine: float, coarse: float):
        t = 1 + fine * self.tex_fine[shp.sl] + coarse * self.tex_coarse[shp.sl]
        return np.clip(t, 0.2, None)


def _nucleus_value(rng, canvas, shp, brightness):
    """Intensity of a nucleus: radial profile, chromatin texture, speckles, nucleoli."""
    profile = 1 - rng.uniform(0, 0.35) * shp.rel**2  # brighter centre, dimmer rim
    rim = rng.uniform(0, 0.3)  # some nuclei have a brighter envelope
    profile = profile + rim * np.exp(-np.maximum(shp.depth, 0) / 1.2)  # inside: depth >= 0
    val = brightness * profile * canvas.texture(shp, rng.uniform(0.05, 0.3), rng.uniform(0, 0.2))
    if rng.random() < 0.4:  # dark nucleoli
        for _ in range(rng.integers(1, 4)):
            cy = rng.uniform(0.3, 0.7) * val.shape[0]
            cx = rng.uniform(0.3, 0.7) * val.shape[1]
            r = rng.uniform(1, 0.15 * min(val.shape) + 1)
            yy, xx = np.ogrid[: val.shape[0], : val.shape[1]]
            val = val * (1 - 0.5 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))
    return val


def _place(rng, canvas, make, n, max_overlap, tries=6):
    """Place up to ``n`` shapes from ``make()``, rejecting those overlapping too much."""
    shapes = []
    for _ in range(n):
        for _ in range(tries):
            shp = make()
            if shp is not None and canvas.free(shp, max_overlap):
                shapes.append(shp)
                break
    return shapes


def _random_center(rng, shape, margin=-2.0):
    return [rng.uniform(-margin, n + margin) for n in shape]


def _scene_nuclei(rng, canvas, density, scale):
    h, w = canvas.shape
    r_lo, r_hi = 3.0 * scale, rng.uniform(10, 28) * scale
    area = h * w * density
    n = int(area / (np.pi * ((r_lo + r_hi) / 2) ** 2)) + 1
    overlap = rng.choice([0.0, 0.1, 0.3])
    base = rng.uniform(0.35, 0.9)
    clump = rng.choice([0.0, 0.4, 0.8])  # probability to grow a clump of touching nuclei
    spread = rng.uniform(0.1, 0.5)  # brightness spread between nuclei (log-normal sigma)
    placed: list[tuple[float, float, float]] = []  # (y, x, r) of placed nuclei

    def make():
        r = np.exp(rng.uniform(np.log(r_lo), np.log(r_hi)))
        if placed and rng.random() < clump:
            y, x, r0 = placed[rng.integers(len(placed))]
            a = rng.uniform(0, 2 * np.pi)
            d = (r0 + r) * rng.uniform(0.85, 1.1)
            center = [y + d * np.sin(a), x + d * np.cos(a)]
        else:
            center = _random_center(rng, canvas.shape)
        shp = _star(
            rng,
            center,
            r,
            rng.uniform(1, 2.0),
            rng.uniform(0, np.pi),
            rng.uniform(0, 0.35),
            canvas.shape,
        )
        if shp is not None:
            shp.center = (center[0], center[1], r)
        return shp

    for shp in _place(rng, canvas, make, n, overlap):
        placed.append(shp.center)
        b = base * np.exp(rng.normal(0, spread))  # includes dim nuclei
        canvas.paint(shp, _nucleus_value(rng, canvas, shp, b))


def _scene_cells(rng, canvas, density, scale):
    if rng.random() < 0.5:
        _scene_tissue(rng, canvas, scale)
        return
    h, w = canvas.shape
    r_lo, r_hi = 8.0 * scale, rng.uniform(18, 40) * scale
    n = int(h * w * density / (np.pi * ((r_lo + r_hi) / 2) ** 2)) + 1
    base = rng.uniform(0.25, 0.7)
    with_nucleus = rng.random() < 0.6

    def make():
        r = np.exp(rng.uniform(np.log(r_lo), np.log(r_hi)))
        return _star(
            rng,
            _random_center(rng, canvas.shape),
            r,
            rng.uniform(1, 2.5),
            rng.uniform(0, np.pi),
            rng.uniform(0.2, 0.7),
            canvas.shape,
        )

    for shp in _place(rng, canvas, make, n, rng.choice([0.0, 0.15])):
        b = base * np.exp(rng.normal(0, 0.3))
        val = b * canvas.texture(shp, rng.uniform(0.05, 0.2), rng.uniform(0.1, 0.4))
        val = val * (1 - 0.3 * shp.rel**3)
        if with_nucleus:
            inner = (shp.rel < rng.uniform(0.35, 0.55)).astype(np.float32)
            inner = ndi.gaussian_filter(inner, 1.0)
            val = val * (1 + rng.uniform(0.3, 1.5) * inner)
        canvas.paint(shp, val)


def _scene_tissue(rng, canvas, scale):
    """Dense touching cells: noisy Voronoi tessellation inside a random region."""
    h, w = canvas.shape
    cell = rng.uniform(12, 30) * scale
    n = max(2, int(h * w / cell**2))
    seeds = np.stack([rng.uniform(0, h, n), rng.uniform(0, w, n)], 1).astype(np.float32)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    wobble = rng.uniform(0.5, 3) * scale
    py = yy + wobble * _smooth_noise(rng, (h, w), 6)
    px = xx + wobble * _smooth_noise(rng, (h, w), 6)
    # Nearest seed by brute force in chunks of seeds (n is at most a few hundred).
    best = np.full((h, w), np.inf, np.float32)
    idx = np.zeros((h, w), np.int32)
    for i, (sy, sx) in enumerate(seeds):
        d = (py - sy) ** 2 + (px - sx) ** 2
        closer = d < best
        best[closer] = d[closer]
        idx[closer] = i
    # Region occupied by tissue: a smooth blob covering 40-100 % of the canvas.
    region = _smooth_noise(rng, (h, w), max(h, w) / 5) > rng.uniform(-1.5, 0.3)
    membrane_mode = rng.random() < 0.5
    gap = ndi.grey_dilation(idx, size=3) != ndi.grey_erosion(idx, size=3)
    base = rng.uniform(0.3, 0.8)
    tex = canvas.texture(_Shape((slice(0, h), slice(0, w)), None, None, None), 0.15, 0.25)
    dist = ndi.distance_transform_edt(~gap).astype(np.float32)
    for i in range(n):
        m = (idx == i) & region
        if m.sum() < 20 * scale**2:
            continue
        canvas.n += 1
        canvas.labels[m] = canvas.n
        if membrane_mode:
            thick = rng.uniform(0.8, 2.0)
            v = base * (0.15 + rng.uniform(0, 0.15) + np.exp(-((dist[m] / thick) ** 2)))
        else:
            v = base * np.exp(rng.normal(0, 0.3)) * (1 - 0.8 * (dist[m] < 1.0))
        canvas.image[m] = v * tex[m]


def _scene_membrane(rng, canvas, density, scale):
    h, w = canvas.shape
    r_lo, r_hi = 6.0 * scale, rng.uniform(15, 35) * scale
    n = int(h * w * density / (np.pi * ((r_lo + r_hi) / 2) ** 2)) + 1
    base = rng.uniform(0.4, 0.9)
    thick = rng.uniform(1.0, 3.0) * scale
    fill = rng.uniform(0.0, 0.3)

    def make():
        r = np.exp(rng.uniform(np.log(r_lo), np.log(r_hi)))
        return _star(
            rng,
            _random_center(rng, canvas.shape),
            r,
            rng.uniform(1, 1.8),
            rng.uniform(0, np.pi),
            rng.uniform(0, 0.4),
            canvas.shape,
        )

    for shp in _place(rng, canvas, make, n, rng.choice([0.0, 0.1])):
        b = base * np.exp(rng.normal(0, 0.25))
        band = np.exp(-((shp.depth / thick) ** 2))
        val = b * (fill + band) * canvas.texture(shp, 0.15, 0.3)
        canvas.paint(shp, val)


def _scene_elongated(rng, canvas, density, scale):
    h, w = canvas.shape
    width_hi = rng.uniform(4, 12) * scale
    mean_len = rng.uniform(15, 60) * scale
    n = int(h * w * density / (mean_len * width_hi * 1.5)) + 1
    base = rng.uniform(0.4, 0.9)
    aligned = rng.random() < 0.3
    main_angle = rng.uniform(0, np.pi)

    def make():
        width = rng.uniform(min(max(2.5, 0.35 * width_hi), width_hi), width_hi)
        length = mean_len * np.exp(rng.normal(0, 0.4))
        angle = main_angle + rng.normal(0, 0.2) if aligned else rng.uniform(0, np.pi)
        bend = rng.normal(0, 1.5 / max(length, 1))
        return _rod(
            rng, _random_center(rng, canvas.shape), length, width, angle, bend, canvas.shape
        )

    for shp in _place(rng, canvas, make, n, rng.choice([0.0, 0.1, 0.25])):
        b = base * np.exp(rng.normal(0, 0.3))
        val = b * (1 - 0.3 * shp.rel**2) * canvas.texture(shp, 0.1, 0.2)
        canvas.paint(shp, val)


_SCENES = {
    "nuclei": _scene_nuclei,
    "cells": _scene_cells,
    "membrane": _scene_membrane,
    "elongated": _scene_elongated,
}


def _debris(rng, image, labels, amount):
    """Small unlabelled specks and faint out-of-focus haze in the background."""
    h, w = image.shape
    n = rng.poisson(amount * h * w / 4000)
    if n:
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        spots = np.zeros_like(image)
        spots[ys, xs] = rng.uniform(0.1, 0.6, n)
        spots = ndi.gaussian_filter(spots, rng.uniform(0.6, 1.0)) * 4
        image += np.where(labels == 0, spots, 0)
    if rng.random() < 0.4:
        haze = np.zeros_like(image)
        k = rng.integers(1, 5)
        haze[rng.integers(0, h, k), rng.integers(0, w, k)] = 1
        s = rng.uniform(8, 20)
        haze = ndi.gaussian_filter(haze, s) * (2 * np.pi * s * s) * rng.uniform(0.05, 0.2)
        image += haze


# ----------------------------------------------------------------------------- imaging


def _acquire(rng, clean, bit_depth, blur, z_blur=None):
    """Blur, noise and quantisation of a float scene in ~[0, 1]."""
    sigma = [blur] * clean.ndim
    if z_blur is not None:
        sigma[0] = z_blur
    img = ndi.gaussian_filter(clean, sigma) if blur > 0 else clean
    img = np.clip(img, 0, None)
    photons = np.exp(rng.uniform(np.log(15), np.log(3000)))  # photons at intensity 1
    img = rng.poisson(img * photons).astype(np.float32) / np.float32(photons)
    img += rng.normal(0, rng.uniform(0, 0.03), img.shape).astype(np.float32)
    if bit_depth is None:
        return img.astype(np.float32)
    if bit_depth == 8:
        scale = rng.uniform(100, 250)
        return np.clip(np.round(img * scale), 0, 255).astype(np.uint8)
    offset = rng.choice([0, 100, rng.uniform(50, 2000)])
    scale = np.exp(rng.uniform(np.log(300), np.log(40000)))
    return np.clip(np.round(offset + img * scale), 0, 65535).astype(np.uint16)


def _relabel(labels):
    """Consecutive ids 1..N, dropping objects with fewer than 6 visible pixels."""
    ids, counts = np.unique(labels, return_counts=True)
    keep = ids[(ids > 0) & (counts >= 6)]
    lut = np.zeros(labels.max() + 1, np.int32)
    lut[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lut[labels]


def make_image(
    seed: int,
    shape: tuple[int, int] = (256, 256),
    kind: str = "mixed",
    bit_depth: int | None = 8,
    *,
    scale: float = 1.0,
):
    """A microscopy-like 2D image with instance labels, deterministic by ``seed``.

    Args:
        seed: any non-negative int; the same (seed, shape, kind, bit_depth, scale) always
            gives the same result.
        shape: ``(rows, cols)``, each >= 16.
        kind: one of :data:`KINDS` (see the module docstring).
        bit_depth: 8 (``uint8``), 16 (``uint16``) or None (``float32``, roughly [0, 1]).
        scale: object size multiplier (1.0: radii of ~3-40 px).

    Returns:
        ``(image, labels)``: image ``(rows, cols)`` of the dtype above, labels
        ``(rows, cols)`` int32, 0 = background, objects 1..N.
    """
    shape = _check_shape(shape, 2, 16)
    _check_bit_depth(bit_depth)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    rng = np.random.default_rng([int(seed), 2])
    canvas = _Canvas(rng, shape)
    if kind == "mixed":
        names = list(_SCENES)
        first = rng.choice(names, p=[0.4, 0.2, 0.2, 0.2])
        scenes = [first]
        if rng.random() < 0.3:
            scenes.append(rng.choice([s for s in names if s != first]))
    else:
        scenes = [kind]
    density = rng.uniform(0.15, 0.55) / len(scenes)
    for name in scenes:
        _SCENES[name](rng, canvas, density, scale)
    labels = _relabel(canvas.labels)
    bg, illum = _background(rng, shape)
    clean = canvas.image.copy()
    if labels.max() > 2 and rng.random() < 0.3:  # some objects out of focus
        oof = np.isin(labels, np.flatnonzero(rng.random(labels.max() + 1) < 0.25))
        layer = np.where(oof, clean, 0)
        clean = np.where(oof, 0, clean) + ndi.gaussian_filter(layer, rng.uniform(1.5, 3.5) * scale)
    _debris(rng, clean, labels, rng.uniform(0, 1.5))
    clean = (clean + bg) * illum
    if rng.random() < 0.15:  # dark objects on a bright background (transmitted light)
        clean = np.clip(0.9 - 0.8 * clean, 0, None) * illum
    img = _acquire(rng, clean, bit_depth, rng.uniform(0.4, 1.8) * min(scale, 2.0))
    return img, labels


# ----------------------------------------------------------------------------- 3D


def _ellipsoid(rng, center, radii, angle, roughness, shape):
    """Ellipsoid (z, y, x radii) rotated in the x/y plane, boundary perturbed in angle."""
    half = [
        radii[0] + 1,
        max(radii[1:]) * (1 + roughness) + 2,
        max(radii[1:]) * (1 + roughness) + 2,
    ]
    sl = []
    for c, hh, n in zip(center, half, shape, strict=True):
        lo, hi = max(int(np.floor(c - hh)), 0), min(int(np.ceil(c + hh)) + 1, n)
        if hi - lo < 1:
            return None
        sl.append(slice(lo, hi))
    z = np.arange(sl[0].start, sl[0].stop, dtype=np.float32)[:, None, None] - center[0]
    y = np.arange(sl[1].start, sl[1].stop, dtype=np.float32)[None, :, None] - center[1]
    x = np.arange(sl[2].start, sl[2].stop, dtype=np.float32)[None, None, :] - center[2]
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = (x * c + y * s) / radii[2], (-x * s + y * c) / radii[1]
    theta = np.arctan2(v, u)
    k = np.arange(2, 5)
    amp = roughness * rng.uniform(0.3, 1, k.size) / k
    ph = rng.uniform(0, 2 * np.pi, k.size)
    bound = 1 + sum(m * np.cos(kk * theta + p) for m, kk, p in zip(amp, k, ph, strict=True))
    rel = np.sqrt(u * u + v * v + (z / radii[0]) ** 2) / bound
    inside = rel < 1
    if inside.sum() < 8:
        return None
    return tuple(sl), inside, np.clip(rel, 0, 1)


def _tube(rng, z0, z1, yx0, radius, shape):
    """Tube running from z0 to z1 (inclusive) with a slowly drifting centre."""
    d, h, w = shape
    nz = z1 - z0 + 1
    drift = np.cumsum(rng.normal(0, 0.6, (nz, 2)), 0)
    drift -= drift.mean(0)
    inside = np.zeros((nz, h, w), bool)
    rel = np.ones((nz, h, w), np.float32)
    yy, xx = np.ogrid[:h, :w]
    for i in range(nz):
        cy, cx = yx0[0] + drift[i, 0], yx0[1] + drift[i, 1]
        r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / radius
        inside[i] = r < 1
        rel[i] = np.clip(r, 0, 1)
    if inside.sum() < 8:
        return None
    return (slice(z0, z1 + 1), slice(0, h), slice(0, w)), inside, rel


def make_volume(
    seed: int,
    shape: tuple[int, int, int] = (32, 128, 128),
    kind: str = "mixed",
    bit_depth: int | None = 16,
):
    """A microscopy-like 3D stack with instance labels, deterministic by ``seed``.

    Objects are ellipsoids (nuclei: z radius 2..shape[0]/3, x/y radius 5..20 px, rotated
    in x/y, slightly irregular, textured) and tubes (radius 3..8 px, running along z over a
    random range of slices with a slowly drifting centre). ``"dense"``: tissue-like
    packing, nuclei (z radius 1.5..5, x/y radius 5..14 px) on a jittered 3D grid, so that
    they touch their neighbours, also above and below (where a propagated mask must stop
    at the end of one nucleus instead of running into the next), in the haze of
    out-of-focus light and stronger z blur of thick tissue. Every object has a
    finite z extent inside the stack; ``z_extent(labels, i)`` reads it back. The stack is blurred
    anisotropically (more in z, like a widefield/confocal PSF) and noised like
    :func:`make_image`.

    Args:
        seed: non-negative int.
        shape: ``(z, rows, cols)``, each >= 8.
        kind: ``"nuclei"`` (ellipsoids), ``"tubes"``, ``"mixed"`` (both) or ``"dense"``
            (packed nuclei).
        bit_depth: 8, 16 or None (float32).

    Returns:
        ``(volume, labels)``: volume ``(z, rows, cols)``, labels ``(z, rows, cols)``
        int32 (0 background, objects 1..N).
    """
    shape = _check_shape(shape, 3, 8)
    _check_bit_depth(bit_depth)
    if kind not in VOLUME_KINDS:
        raise ValueError(f"kind must be one of {VOLUME_KINDS}, got {kind!r}")
    rng = np.random.default_rng([int(seed), 3])
    d, h, w = shape
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int32)
    tex = _smooth_noise(rng, shape, 1.2)
    n_obj = 0
    want_nuclei = kind in ("nuclei", "mixed")
    want_tubes = kind in ("tubes", "mixed")
    n_nuc = int(h * w / 900 * rng.uniform(0.5, 1.2)) if want_nuclei else 0
    n_tub = int(h * w / 2500 * rng.uniform(0.5, 1.5)) + 1 if want_tubes else 0
    objects = []
    for _ in range(n_nuc):
        rz = rng.uniform(2, max(2.5, d / 3))
        r = rng.uniform(5, 20)
        aspect = rng.uniform(1, 1.6)
        radii = (rz, r / np.sqrt(aspect), r * np.sqrt(aspect))
        center = (rng.uniform(rz, d - 1 - rz), rng.uniform(0, h), rng.uniform(0, w))
        objects.append(_ellipsoid(rng, center, radii, rng.uniform(0, np.pi), 0.25, shape))
    for _ in range(n_tub):
        length = int(rng.uniform(0.3, 0.9) * d)
        z0 = int(rng.integers(0, d - length))
        yx = (rng.uniform(10, h - 10), rng.uniform(10, w - 10))
        objects.append(_tube(rng, z0, z0 + length - 1, yx, rng.uniform(3, 8), shape))
    if kind == "dense":
        objects = _dense_nuclei(rng, shape)
    for obj in objects:
        if obj is None:
            continue
        sl, inside, rel = obj
        taken = labels[sl] > 0
        if kind == "dense":  # touching: an object fills only the voxels still free
            inside = inside & ~taken
            if inside.sum() < 20:
                continue
        elif (taken[inside]).mean() > 0.1:
            continue
        n_obj += 1
        b = rng.uniform(0.3, 0.9) * (1 - 0.3 * rel**2) * (1 + 0.2 * tex[sl])
        image[sl][inside] = b[inside]
        labels[sl][inside] = n_obj
    labels = _relabel(labels)
    bg = rng.uniform(0.02, 0.15) + 0.03 * _smooth_noise(rng, shape, max(shape) / 6)
    z_blur = rng.uniform(0.6, 1.5)
    if kind == "dense":
        # thick tissue: out-of-focus light from the nuclei themselves (a broad blur of the
        # scene) lifts the background between them, and the z blur is stronger
        haze = ndi.gaussian_filter(image, (3.0, 6.0, 6.0))
        bg = bg + rng.uniform(0.0, 1.2) * haze
        z_blur = rng.uniform(0.8, 2.5)
    clean = image + np.clip(bg, 0, None)
    img = _acquire(rng, clean, bit_depth, rng.uniform(0.5, 1.2), z_blur=z_blur)
    return img, labels


def _dense_nuclei(rng, shape) -> list:
    """Ellipsoids on a jittered grid whose spacing is about their diameter (they touch)."""
    d, h, w = shape
    rz_mean, r_mean = rng.uniform(2, 4), rng.uniform(6, 11)
    out = []
    for zc in np.arange(rz_mean * 0.8, d, 2 * rz_mean * 0.95):
        for yc in np.arange(r_mean * 0.5, h, 2 * r_mean * 0.9):
            for xc in np.arange(r_mean * 0.5, w, 2 * r_mean * 0.9):
                if rng.random() < 0.15:  # some gaps
                    continue
                rz = float(np.clip(rz_mean * rng.uniform(0.75, 1.3), 1.5, 5))
                r = float(np.clip(r_mean * rng.uniform(0.8, 1.25), 5, 14))
                aspect = rng.uniform(1, 1.5)
                radii = (rz, r / np.sqrt(aspect), r * np.sqrt(aspect))
                jitter = rng.normal(0, [0.3 * rz, 0.25 * r, 0.25 * r])
                center = np.clip(np.array([zc, yc, xc]) + jitter, 0, np.array(shape) - 1)
                out.append(
                    _ellipsoid(rng, tuple(center), radii, rng.uniform(0, np.pi), 0.25, shape)
                )
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def z_extent(labels: np.ndarray, label: int) -> tuple[int, int]:
    """First and last z index (inclusive) of object ``label`` in a ``(z, y, x)`` stack."""
    if labels.ndim != 3:
        raise ValueError(f"labels must be (z, y, x), got shape {labels.shape}")
    zs = np.flatnonzero((labels == label).any(axis=(1, 2)))
    if zs.size == 0:
        raise ValueError(f"label {label} is not present in the stack")
    return int(zs[0]), int(zs[-1])

"""Sample images for trying the plugin without any data of your own.

The images are procedural (deterministic by seed) so that they ship with the
package and need no download.
"""

from __future__ import annotations

import numpy as np


def _blobs(shape, n, seed, radius=(10, 22)):
    rng = np.random.default_rng(seed)
    ndim = len(shape)
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    image = np.zeros(shape, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint16)
    for i in range(1, n + 1):
        center = [rng.uniform(0.1 * s, 0.9 * s) for s in shape]
        radii = rng.uniform(*radius, size=ndim)
        if ndim == 3:
            radii[0] = radii[0] * shape[0] / max(shape[1:]) * 3
        d = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii, strict=True))
        inside = d <= 1.0
        labels[inside & (labels == 0)] = i
        image += rng.uniform(0.5, 1.0) * np.clip(1.2 - d, 0, 1) ** 0.5 * inside
    image += 0.05 * rng.standard_normal(shape).astype(np.float32) + 0.1
    return (np.clip(image, 0, None) * 4000).astype(np.uint16), labels


def sample_cells_2d():
    image, _ = _blobs((512, 512), 40, seed=0)
    return [(image, {"name": "nuclei (synthetic)"}, "image")]


def sample_cells_3d():
    image, _ = _blobs((32, 256, 256), 15, seed=1)
    return [(image, {"name": "nuclei stack (synthetic)", "scale": (2.0, 1.0, 1.0)}, "image")]

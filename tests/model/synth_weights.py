"""Deterministic synthetic weights from a recorded ``{key: shape}`` layout (numpy RNG).

Used for parity fixtures of models without an installable reference (MobileSAM's TinyViT):
the same seed and layout give bit-identical weights on any machine, so a stored reference
output can be recomputed against. Changing this function invalidates those fixtures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load_layout(name: str) -> dict:
    """Parsed ``tests/fixtures/layout_<name>.json`` (keys: source, layout, dtypes, ...)."""
    return json.loads((FIXTURES / f"layout_{name}.json").read_text())


def synth_state_dict(
    layout: dict[str, list[int]], dtypes: dict[str, str] | None = None, seed: int = 0
) -> dict[str, np.ndarray]:
    """One array per key, drawn in sorted key order from ``np.random.default_rng(seed)``.

    Matrices/conv kernels ("weight" with ndim >= 2): N(0, 1/fan_in); norm scales (1-D
    "weight"): 1 + N(0, 0.1); BatchNorm running_var: U(0.5, 1.5); attention_biases: N(0, 0.5);
    integer buffers: 0; everything else (biases, running_mean, ...): N(0, 0.1). float32.
    """
    dtypes = dtypes or {}
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(layout):
        shape = tuple(layout[key])
        if dtypes.get(key, "float32").startswith("int"):
            out[key] = np.zeros(shape, dtype=np.int64)
            continue
        leaf = key.rsplit(".", 1)[-1]
        if leaf == "weight" and len(shape) >= 2:
            v = rng.normal(0.0, 1.0 / math.sqrt(math.prod(shape[1:])), shape)
        elif leaf == "weight":
            v = 1.0 + rng.normal(0.0, 0.1, shape)
        elif leaf == "running_var":
            v = rng.uniform(0.5, 1.5, shape)
        elif leaf == "attention_biases":
            v = rng.normal(0.0, 0.5, shape)
        else:
            v = rng.normal(0.0, 0.1, shape)
        out[key] = v.astype(np.float32)
    return out


def synth_image(seed: int = 1, size: int = 1024) -> np.ndarray:
    """(1, 3, size, size) float32 N(0, 1): a normalised model input."""
    return np.random.default_rng(seed).normal(size=(1, 3, size, size)).astype(np.float32)

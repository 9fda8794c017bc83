"""Shared fixtures for the model tests: the official segment-anything package as reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# tests/ holds the `reference` package; make it importable when only tests/model is collected.
_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from reference.official import import_official, official_available  # noqa: E402


@pytest.fixture(scope="session")
def official():
    """The official ``segment_anything`` package (tests skip where it is not installed)."""
    if not official_available():
        pytest.skip("segment-anything (the [parity] extra) is not installed")
    return import_official()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def randomize():
    return randomize_


@pytest.fixture(scope="session")
def maxdiff():
    return max_abs_diff


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Overwrite every parameter and float buffer with deterministic random values.

    Default initialisations leave LayerNorm at identity and some embeddings at zero, which
    would hide mistakes in how they are used; random values exercise every weight.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(module.state_dict().items()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * scale)
    return module


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()

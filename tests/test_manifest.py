"""Plumbing: the npe2 manifest is valid and every python_name in it imports."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

MANIFEST = Path(__file__).parents[1] / "src" / "napari_sam" / "napari.yaml"


def _python_names():
    data = yaml.safe_load(MANIFEST.read_text())
    return [c["python_name"] for c in data["contributions"]["commands"]]


@pytest.mark.parametrize("python_name", _python_names())
def test_python_name_imports(python_name):
    module, _, attr = python_name.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    assert callable(obj)


def test_npe2_validate():
    npe2 = Path(sys.executable).with_name("npe2")
    result = subprocess.run([str(npe2), "validate", "napari-sam"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_is_light():
    """Importing the package and the manifest's modules must not import torch or Qt."""
    code = (
        "import sys, napari_sam, napari_sam._sample_data;"
        "heavy = [m for m in ('torch', 'qtpy', 'PyQt6', 'napari') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_sample_data_shapes():
    from napari_sam._sample_data import sample_cells_2d, sample_cells_3d

    ((img2, meta2, kind2),) = sample_cells_2d()
    ((img3, meta3, kind3),) = sample_cells_3d()
    assert img2.ndim == 2 and img3.ndim == 3 and kind2 == kind3 == "image"
    assert img2.std() > 0 and img3.std() > 0

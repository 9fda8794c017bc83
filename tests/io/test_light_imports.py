"""The IO modules and the manifest's reader/writer modules import no torch, Qt or napari."""

import subprocess
import sys
from pathlib import Path


def test_io_imports_are_light():
    code = (
        "import sys, napari_sam._reader, napari_sam._writer, napari_sam.io.formats,"
        " napari_sam.io.recovery, napari_sam.io.session, napari_sam.io.export_cmd, napari_sam.cli;"
        "heavy = [m for m in ('torch', 'qtpy', 'PyQt6', 'napari', 'zarr', 'tifffile', 'dask')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    src = str(Path(__file__).parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src},
    )
    assert out.stdout.strip() == ""

"""``napari-sam export``: conversions between tif, zarr and OME-Zarr, exact and safe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_sam.cli import main
from napari_sam.io.formats import read_labels
from napari_sam.io.labels_zarr import read_ome_zarr
from napari_sam.io.session import ObjectRecord, PromptRecord, SessionRecord, load_session
from napari_sam.io.tiff import write_labels_tiff


@pytest.fixture
def labels():
    lab = np.zeros((4, 30, 40), np.int64)
    lab[1:3, 5:12, 6:20] = 7
    lab[0:4, 15:25, 22:35] = 1234
    return lab


def test_tif_zarr_omezarr_tif_chain_is_exact(tmp_path, labels, capsys):
    session = SessionRecord(
        objects=[
            ObjectRecord(7, [PromptRecord(points=[(8, 10)], point_labels=[1], slice_index=1)])
        ]
    )
    src = write_labels_tiff(
        tmp_path / "in.tif",
        labels,
        name="nuclei",
        scale=(2.0, 0.5, 0.5),
        translate=(0.0, 3.0, 4.0),
        units="um",
        session=session,
    )
    steps = [
        src,
        tmp_path / "a.zarr",
        tmp_path / "b.ome.zarr",
        tmp_path / "c.tif",
        tmp_path / "d.ome.zarr",
    ]
    for a, b in zip(steps, steps[1:], strict=False):
        assert main(["export", str(a), str(b)]) == 0
        assert f"to {b}" in capsys.readouterr().out
        got = read_labels(b)
        np.testing.assert_array_equal(got.data, labels)
        assert got.data.dtype == np.uint16
        assert got.name == "nuclei" and got.scale == (2.0, 0.5, 0.5)
        assert got.translate == (0.0, 3.0, 4.0) and got.axes == ("z", "y", "x")
        assert got.units == ("micrometer",) * 3
        assert load_session(b) == session  # the session travels with the labels


def test_refuses_existing_output_without_overwrite(tmp_path, labels, capsys):
    src = write_labels_tiff(tmp_path / "in.tif", labels)
    out = tmp_path / "out.ome.zarr"
    assert main(["export", str(src), str(out)]) == 0
    capsys.readouterr()
    assert main(["export", str(src), str(out), "--name", "other"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert read_ome_zarr(out).labels[0].name == "labels"
    assert main(["export", str(src), str(out), "--name", "other", "--overwrite"]) == 0
    assert read_ome_zarr(out).labels[0].name == "other"


def test_with_image_and_options(tmp_path, labels):
    img = np.random.default_rng(0).integers(0, 999, labels.shape).astype(np.uint16)
    import tifffile

    tifffile.imwrite(tmp_path / "img.tif", img, photometric="minisblack")
    src = write_labels_tiff(tmp_path / "in.tif", labels)
    out = tmp_path / "both.ome.zarr"
    rc = main(
        [
            "export",
            str(src),
            str(out),
            "--image",
            str(tmp_path / "img.tif"),
            "--scale",
            "3",
            "1",
            "1",
            "--levels",
            "2",
            "--name",
            "cells",
        ]
    )
    assert rc == 0
    c = read_ome_zarr(out)
    np.testing.assert_array_equal(np.asarray(c.image.data[0]), img)
    assert len(c.image.data) == 2 and c.labels[0].name == "cells"
    assert c.labels[0].scale == (3.0, 1.0, 1.0) and c.image.scale == (3.0, 1.0, 1.0)


def test_clear_errors(tmp_path, labels, capsys):
    src = write_labels_tiff(tmp_path / "in.tif", labels)
    assert main(["export", str(tmp_path / "missing.tif"), str(tmp_path / "o.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(src), str(tmp_path / "o.png")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert main(["export", str(src), str(tmp_path / "o.tif"), "--levels", "2"]) == 2
    assert "ome-zarr output only" in capsys.readouterr().err
    assert main(["export", str(src), str(tmp_path / "o.zarr"), "--scale", "1", "1"]) == 2
    assert "scale has 2 values but the data has 3" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_console_entry_point(tmp_path, labels):
    src = write_labels_tiff(tmp_path / "in.tif", labels)
    code = "import sys; from napari_sam.cli import main; sys.exit(main())"
    out = subprocess.run(
        [sys.executable, "-c", code, "export", str(src), str(tmp_path / "x.zarr")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(Path(__file__).parents[2] / "src")},
    )
    assert out.returncode == 0, out.stderr
    np.testing.assert_array_equal(read_labels(tmp_path / "x.zarr").data, labels)

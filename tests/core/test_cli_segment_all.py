"""``napari-sam segment-all``: reads an image, writes labels (tiny random-init model)."""

import numpy as np
import pytest
import tifffile

from napari_sam import cli
from napari_sam._cli_segment_all import run
from napari_sam._sample_data import _blobs

from ._automatic_models import project_predictor

PERMISSIVE = [
    "--pred-iou-thresh=-1e9",
    "--stability-thresh",
    "0",
    "--min-area",
    "0",
    "--max-area-fraction",
    "1",
    "--points-per-side",
    "4",
    "--quiet",
]


def _args(argv):
    return cli.build_parser().parse_args(["segment-all", *argv])


def test_2d_image_to_tiff(tmp_path):
    img, _ = _blobs((60, 80), 4, seed=1, radius=(6, 10))
    src, out = tmp_path / "img.tif", tmp_path / "labels.tif"
    tifffile.imwrite(src, img)
    assert run(_args([str(src), "--out", str(out), *PERMISSIVE]), project_predictor()) == 0
    lab = tifffile.imread(out)
    assert lab.shape == (60, 80) and lab.max() >= 1
    ids = np.unique(lab)
    assert (ids == np.arange(len(ids))).all()
    # refuses to overwrite without --overwrite, before any work
    assert cli.main(["segment-all", str(src), "--out", str(out), "--quiet"]) == 2


def test_stack_3d_and_2d_modes(tmp_path):
    vol, _ = _blobs((3, 48, 48), 3, seed=2, radius=(6, 10))
    src = tmp_path / "vol.npy"
    np.save(src, vol)
    pred = project_predictor()
    for mode in ("3d", "2d"):
        out = tmp_path / f"labels_{mode}.tif"
        extra = ["--mode", mode, "--min-z-extent", "1"]
        assert run(_args([str(src), "--out", str(out), *PERMISSIVE, *extra]), pred) == 0
        lab = tifffile.imread(out)
        assert lab.shape == (3, 48, 48) and lab.max() >= 1
        if mode == "2d":  # ids never shared between slices
            per_slice = [set(np.unique(s)) - {0} for s in lab]
            assert not (per_slice[0] & per_slice[1]) and not (per_slice[1] & per_slice[2])


def test_errors_are_clear(tmp_path, capsys):
    assert (
        cli.main(["segment-all", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "o.tif")])
        == 2
    )
    assert "input image not found" in capsys.readouterr().err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 3, 4, 5)))
    with pytest.raises(ValueError, match="expected a 2-D image"):
        run(_args([str(bad), "--out", str(tmp_path / "o.tif")]), object())

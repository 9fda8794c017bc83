"""TIFF labels: round trips, ImageJ calibration, compression, failures."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
from _io_fs import leftovers

from napari_sam.io.tiff import read_labels_tiff, write_labels_tiff


def _labels(shape, top=9, seed=0):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int64)
    for i in range(1, 6):
        lo = [int(rng.integers(0, max(1, s - 2))) for s in shape]
        lab[tuple(slice(a, a + 3) for a in lo)] = i
    lab[(0,) * len(shape)] = top
    return lab


CASES = [
    ((30, 40), (0.5, 0.25), (10.0, -3.5), "yx"),
    ((5, 30, 40), (2.0, 0.3, 0.3), (1.0, 2.0, 3.0), "zyx"),
    ((3, 5, 20, 30), (60.0, 2.0, 0.3, 0.3), (0.0, 1.0, 2.0, 3.0), "tzyx"),
    ((2, 3, 4, 20, 30), (60.0, 1.0, 2.0, 0.3, 0.3), (0.0, 0.0, 1.0, 2.0, 3.0), "tczyx"),
]


@pytest.mark.parametrize("top", [200, 60000, 70000, 2**40])
@pytest.mark.parametrize(("shape", "scale", "translate", "axes"), CASES)
def test_round_trip(tmp_path, shape, scale, translate, axes, top):
    lab = _labels(shape, top=top)
    path = write_labels_tiff(
        tmp_path / "l.tif",
        lab,
        name="cells/a b",
        scale=scale,
        translate=translate,
        axes=axes,
        units="um",
    )
    got = read_labels_tiff(path)
    expected_dtype = {200: np.uint8, 60000: np.uint16, 70000: np.uint32, 2**40: np.uint64}[top]
    assert got.data.dtype == expected_dtype
    np.testing.assert_array_equal(got.data, lab)
    assert got.name == "cells/a b" and got.axes == tuple(axes)
    assert got.scale == scale and got.translate == translate
    assert got.units == tuple("micrometer" if a in "zyx" else None for a in axes)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
        # ImageJ hyperstack for 8/16-bit (unless both c and z), standard TIFF otherwise
        assert tif.is_imagej == (top <= 65535 and not ("c" in axes and "z" in axes))


def test_imagej_calibration_as_imagej_reads_it(tmp_path):
    lab = _labels((4, 20, 30))
    path = write_labels_tiff(
        tmp_path / "c.tif", lab, scale=(2.5, 0.4, 0.2), translate=(5.0, 1.2, 0.6), units="um"
    )
    with tifffile.TiffFile(path) as tif:
        ij = tif.imagej_metadata
        page = tif.pages[0]
        xres = page.tags["XResolution"].value
        yres = page.tags["YResolution"].value
        assert tif.series[0].axes == "ZYX"
    assert ij["spacing"] == 2.5 and ij["unit"] == "micron" and ij["slices"] == 4
    assert xres[1] / xres[0] == pytest.approx(0.2) and yres[1] / yres[0] == pytest.approx(0.4)
    # ImageJ origin is in pixels: world = (index - origin) * pixel size
    assert ij["xorigin"] == pytest.approx(-3.0) and ij["zorigin"] == pytest.approx(-2.0)


def test_reads_foreign_imagej_file(tmp_path):
    """A TIFF saved by ImageJ/tifffile without napari-sam metadata: calibration derived."""
    lab = _labels((3, 16, 20)).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "fiji.tif",
        lab,
        imagej=True,
        resolution=(1 / 0.5, 1 / 0.25),
        metadata={"axes": "ZYX", "spacing": 3.0, "unit": "micron", "xorigin": 4.0},
    )
    got = read_labels_tiff(tmp_path / "fiji.tif")
    np.testing.assert_array_equal(got.data, lab)
    assert got.axes == ("z", "y", "x")
    assert got.scale == pytest.approx((3.0, 0.25, 0.5))
    assert got.translate == pytest.approx((0.0, 0.0, -2.0))
    assert got.units == ("micrometer",) * 3 and got.name == "fiji"


def test_plain_tiff_without_metadata(tmp_path):
    lab = _labels((16, 20)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "plain.tiff", lab)
    got = read_labels_tiff(tmp_path / "plain.tiff")
    np.testing.assert_array_equal(got.data, lab)
    assert got.scale == (1.0, 1.0) and got.translate == (0.0, 0.0)


def test_dask_input_and_lazy_read(tmp_path):
    lab = _labels((12, 40, 50))
    path = write_labels_tiff(tmp_path / "d.tif", da.from_array(lab, chunks=(3, 20, 50)))
    got = read_labels_tiff(path, lazy=True)
    assert not isinstance(got.data, np.ndarray)
    np.testing.assert_array_equal(got.data[5], lab[5])


def test_failure_mid_write_leaves_nothing(tmp_path):
    lab = _labels((8, 20, 30))

    def boom(block, block_info=None):
        if block_info[0]["chunk-location"][0] == 2:
            raise OSError("network drive disconnected while reading slice 4")
        return block

    bad = da.from_array(lab, chunks=(2, 20, 30)).map_blocks(boom, dtype=lab.dtype)
    with pytest.raises(OSError, match="disconnected"):
        write_labels_tiff(tmp_path / "x.tif", bad, dtype=np.uint16)  # single pass
    with pytest.raises(OSError, match="disconnected"):
        write_labels_tiff(tmp_path / "x.tif", bad)  # stats pass first
    assert leftovers(tmp_path) == []
    # a bad value discovered while writing (dtype given: no stats pass) also leaves nothing
    neg = lab.copy()
    neg[7, 0, 0] = -4
    with pytest.raises(ValueError, match="negative value -4 at index \\(7, 0, 0\\)"):
        write_labels_tiff(tmp_path / "x.tif", neg, dtype=np.uint8)
    assert leftovers(tmp_path) == []


def test_existing_file_refused_then_replaced(tmp_path):
    lab = _labels((10, 12))
    path = write_labels_tiff(tmp_path / "a.tif", lab)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_labels_tiff(path, lab * 0)
    np.testing.assert_array_equal(read_labels_tiff(path).data, lab)
    write_labels_tiff(path, lab + 1, overwrite=True)
    np.testing.assert_array_equal(read_labels_tiff(path).data, lab + 1)
    assert leftovers(tmp_path) == ["a.tif"]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="1 dimension"):
        write_labels_tiff(tmp_path / "a.tif", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="non-integer value 0.5"):
        write_labels_tiff(tmp_path / "a.tif", np.array([[0.0, 0.5]]))
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(ValueError, match="not a readable TIFF"):
        read_labels_tiff(tmp_path / "junk.tif")
    assert leftovers(tmp_path) == ["junk.tif"]

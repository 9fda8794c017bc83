"""OME-Zarr (NGFF 0.5) labels and plain zarr: round trips, dtype, chunking, validation."""

from __future__ import annotations

import json
import threading
import tracemalloc

import dask.array as da
import numpy as np
import pytest
from _io_fs import leftovers

from napari_sam.io.labels_zarr import (
    read_labels_zarr,
    read_ome_zarr,
    write_labels_zarr,
    write_ome_zarr_labels,
)


def _labels(shape, n=5, seed=0, dtype=np.int64):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, dtype=dtype)
    for i in range(1, n + 1):
        lo = [int(rng.integers(0, max(1, s - 4))) for s in shape]
        lab[tuple(slice(a, a + int(rng.integers(2, 8))) for a in lo)] = i
    return lab


CASES = [
    ((40, 50), (0.5, 0.25), (10.0, -3.5), "yx"),
    ((6, 40, 50), (2.0, 0.3, 0.3), (1.0, 2.0, 3.0), "zyx"),
    ((3, 6, 20, 30), (60.0, 2.0, 0.3, 0.3), (0.0, 1.0, 2.0, 3.0), "tzyx"),
    ((3, 20, 30), (5.0, 0.3, 0.3), (0.0, 1.5, 2.5), "tyx"),
]


@pytest.mark.parametrize(("shape", "scale", "translate", "axes"), CASES)
def test_ome_zarr_labels_round_trip(tmp_path, shape, scale, translate, axes):
    lab = _labels(shape)
    name = "nuclei / 2 [edited]"
    path = write_ome_zarr_labels(
        tmp_path / "a.ome.zarr",
        lab,
        name=name,
        scale=scale,
        translate=translate,
        axes=axes,
        units="um",
    )
    contents = read_ome_zarr(path)
    assert contents.image is None and len(contents.labels) == 1
    got = contents.labels[0]
    assert got.name == name
    assert got.data.dtype == np.uint8
    np.testing.assert_array_equal(got.data, lab)
    assert got.scale == scale and got.translate == translate
    assert got.axes == tuple(axes)
    assert got.units == tuple("micrometer" if a in "zyx" else None for a in axes)
    assert set(got.colors) == set(np.unique(lab)[1:].tolist())


@pytest.mark.parametrize(("shape", "scale", "translate", "axes"), CASES)
def test_plain_zarr_round_trip(tmp_path, shape, scale, translate, axes):
    lab = _labels(shape).astype(np.float32)  # integral floats are accepted
    path = write_labels_zarr(
        tmp_path / "a.zarr", lab, name="cells", scale=scale, translate=translate, axes=axes
    )
    got = read_labels_zarr(path)
    assert got.name == "cells" and got.data.dtype == np.uint8
    np.testing.assert_array_equal(got.data, lab)
    assert got.scale == scale and got.translate == translate and got.axes == tuple(axes)
    attrs = json.loads((path / "zarr.json").read_text())
    assert attrs["attributes"]["scale"] == list(scale)
    assert attrs["attributes"]["translate"] == list(translate)
    assert attrs["dimension_names"] == list(axes)


def test_image_and_labels_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    image = rng.normal(size=(5, 32, 48)).astype(np.float32)
    lab = _labels((5, 32, 48))
    path = write_ome_zarr_labels(
        tmp_path / "img.ome.zarr",
        lab,
        name="cells",
        image=image,
        image_name="raw",
        scale=(2.0, 0.5, 0.5),
        translate=(0.0, 10.0, 20.0),
        levels=2,
    )
    c = read_ome_zarr(path)
    assert c.image.name == "raw" and c.image.axes == ("z", "y", "x")
    np.testing.assert_array_equal(np.asarray(c.image.data[0]), image)
    assert len(c.image.data) == 2 and c.image.data[1].shape == (5, 16, 24)
    np.testing.assert_array_equal(np.asarray(c.image.data[1]), image[:, ::2, ::2])
    assert c.image.scale == (2.0, 0.5, 0.5) and c.image.translate == (0.0, 10.0, 20.0)
    (got,) = c.labels
    np.testing.assert_array_equal(got.data, lab)
    assert got.name == "cells" and got.scale == (2.0, 0.5, 0.5)
    meta = json.loads((path / "labels" / "cells" / "zarr.json").read_text())["attributes"]["ome"]
    # level 1: every 2nd pixel, scale doubled in y/x, same translation
    ds1 = meta["multiscales"][0]["datasets"][1]["coordinateTransformations"]
    assert ds1 == [
        {"type": "scale", "scale": [2.0, 1.0, 1.0]},
        {"type": "translation", "translation": [0.0, 10.0, 20.0]},
    ]


def test_rgb_image_is_stored_channel_first(tmp_path):
    image = np.random.default_rng(2).integers(0, 255, (24, 30, 3), dtype=np.uint8)
    lab = _labels((24, 30))
    path = write_ome_zarr_labels(tmp_path / "rgb.ome.zarr", lab, image=image)
    c = read_ome_zarr(path)
    assert c.image.axes == ("c", "y", "x")
    np.testing.assert_array_equal(np.asarray(c.image.data[0]), np.moveaxis(image, -1, 0))
    data, meta, kind = c.image.to_layer_data()
    assert kind == "image" and meta["channel_axis"] == 0


def test_add_labels_to_existing_image_store(tmp_path):
    image = np.zeros((20, 30), np.uint16)
    store = write_ome_zarr_labels(
        tmp_path / "s.ome.zarr",
        _labels((20, 30), seed=1),
        name="first",
        image=image,
        scale=(0.5, 0.5),
    )
    second = _labels((20, 30), seed=2)
    write_ome_zarr_labels(store, second, name="second")  # adds, image untouched
    c = read_ome_zarr(store)
    assert [lab.name for lab in c.labels] == ["first", "second"]
    np.testing.assert_array_equal(c.labels[1].data, second)
    assert c.labels[1].scale == (0.5, 0.5)  # taken from the image
    with pytest.raises(FileExistsError, match="overwrite"):
        write_ome_zarr_labels(store, second, name="second")
    third = _labels((20, 30), seed=3)
    write_ome_zarr_labels(store, third, name="second", overwrite=True)
    np.testing.assert_array_equal(read_ome_zarr(store).labels[1].data, third)
    # labels made for another image (signature/shape mismatch) are refused
    with pytest.raises(ValueError, match="do not belong to the image"):
        write_ome_zarr_labels(store, np.zeros((21, 30), np.uint8), name="other")


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (1, np.uint8),
        (255, np.uint8),
        (256, np.uint16),
        (65535, np.uint16),
        (65536, np.uint32),
        (2**32 - 1, np.uint32),
        (2**32, np.uint64),
        (2**63 + 5, np.uint64),
    ],
)
def test_smallest_dtype(tmp_path, value, dtype):
    src_dtype = np.uint64 if value >= 2**63 else np.int64
    lab = np.zeros((8, 9), dtype=src_dtype)
    lab[2, 3] = value
    got = read_labels_zarr(write_labels_zarr(tmp_path / "a.zarr", lab))
    assert got.data.dtype == dtype and int(got.data[2, 3]) == value


def test_bool_labels_become_uint8(tmp_path):
    lab = np.zeros((5, 6), bool)
    lab[1:3, 2:4] = True
    got = read_ome_zarr(write_ome_zarr_labels(tmp_path / "b.ome.zarr", lab)).labels[0]
    assert got.data.dtype == np.uint8 and got.data.sum() == 4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[0, -1], [2, 3]]), "negative value -1 at index \\(0, 1\\)"),
        (np.array([[0, 1.5], [2, 3]]), "non-integer value 1.5"),
        (np.array([[0, np.nan], [2, 3]]), "NaN or infinity"),
        (np.array([[0, np.inf], [2, 3]]), "NaN or infinity"),
        (
            np.array([[0, 2.0**65], [2, 3]]),
            "label id 3.6893488147419103e\\+19 does not fit in uint64",
        ),
    ],
)
def test_bad_label_values(tmp_path, values, message):
    for writer in (write_labels_zarr, write_ome_zarr_labels):
        with pytest.raises(ValueError, match=message):
            writer(tmp_path / "x.zarr", values)
    assert leftovers(tmp_path) == []


def test_label_id_beyond_requested_dtype(tmp_path):
    lab = np.zeros((4, 4), np.int64)
    lab[0, 0] = 300
    with pytest.raises(ValueError, match="label id 300 does not fit in uint8"):
        write_labels_zarr(tmp_path / "a.zarr", lab, dtype=np.uint8)
    assert leftovers(tmp_path) == []
    assert (
        read_labels_zarr(write_labels_zarr(tmp_path / "a.zarr", lab, dtype="uint32")).data.dtype
        == np.uint32
    )


@pytest.mark.parametrize("shape", [(10,), (2, 2, 2, 2, 2, 2)])
def test_unsupported_dims(tmp_path, shape):
    with pytest.raises(ValueError, match=f"{len(shape)} dimension"):
        write_ome_zarr_labels(tmp_path / "x.zarr", np.zeros(shape, np.uint8))


def test_empty_and_non_array(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_labels_zarr(tmp_path / "x.zarr", np.zeros((0, 5), np.uint8))
    with pytest.raises(TypeError, match="must be an array"):
        write_labels_zarr(tmp_path / "x.zarr", [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="scale has 3 values but the data has 2"):
        write_labels_zarr(tmp_path / "x.zarr", np.zeros((3, 3), np.uint8), scale=(1, 1, 1))
    with pytest.raises(ValueError, match="scale values must be > 0"):
        write_labels_zarr(tmp_path / "x.zarr", np.zeros((3, 3), np.uint8), scale=(0, 1))
    with pytest.raises(ValueError, match="order t, c, z, y, x"):
        write_labels_zarr(tmp_path / "x.zarr", np.zeros((3, 3, 3), np.uint8), axes="yzx")
    assert leftovers(tmp_path) == []


def test_existing_destination_is_refused(tmp_path):
    lab = _labels((10, 10))
    path = write_ome_zarr_labels(tmp_path / "a.ome.zarr", lab)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_ome_zarr_labels(path, lab * 0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_labels_zarr(path, lab * 0)
    np.testing.assert_array_equal(read_ome_zarr(path).labels[0].data, lab)
    write_ome_zarr_labels(path, lab * 2, overwrite=True)
    np.testing.assert_array_equal(read_ome_zarr(path).labels[0].data, lab * 2)
    assert leftovers(tmp_path) == ["a.ome.zarr"]


class _Recorder:
    """Builds a dask array whose blocks come from a function that records each request."""

    def __init__(self, full: np.ndarray, chunks, fail_block=None):
        self.full = full
        self.sizes: list[int] = []
        self.lock = threading.Lock()
        self.fail_block = fail_block
        self.array = da.map_blocks(
            self._block,
            dtype=full.dtype,
            chunks=da.core.normalize_chunks(chunks, full.shape),
            meta=np.empty((0,) * full.ndim, full.dtype),
        )

    def _block(self, block_info=None):
        info = block_info[None]
        loc = info["array-location"]
        if self.fail_block is not None and tuple(info["chunk-location"]) == self.fail_block:
            raise OSError("the microscope share went away while reading this chunk")
        region = tuple(slice(a, b) for a, b in loc)
        with self.lock:
            self.sizes.append(int(np.prod([b - a for a, b in loc])))
        return self.full[region].copy()


def test_dask_is_written_chunk_by_chunk(tmp_path):
    full = _labels((16, 64, 64), n=20, seed=4)
    rec = _Recorder(full, (2, 64, 64))
    path = write_ome_zarr_labels(
        tmp_path / "d.ome.zarr", rec.array, chunks=(2, 64, 64), max_bytes=2 * 64 * 64 * 8
    )
    np.testing.assert_array_equal(read_ome_zarr(path).labels[0].data, full)
    # every block ever computed is one chunk (no full-size materialisation)
    assert max(rec.sizes) == 2 * 64 * 64
    assert len(rec.sizes) == 2 * 8  # one validating pass + one writing pass


def test_large_dask_write_has_bounded_memory(tmp_path):
    """Writing a 32 MiB (uint8) label volume never holds a full copy in memory."""
    shape = (32, 1024, 1024)
    lab = da.zeros(shape, dtype=np.uint8, chunks=(4, 1024, 1024))
    lab = lab + (da.arange(shape[0], chunks=4, dtype=np.uint8) % 7)[:, None, None]
    tracemalloc.start()
    try:
        path = write_labels_zarr(tmp_path / "big.zarr", lab, max_bytes=4 * 2**20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full_bytes = int(np.prod(shape))
    assert peak < full_bytes / 2, (
        f"peak {peak / 2**20:.1f} MiB for a {full_bytes / 2**20} MiB volume"
    )
    got = read_labels_zarr(path, lazy=True)
    assert got.data.dtype == np.uint8 and int(got.data[13, 5, 5]) == 13 % 7


def test_failing_chunk_leaves_nothing(tmp_path):
    full = _labels((8, 32, 32), seed=5)
    rec = _Recorder(full, (2, 32, 32), fail_block=(2, 0, 0))
    with pytest.raises(OSError, match="went away"):
        write_ome_zarr_labels(tmp_path / "f.ome.zarr", rec.array, dtype=np.uint16)
    assert leftovers(tmp_path) == []
    # and with an existing store: the old one survives intact
    write_labels_zarr(tmp_path / "g.zarr", full)
    with pytest.raises(OSError, match="went away"):
        write_labels_zarr(tmp_path / "g.zarr", rec.array, overwrite=True)
    np.testing.assert_array_equal(read_labels_zarr(tmp_path / "g.zarr").data, full)
    assert leftovers(tmp_path) == ["g.zarr"]


def test_colors(tmp_path):
    lab = np.array([[0, 1], [2, 7]])
    path = write_ome_zarr_labels(
        tmp_path / "c.ome.zarr",
        lab,
        colors={1: (255, 0, 0), 2: (0.0, 1.0, 0.0, 0.5), 7: (1, 2, 3, 4)},
    )
    got = read_ome_zarr(path).labels[0]
    assert got.colors == {1: (255, 0, 0, 255), 2: (0, 255, 0, 128), 7: (1, 2, 3, 4)}
    seen = []
    path = write_ome_zarr_labels(
        tmp_path / "d.ome.zarr",
        lab,
        colors=lambda ids: seen.append(ids) or {i: (i, i, i, 255) for i in ids},
    )
    assert seen == [[1, 2, 7]]
    assert read_ome_zarr(path).labels[0].colors == {
        1: (1, 1, 1, 255),
        2: (2, 2, 2, 255),
        7: (7, 7, 7, 255),
    }


def test_reads_ngff_04_on_zarr_v2(tmp_path):
    """A store from older tools: NGFF 0.4 attributes at the top level of zarr v2 groups."""
    import zarr

    lab = _labels((12, 14))
    root = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=2)
    root.create_array("0", data=np.zeros((12, 14), np.uint8), chunks=(12, 14))
    ms = {
        "version": "0.4",
        "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.7, 0.7]}]}
        ],
    }
    root.attrs["multiscales"] = [ms]
    lg = root.create_group("labels")
    lg.attrs["labels"] = ["cells"]
    cg = lg.create_group("cells")
    cg.create_array("0", data=lab.astype(np.uint16), chunks=(6, 7))
    cg.attrs["multiscales"] = [{**ms, "name": "cells"}]
    cg.attrs["image-label"] = {
        "version": "0.4",
        "colors": [{"label-value": 1, "rgba": [1, 2, 3, 255]}],
    }
    c = read_ome_zarr(tmp_path / "old.zarr")
    assert c.image.scale == (0.7, 0.7)
    (got,) = c.labels
    np.testing.assert_array_equal(got.data, lab)
    assert (
        got.name == "cells" and got.colors == {1: (1, 2, 3, 255)} and got.translate == (0.0, 0.0)
    )
    with pytest.raises(ValueError, match="older OME-Zarr"):
        write_ome_zarr_labels(tmp_path / "old.zarr", lab, name="new")

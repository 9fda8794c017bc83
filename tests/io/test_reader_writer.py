"""npe2 reader / writer contributions: what napari gets and what they write."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_sam._reader import get_reader, read_labels_layers, read_ome_zarr_layers
from napari_sam._writer import write_labels_ome_zarr, write_labels_tiff, write_ome_zarr
from napari_sam.io.labels_zarr import read_ome_zarr, write_labels_zarr, write_ome_zarr_labels
from napari_sam.io.tiff import read_labels_tiff
from napari_sam.io.tiff import write_labels_tiff as core_write_tiff

napari_layers = pytest.importorskip("napari.layers")


def _labels(shape=(3, 20, 30)):
    lab = np.zeros(shape, np.int32)
    lab[..., 2:8, 3:9] = 4
    lab[..., 10:15, 12:20] = 9
    return lab


def _layer_tuple(data, **kwargs):
    """What napari hands a writer: ``layer.as_layer_data_tuple()`` of a real layer."""
    return napari_layers.Labels(data, **kwargs).as_layer_data_tuple()


def test_get_reader_claims_only_what_it_reads(tmp_path):
    lab = _labels()
    ome = write_ome_zarr_labels(tmp_path / "a.ome.zarr", lab)
    plain = write_labels_zarr(tmp_path / "b.zarr", lab)
    tif = core_write_tiff(tmp_path / "c.tif", lab)
    tifffile.imwrite(tmp_path / "foreign.tif", lab.astype(np.uint16), photometric="minisblack")
    import zarr

    zarr.create_array(str(tmp_path / "foreign.zarr"), shape=(4, 4), dtype="uint8")
    assert get_reader(str(ome)) is read_ome_zarr_layers
    assert get_reader([str(ome)]) is read_ome_zarr_layers
    assert get_reader(str(plain)) is read_labels_layers
    assert get_reader(str(tif)) is read_labels_layers
    assert get_reader(str(tmp_path / "foreign.tif")) is None  # left to napari's reader
    assert get_reader(str(tmp_path / "foreign.zarr")) is None
    assert get_reader(str(tmp_path / "missing.zarr")) is None
    assert get_reader([str(ome), str(plain)]) is None


def test_reader_layers_build_napari_layers(tmp_path):
    lab = _labels()
    image = np.random.default_rng(0).random(lab.shape).astype(np.float32)
    path = write_ome_zarr_labels(
        tmp_path / "a.ome.zarr",
        lab,
        image=image,
        name="cells",
        scale=(2, 0.5, 0.5),
        translate=(0, 1, 2),
        levels=2,
    )
    layers = read_ome_zarr_layers(str(path))
    assert [kind for _, _, kind in layers] == ["image", "labels"]
    img = napari_layers.Image(layers[0][0], **layers[0][1])
    assert img.multiscale and tuple(img.scale) == (2, 0.5, 0.5)
    lab_layer = napari_layers.Labels(layers[1][0], **layers[1][1])
    np.testing.assert_array_equal(lab_layer.data, lab)
    assert lab_layer.name == "cells" and tuple(lab_layer.translate) == (0, 1, 2)
    assert lab_layer.metadata["napari_sam"]["source_path"] == str(path)
    # the stored colours are the layer's colours
    stored = read_ome_zarr(path).labels[0].colors
    np.testing.assert_allclose(lab_layer.colormap.map(np.array([9]))[0], np.array(stored[9]) / 255)


@pytest.mark.parametrize(
    ("writer", "suffix"), [(write_labels_ome_zarr, ".zarr"), (write_labels_tiff, ".tif")]
)
def test_writers_round_trip_a_napari_layer(tmp_path, writer, suffix):
    lab = _labels()
    data, meta, _ = _layer_tuple(lab, name="nuclei", scale=(3.0, 0.25, 0.25), translate=(1, 2, 3))
    (out,) = writer(str(tmp_path / f"x{suffix}"), data, meta)
    layers = get_reader(out)(out)
    got_data, got_meta, kind = layers[-1]
    assert kind == "labels"
    np.testing.assert_array_equal(got_data, lab)
    assert got_data.dtype == np.uint8
    assert got_meta["name"] == "nuclei" and got_meta["scale"] == [3.0, 0.25, 0.25]
    assert got_meta["translate"] == [1.0, 2.0, 3.0]


def test_ome_zarr_writer_keeps_layer_colours(tmp_path):
    lab = _labels((20, 30))
    layer = napari_layers.Labels(lab)
    data, meta, _ = layer.as_layer_data_tuple()
    (out,) = write_labels_ome_zarr(str(tmp_path / "c.zarr"), data, meta)
    colors = read_ome_zarr(out).labels[0].colors
    for i in (4, 9):
        np.testing.assert_allclose(
            np.array(colors[i]) / 255, layer.colormap.map(np.array([i]))[0], atol=1 / 255
        )


def test_writer_overwrite_rules(tmp_path):
    lab = _labels((20, 30))
    data, meta, _ = _layer_tuple(lab, name="cells")
    # a file: napari's dialog asked -> replaced atomically
    (tmp_path / "f.tif").write_bytes(b"old")
    write_labels_tiff(str(tmp_path / "f.tif"), data, meta)
    np.testing.assert_array_equal(read_labels_tiff(tmp_path / "f.tif").data, lab)
    # a folder that is not a zarr store is never replaced
    (tmp_path / "docs.zarr").mkdir()
    (tmp_path / "docs.zarr" / "thesis.docx").write_text("precious")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        write_labels_ome_zarr(str(tmp_path / "docs.zarr"), data, meta)
    assert (tmp_path / "docs.zarr" / "thesis.docx").read_text() == "precious"
    # an OME-Zarr image: labels are added to it, the image stays
    image = np.arange(600, dtype=np.uint16).reshape(20, 30)
    store = write_ome_zarr_labels(tmp_path / "img.zarr", lab, image=image, name="first")
    write_labels_ome_zarr(str(store), data, meta)
    c = read_ome_zarr(store)
    np.testing.assert_array_equal(np.asarray(c.image.data[0]), image)
    assert [x.name for x in c.labels] == ["first", "cells"]


def test_image_plus_labels_writer(tmp_path):
    lab = _labels((20, 30))
    image = napari_layers.Image(np.random.default_rng(1).random((20, 30, 3)), rgb=True, name="rgb")
    layers = [
        image.as_layer_data_tuple(),
        _layer_tuple(lab, name="a"),
        _layer_tuple(lab * 2, name="b"),
    ]
    (out,) = write_ome_zarr(str(tmp_path / "all.zarr"), layers)
    c = read_ome_zarr(out)
    assert c.image.name == "rgb" and c.image.axes == ("c", "y", "x")
    assert [x.name for x in c.labels] == ["a", "b"]
    np.testing.assert_array_equal(c.labels[1].data, lab * 2)
    with pytest.raises(ValueError, match="distinct names"):
        write_ome_zarr(str(tmp_path / "dup.zarr"), [layers[0], layers[1], layers[1]])
    assert not (tmp_path / "dup.zarr").exists()

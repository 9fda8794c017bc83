"""The reader and writers through napari itself (npe2 plugin discovery, save dialog path)."""

from __future__ import annotations

import numpy as np
import pytest

from napari_sam.io.labels_zarr import read_ome_zarr, write_ome_zarr_labels

pytest.importorskip("napari")
pytestmark = pytest.mark.gui


def test_open_and_save_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    lab = np.zeros((3, 20, 30), np.uint16)
    lab[1, 2:8, 3:9] = 700
    image = np.random.default_rng(0).random((3, 20, 30)).astype(np.float32)
    src = write_ome_zarr_labels(
        tmp_path / "in.ome.zarr", lab, image=image, name="cells", scale=(2, 0.5, 0.5)
    )
    layers = viewer.open(str(src), plugin="napari-sam")
    assert [type(x).__name__ for x in layers] == ["Image", "Labels"]
    labels_layer = viewer.layers["cells"]
    np.testing.assert_array_equal(labels_layer.data, lab)
    assert tuple(labels_layer.scale) == (2, 0.5, 0.5)
    labels_layer.data[2, 10:12, 10:12] = 5  # an edit
    out = tmp_path / "out.zarr"
    # image + labels layers and a .zarr name: napari picks the image+labels writer
    written = viewer.layers.save(str(out), selected=False, plugin="napari-sam")
    assert written == [str(out)]
    c = read_ome_zarr(out)
    np.testing.assert_array_equal(c.labels[0].data[2, 10:12, 10:12], 5)
    np.testing.assert_array_equal(np.asarray(c.image.data[0]), image)
    viewer.layers.selection = {labels_layer}
    tif = tmp_path / "cells.tif"
    assert viewer.layers.save(str(tif), selected=True, plugin="napari-sam") == [str(tif)]
    again = viewer.open(str(tif), plugin="napari-sam")[0]
    np.testing.assert_array_equal(again.data, labels_layer.data)

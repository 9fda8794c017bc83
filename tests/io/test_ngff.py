"""The OME-Zarr output follows the NGFF 0.5 labels spec.

Two checks: (1) the maintained validator ``ome-zarr-models`` (PyPI; its v05 models encode
the NGFF 0.5 JSON schemas) opens every layout we write; skipped if it is not installed.
(2) an explicit check of the keys the NGFF 0.5 spec requires
(https://ngff.openmicroscopy.org/0.5/ - sections "multiscales metadata", "labels
metadata", "image-label metadata"), which runs without the validator.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_sam.io.labels_zarr import write_ome_zarr_labels

SHAPES = {
    "yx": (20, 30),
    "zyx": (4, 20, 30),
    "tzyx": (2, 4, 20, 30),
    "tczyx": (2, 1, 4, 20, 30),
}


def _labels(shape):
    lab = np.zeros(shape, np.uint16)
    lab[..., 2:8, 3:9] = 1
    lab[..., 10:15, 12:20] = 513
    return lab


def _stores(tmp_path: Path):
    """Every layout: labels only, image + labels, labels added to an image; 2D-5D."""
    out = []
    for axes, shape in SHAPES.items():
        lab = _labels(shape)
        scale = tuple(0.5 + i for i in range(len(shape)))
        out.append(
            (
                "labels-only",
                axes,
                write_ome_zarr_labels(
                    tmp_path / f"l_{axes}.ome.zarr",
                    lab,
                    axes=axes,
                    scale=scale,
                    units="um",
                    levels=2,
                ),
            )
        )
        image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        path = write_ome_zarr_labels(
            tmp_path / f"i_{axes}.ome.zarr",
            lab,
            name="cells",
            axes=axes,
            image=image,
            scale=scale,
            translate=(1.0,) * len(shape),
            levels=2,
        )
        write_ome_zarr_labels(path, lab // 2, name="second")
        out.append(("image", axes, path))
    return out


def _ome(path: Path) -> dict:
    return json.loads((path / "zarr.json").read_text())["attributes"]["ome"]


def _check_multiscales(ome: dict, group: Path):
    """NGFF 0.5 'multiscales': required keys, axes rules, transform order, arrays exist."""
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    axes = ms["axes"]
    assert 2 <= len(axes) <= 5
    types = [a.get("type") for a in axes]
    assert types.count("space") in (2, 3) and all(
        t == "space" for t in types[-types.count("space") :]
    )
    assert types.count("time") <= 1 and (types[0] == "time" or "time" not in types)
    assert types.count("channel") <= 1
    assert len({a["name"] for a in axes}) == len(axes)
    prev = None
    for ds in ms["datasets"]:
        tr = ds["coordinateTransformations"]
        assert [t["type"] for t in tr] in (["scale"], ["scale", "translation"])
        assert all(len(t.get("scale", t.get("translation"))) == len(axes) for t in tr)
        arr = json.loads((group / ds["path"] / "zarr.json").read_text())
        assert arr["node_type"] == "array" and len(arr["shape"]) == len(axes)
        assert arr["dimension_names"] == [a["name"] for a in axes]
        if prev is not None:  # ordered from finest to coarsest
            assert all(b >= a for a, b in zip(prev, tr[0]["scale"], strict=True))
        prev = tr[0]["scale"]


def _check_image_label(group: Path, source_expected: bool):
    ome = _ome(group)
    _check_multiscales(ome, group)
    il = ome["image-label"]
    values = [c["label-value"] for c in il["colors"]]
    assert len(values) == len(set(values)) and values  # unique label-values
    assert all(len(c["rgba"]) == 4 and all(0 <= v <= 255 for v in c["rgba"]) for c in il["colors"])
    if source_expected:
        assert il["source"]["image"] == "../../"
    for ds in ome["multiscales"][0]["datasets"]:
        dtype = json.loads((group / ds["path"] / "zarr.json").read_text())["data_type"]
        assert dtype in {"uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64"}


def test_structure_against_ngff_05_required_keys(tmp_path):
    for kind, _axes, path in _stores(tmp_path):
        if kind == "labels-only":
            _check_image_label(path, source_expected=False)
        else:
            _check_multiscales(_ome(path), path)
            labels = _ome(path / "labels")
            assert labels["version"] == "0.5" and labels["labels"] == ["cells", "second"]
            for name in labels["labels"]:
                _check_image_label(path / "labels" / name, source_expected=True)


def test_ome_zarr_models_validator_accepts_output(tmp_path):
    pytest.importorskip("ome_zarr_models", reason="validator ome-zarr-models not installed")
    import zarr
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ValidationWarning counts as a failure
        for kind, axes, path in _stores(tmp_path):
            group = zarr.open_group(path, mode="r")
            if kind == "labels-only":
                model = ImageLabel.from_zarr(group)
                assert [a.name for a in model.attributes.ome.multiscales[0].axes] == list(axes)
                assert {c.label_value for c in model.attributes.ome.image_label.colors} == {1, 513}
            else:
                image = Image.from_zarr(group)
                assert len(image.attributes.ome.multiscales[0].datasets) == 2
                labels = Labels.from_zarr(zarr.open_group(path / "labels", mode="r"))
                assert labels.label_paths == ["cells", "second"]
                for name in labels.label_paths:
                    il = labels.get_image_labels_group(name)
                    assert il.attributes.ome.image_label.source.image == "../../"


def test_validator_rejects_a_broken_store(tmp_path):
    """The validator check above can fail: remove a required key and it does."""
    pytest.importorskip("ome_zarr_models", reason="validator ome-zarr-models not installed")
    import zarr
    from ome_zarr_models.v05.image_label import ImageLabel

    path = write_ome_zarr_labels(tmp_path / "b.ome.zarr", _labels((10, 30)))
    meta = json.loads((path / "zarr.json").read_text())
    del meta["attributes"]["ome"]["multiscales"][0]["axes"]
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="axes"):
        ImageLabel.from_zarr(zarr.open_group(path, mode="r"))

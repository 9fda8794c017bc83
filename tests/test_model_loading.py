"""Checkpoint reading (safe load, container unwrapping, clear errors), devices, load_model."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
import torch

from _httpserver import FileServer
from napari_sam.devices import available_devices, select_device
from napari_sam.model import registry
from napari_sam.model.registry import (
    MODELS,
    CheckpointError,
    ModelInfo,
    extract_sam_state_dict,
    load_checkpoint,
    load_model,
)


def sam_like_state() -> dict[str, torch.Tensor]:
    """Keys shaped like a SAM state_dict (not a working model: for unwrapping tests)."""
    g = torch.Generator().manual_seed(0)
    return {
        "image_encoder.patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g),
        "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 4),
        "mask_decoder.iou_token.weight": torch.randn(1, 8, generator=g),
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- unwrapping / errors


def test_plain_state_dict_round_trips_through_a_file(tmp_path):
    state = sam_like_state()
    torch.save(state, tmp_path / "plain.pth")
    assert same(load_checkpoint(tmp_path / "plain.pth"), state)


@pytest.mark.parametrize("prefix", ["sam.", "module.", ""])
def test_micro_sam_container_is_unwrapped(tmp_path, prefix):
    state = sam_like_state()
    wrapped = {
        "model_state": {prefix + k: v for k, v in state.items()},
        "decoder_state": {"decoder.out.weight": torch.ones(3)},  # micro-sam's extra decoder
    }
    torch.save(wrapped, tmp_path / "microsam.pt")
    assert same(load_checkpoint(tmp_path / "microsam.pt"), state)


def test_lightning_style_state_dict_key_is_unwrapped():
    state = sam_like_state()
    assert same(extract_sam_state_dict({"state_dict": state, "epoch": 3}), state)


def test_non_sam_checkpoint_is_rejected_with_its_keys(tmp_path):
    torch.save({"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}, tmp_path / "net.pt")
    with pytest.raises(CheckpointError, match=r"not a SAM checkpoint.*fc\.weight") as err:
        load_checkpoint(tmp_path / "net.pt")
    assert "net.pt" in str(err.value)
    partial = {k: v for k, v in sam_like_state().items() if not k.startswith("mask_decoder")}
    with pytest.raises(CheckpointError, match="no mask_decoder weights"):
        extract_sam_state_dict(partial)
    with pytest.raises(CheckpointError, match="does not contain a state_dict"):
        extract_sam_state_dict(torch.ones(3))


def test_corrupt_and_truncated_files_give_a_clear_error(tmp_path):
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 40)
    with pytest.raises(CheckpointError, match="noise.pth is not a readable PyTorch"):
        load_checkpoint(tmp_path / "noise.pth")
    torch.save(sam_like_state(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint(tmp_path / "cut.pth")


class NotWeights:
    pass


def test_pickled_python_objects_are_refused(tmp_path):
    torch.save({"model_state": sam_like_state(), "extra": NotWeights()}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match="Python objects besides weights"):
        load_checkpoint(tmp_path / "obj.pt")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_checkpoint(tmp_path / "nothing.pth")
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_model(tmp_path / "nothing.pth")


def test_load_model_without_argument_gives_the_bundled_default_model():
    import numpy as np

    from napari_sam.model.small_encoder import default_weights
    from napari_sam.predictor import SamPredictor
    from napari_sam.train.synthetic import make_image

    assert default_weights().is_file(), "the default model must ship inside the package"
    model = load_model()
    assert type(model.image_encoder).__name__ == "SmallEncoder"
    # It segments for real: for boxes around synthetic objects its masks overlap the objects
    # clearly better than the filled boxes do (what an untrained model cannot do).
    image, labels = make_image(3, shape=(256, 256))
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    predictor = SamPredictor(model)
    predictor.set_image(image)
    ious, box_ious = [], []
    for obj_id in ids[np.argsort(counts)[::-1][:6]]:
        obj = labels == obj_id
        rows, cols = np.nonzero(obj)
        box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        masks, _, _ = predictor.predict(box=box, multimask_output=False)
        ious.append((masks[0] & obj).sum() / (masks[0] | obj).sum())
        box_ious.append(obj.sum() / ((box[2] - box[0]) * (box[3] - box[1])))
    assert np.mean(ious) > np.mean(box_ious) + 0.1, (ious, box_ious)


def test_no_default_model_names_the_alternatives(monkeypatch):
    from napari_sam.model import registry

    monkeypatch.setattr(registry, "_default_checkpoint", lambda: None)
    with pytest.raises(ValueError, match="No default model.*vit_b.*path"):
        load_model()


# --------------------------------------------------------------------------- devices


def test_select_device_auto_and_explicit(monkeypatch):
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(torch.device("cpu")) == torch.device("cpu")
    auto = select_device("auto")
    assert auto.type == available_devices()[0]
    assert select_device(None) == auto
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")  # cuda is preferred when present


def test_select_device_rejects_bad_or_missing_devices():
    with pytest.raises(ValueError, match="Unknown device 'gpu0'"):
        select_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available here.*auto"):
            select_device("cuda")
    else:
        with pytest.raises(ValueError, match="does not exist"):
            select_device(f"cuda:{torch.cuda.device_count()}")


# ------------------------------------------------------------- end to end (needs build)


@pytest.fixture(scope="module")
def build():
    return pytest.importorskip("napari_sam.model.build")


@pytest.fixture(scope="module")
def small_type(build):
    """A small TinyViT config from build.CONFIGS if there is one (fast), else vit_t."""
    return "test_tiny_vit" if "test_tiny_vit" in getattr(build, "CONFIGS", {}) else "vit_t"


def test_load_model_from_a_micro_sam_style_file(build, small_type, tmp_path):
    torch.manual_seed(0)
    reference = build.build_sam(small_type)
    state = reference.state_dict()
    torch.save(
        {"model_state": {"sam." + k: v for k, v in state.items()}, "decoder_state": {}},
        tmp_path / "vit_t_lm.pt",
    )
    model = load_model(tmp_path / "vit_t_lm.pt", device="cpu")
    assert not model.training
    assert same(model.state_dict(), state)


def test_load_model_by_registry_name_downloads_once(build, small_type, tmp_path, monkeypatch):
    torch.manual_seed(1)
    state = build.build_sam(small_type).state_dict()
    torch.save(state, tmp_path / "src.pt")
    data = (tmp_path / "src.pt").read_bytes()
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    with FileServer() as server:
        info = replace(
            MODELS["vit_t"],
            name="tiny_t",
            url=server.add("/t.pt", data),
            filename="tiny_t.pt",
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
        )
        monkeypatch.setitem(MODELS, "tiny_t", info)
        model = load_model("tiny_t", device="auto")
        again = load_model("tiny_t", device="cpu")
        assert len(server.log) == 1
    assert same({k: v.cpu() for k, v in model.state_dict().items()}, state)
    assert same(again.state_dict(), state)
    assert isinstance(info, ModelInfo) and registry.cached_path("tiny_t").is_file()


def test_load_model_rejects_a_sam_shaped_file_of_no_known_architecture(build, tmp_path):
    torch.save(sam_like_state(), tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match="odd.pth"):
        load_model(tmp_path / "odd.pth", device="cpu")


def test_bad_device_fails_before_any_download(monkeypatch, tmp_path):
    from _httpserver import unreachable_url

    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path))
    monkeypatch.setitem(MODELS, "far", replace(MODELS["vit_t"], name="far", url=unreachable_url()))
    with pytest.raises(ValueError, match="Unknown device"):
        load_model("far", device="gpu0")
    assert not any(tmp_path.rglob("*"))

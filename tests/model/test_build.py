"""Builders, checkpoint loading and model-type detection."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from functools import partial

import pytest
import torch
from synth_weights import load_layout

from napari_sam.model.build import (
    CONFIGS,
    SamConfig,
    build_sam,
    detect_model_type,
    state_dict_layout,
)

OFFICIAL = {
    "vit_b": "sam_vit_b",
    "vit_l": "sam_vit_l",
    "vit_h": "sam_vit_h",
    "vit_t": "mobile_sam_vit_t",
}


@pytest.mark.parametrize("model_type", sorted(OFFICIAL))
def test_layout_identical_to_official_checkpoint(model_type):
    """Same keys and shapes as the official models (recorded in tests/fixtures)."""
    want = {k: tuple(v) for k, v in load_layout(OFFICIAL[model_type])["layout"].items()}
    got = state_dict_layout(model_type)
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


@pytest.mark.parametrize("model_type", sorted(OFFICIAL))
def test_detect_model_type_from_official_layout(model_type):
    layout = load_layout(OFFICIAL[model_type])["layout"]
    fake = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    assert detect_model_type(fake) == model_type


def test_detect_rejects_foreign_state_dicts():
    with pytest.raises(ValueError, match="wrapped"):
        detect_model_type({"model": torch.zeros(1)})
    layout = dict(state_dict_layout("vit_b"))
    layout["image_encoder.pos_embed"] = (1, 32, 32, 768)  # a resized ViT-B
    fake = {k: torch.empty(v, device="meta") for k, v in layout.items()}
    with pytest.raises(ValueError, match="closest is 'vit_b'.*pos_embed"):
        detect_model_type(fake)
    with pytest.raises(TypeError, match="mapping"):
        detect_model_type([1, 2])


@pytest.mark.parametrize("model_type", ["test_vit", "test_tiny_vit"])
def test_roundtrip_through_file_and_auto(tmp_path, model_type):
    torch.manual_seed(0)
    sam = build_sam(model_type)
    assert not sam.training
    path = tmp_path / "w.pth"
    torch.save(sam.state_dict(), path)
    again = build_sam("auto", path)
    assert detect_model_type(torch.load(path, weights_only=True)) == model_type
    x = torch.randn(1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size)
    with torch.no_grad():
        torch.testing.assert_close(again.image_encoder(x), sam.image_encoder(x))
    side = sam.image_encoder.img_size // 16
    assert sam.prompt_encoder.image_embedding_size == (side, side)
    assert sam.prompt_encoder.mask_input_size == (4 * side, 4 * side)


def test_strict_loading_and_clear_errors():
    sd = build_sam("test_vit").state_dict()
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key"):
        build_sam("test_tiny_vit", sd)
    with pytest.raises(ValueError, match="unknown model type 'vit_x'"):
        build_sam("vit_x")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        build_sam("auto")
    with pytest.raises(TypeError, match="path or a state_dict"):
        build_sam("test_vit", 42)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_sam(SamConfig(encoder="resnet"))


def test_custom_config_and_full_pipeline_matches_official(official, randomize, maxdiff):
    """A SamConfig variant built by us equals the official Sam with the same weights."""
    cfg = dataclasses.replace(CONFIGS["test_vit"], img_size=64, vit_window_size=2)
    ours = build_sam(cfg)
    m = official.modeling
    ref = m.Sam(
        image_encoder=m.ImageEncoderViT(
            img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0,
            out_chans=256, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=2, global_attn_indexes=(1,),
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=16
        ),
        mask_decoder=m.MaskDecoder(
            transformer_dim=256,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=256),
        ),
    ).eval()  # fmt: skip
    randomize(ref, seed=9, scale=0.1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    batch = [
        {
            "image": torch.rand(3, 64, 48) * 255,
            "original_size": (128, 96),
            "point_coords": torch.tensor([[[10.0, 20.0]], [[30.0, 5.0]]]),
            "point_labels": torch.tensor([[1], [1]]),
            "boxes": torch.tensor([[4.0, 4.0, 40.0, 60.0], [0.0, 0.0, 20.0, 20.0]]),
        }
    ]
    for multimask in (True, False):
        a = ref(batch, multimask)[0]
        b = ours(batch, multimask)[0]
        assert maxdiff(a["low_res_logits"], b["low_res_logits"]) < 1e-4
        assert maxdiff(a["iou_predictions"], b["iou_predictions"]) < 1e-4


def test_package_import_is_lazy():
    code = (
        "import sys, napari_sam.model as m; assert 'torch' not in sys.modules; "
        "import napari_sam; b = napari_sam.build_sam; assert 'torch' in sys.modules; "
        "assert b is m.build_sam and m.Sam.__name__ == 'Sam' and callable(m.detect_model_type)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

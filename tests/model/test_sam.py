"""Sam wrapper: preprocess / postprocess / batched forward match the official Sam."""

from __future__ import annotations

import copy

import pytest
import torch

from napari_sam.model.build import build_sam_from_parts, load_state_dict_into


def _official_tiny_sam(official, img_size=128):
    """Official Sam with a tiny ViT encoder (embedding img_size/16) and the full decoder."""
    from functools import partial

    m = official.modeling
    enc = m.ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    )
    e = img_size // 16
    sam = m.Sam(
        image_encoder=enc,
        prompt_encoder=m.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(e, e),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoder(
            transformer_dim=256,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
        ),
    )
    return sam.eval()


@pytest.fixture(scope="module")
def pair(official, randomize):
    ref = randomize(_official_tiny_sam(official), seed=5, scale=0.1)
    ours = build_sam_from_parts(copy.deepcopy(ref.image_encoder))
    load_state_dict_into(ours, ref.state_dict())
    return ref, ours


def _batched_input(gen):
    img1 = torch.rand(3, 128, 96, generator=gen) * 255  # landscape original 200 x 150
    img2 = torch.rand(3, 80, 128, generator=gen) * 255
    return [
        {
            "image": img1,
            "original_size": (200, 150),
            "point_coords": torch.tensor([[[30.0, 40.0], [60.0, 100.0]]]),
            "point_labels": torch.tensor([[1, 0]]),
        },
        {
            "image": img2,
            "original_size": (50, 80),
            "boxes": torch.tensor([[10.0, 5.0, 90.0, 70.0], [0.0, 0.0, 40.0, 40.0]]),
            "mask_inputs": torch.randn(2, 1, 32, 32, generator=gen),
        },
    ]


@pytest.mark.parametrize("multimask", [True, False])
def test_forward_matches_official(pair, maxdiff, multimask):
    ref, ours = pair
    batch = _batched_input(torch.Generator().manual_seed(11))
    out_ref = ref(batch, multimask_output=multimask)
    out_ours = ours(batch, multimask_output=multimask)
    k = 3 if multimask else 1
    for rec, r, o, b in zip(batch, out_ref, out_ours, [1, 2], strict=True):
        size = rec["original_size"]
        assert o["masks"].shape == (b, k, *size) and o["masks"].dtype == torch.bool
        assert o["low_res_logits"].shape == (b, k, 32, 32)
        assert maxdiff(o["low_res_logits"], r["low_res_logits"]) < 1e-4
        assert maxdiff(o["iou_predictions"], r["iou_predictions"]) < 1e-4
        # thresholded masks may only differ where the logit is within float noise of 0
        logits = ours.postprocess_masks(o["low_res_logits"], rec["image"].shape[-2:], size)
        assert (o["masks"] != r["masks"]).sum() <= (logits.abs() < 1e-3).sum()


def test_preprocess_and_postprocess_match_official(pair, maxdiff):
    ref, ours = pair
    x = torch.rand(3, 100, 128) * 255
    assert maxdiff(ours.preprocess(x), ref.preprocess(x)) < 1e-5
    low = torch.randn(2, 3, 32, 32)
    assert (
        maxdiff(
            ours.postprocess_masks(low, (100, 128), (300, 384)),
            ref.postprocess_masks(low, (100, 128), (300, 384)),
        )
        < 1e-5
    )
    assert ours.mask_threshold == 0.0 and ours.image_format == "RGB"
    assert ours.prompt_encoder.mask_input_size == (32, 32)


def test_preprocess_rejects_bad_images(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="larger than the model input"):
        ours.preprocess(torch.zeros(3, 200, 100))
    with pytest.raises(ValueError, match="RGB"):
        ours.preprocess(torch.zeros(1, 64, 64))


def test_pixel_buffers_not_in_state_dict(pair):
    _, ours = pair
    keys = ours.state_dict().keys()
    assert "pixel_mean" not in keys and "pixel_std" not in keys
    with pytest.raises(RuntimeError, match="Unexpected key"):
        load_state_dict_into(ours, {**ours.state_dict(), "extra.weight": torch.zeros(1)})

"""The project's small SAM (nsam): encoder shapes, SAM key layout, prompt rendering,
and the predictor using the rendered dense prompt."""

import numpy as np
import pytest
import torch

from napari_sam.model.build import build_sam_from_parts
from napari_sam.model.small_encoder import (
    NSAM_S,
    SmallEncoder,
    build_nsam,
    render_prompts,
    set_canvas,
)

TINY = {
    "img_size": 64,
    "widths": [8, 8, 16, 16, 16],
    "depths": [0, 1, 1, 0, 0],
    "embed_dim": 32,
    "mask_in_chans": 8,
    "decoder_depth": 1,
    "decoder_num_heads": 2,
    "decoder_mlp_dim": 32,
    "iou_head_hidden_dim": 16,
}


def test_encoder_shapes_and_bad_size():
    enc = SmallEncoder(
        img_size=64, widths=(8, 8, 16, 16, 16), depths=(0, 1, 1, 1, 1), embed_dim=24
    )
    out = enc(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 24, 8, 8)
    with pytest.raises(ValueError, match="multiple of 32"):
        SmallEncoder(img_size=100)
    with pytest.raises(ValueError, match="5 entries"):
        SmallEncoder(widths=(8, 8))


def test_default_config_sizes():
    model = build_nsam()
    assert model.image_encoder.img_size == NSAM_S["img_size"] == 512
    assert tuple(model.prompt_encoder.image_embedding_size) == (64, 64)
    assert tuple(model.prompt_encoder.mask_input_size) == (256, 256)  # like official SAM
    n = sum(p.numel() for p in model.parameters())
    assert n * 2 < 20e6  # float16 weights fit the 20 MB budget


def test_state_dict_keys_are_sams():
    model = build_nsam(TINY)
    ref = build_sam_from_parts(
        SmallEncoder(img_size=64, widths=TINY["widths"], depths=TINY["depths"], embed_dim=32),
        embed_dim=32,
        image_embedding_size=(8, 8),
        mask_in_chans=8,
        decoder_depth=1,
        decoder_num_heads=2,
        decoder_mlp_dim=32,
        iou_head_hidden_dim=16,
    )
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in ref.state_dict().items()}
    assert ours == theirs
    # and they load into each other strictly
    ref.load_state_dict(model.state_dict(), strict=True)


def test_pe_scale_is_baked_into_the_weights():
    torch.manual_seed(0)
    a = build_nsam({**TINY, "pe_scale": 1.0})
    torch.manual_seed(0)
    b = build_nsam({**TINY, "pe_scale": 4.0})
    ga = a.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    gb = b.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    torch.testing.assert_close(gb, 4 * ga)


def test_render_prompts():
    coords = torch.tensor([[[10.0, 20.0], [40.0, 40.0], [5.0, 5.0]]])  # (x, y), 64 frame
    labels = torch.tensor([[1, 0, -1]])
    r = render_prompts((coords, labels), None, (64, 64), (32, 32), 4.0, 8.0, 1.5, 1, "cpu")
    assert r.shape == (1, 1, 32, 32)
    # positive bump at (x=10, y=20) -> mask frame (~5, ~10), negative at (~20, ~20)
    assert r[0, 0, 10, 5] > 7 and r[0, 0, 20, 20] < -7
    assert abs(r[0, 0, 2, 2]) < 1e-3  # the padding point (-1) is not rendered
    box = torch.tensor([[16.0, 8.0, 47.0, 31.0]])  # XYXY inclusive, 64 frame
    r = render_prompts(None, box, (64, 64), (32, 32), 4.0, 8.0, 1.5, 1, "cpu")[0, 0]
    # the box covers rows 4..15, cols 8..23 of the 32 frame: soft at the edge pixels
    assert r[5:15, 9:23].min() > 3.5
    assert r[4:16, 8:24].min() > 2.0
    assert r[4:16, 7].max() < 1.2 and r[3, 8:24].max() < 1.2
    assert r[20:, :].max() < 0.01 and r[:, 28:].max() < 0.01


def test_dense_prompt_depends_on_prompts_and_mask():
    model = build_nsam(TINY)
    pe = model.prompt_encoder
    assert pe.renders_prompts
    b1, b2 = torch.tensor([[4.0, 4.0, 20.0, 20.0]]), torch.tensor([[30.0, 30.0, 60.0, 60.0]])
    _, d1 = pe(points=None, boxes=b1, masks=None)
    _, d2 = pe(points=None, boxes=b2, masks=None)
    _, d0 = pe(points=None, boxes=None, masks=None)
    assert d1.shape == d0.shape == (1, 32, 8, 8)
    assert not torch.allclose(d1, d2) and not torch.allclose(d1, d0)
    mask = torch.randn(1, 1, 32, 32)
    _, dm = pe(points=None, boxes=b1, masks=mask)
    rendered = render_prompts(
        None, b1, (64, 64), (32, 32), pe.render_box, pe.render_point, pe.render_sigma, 1, "cpu"
    )
    torch.testing.assert_close(dm, pe.mask_downscaling(mask + rendered))


def test_predictor_uses_rendered_dense_prompt():
    from napari_sam.predictor import SamPredictor

    torch.manual_seed(0)
    model = build_nsam(TINY)
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    pred = SamPredictor(model)
    pred.set_image(image)
    box = np.array([8, 8, 40, 30])
    _, iou, low = pred.predict(box=box, multimask_output=True)
    with torch.inference_mode():
        emb = pred.features
        sparse, dense = model.prompt_encoder(
            points=None, boxes=torch.tensor(box[None], dtype=torch.float32), masks=None
        )
        ref_low, ref_iou = model.mask_decoder(
            image_embeddings=emb,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )
    np.testing.assert_allclose(low, ref_low[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(iou, ref_iou[0].numpy(), atol=1e-5)


def test_checkpoint_roundtrip_half_and_canvas(tmp_path):
    model = build_nsam(TINY)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(sd, tmp_path / "w.pt")
    again = build_nsam(TINY, checkpoint=tmp_path / "w.pt")
    for k, v in again.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, sd[k].float())
    set_canvas(again, 128)
    assert again.image_encoder.img_size == 128
    assert tuple(again.prompt_encoder.mask_input_size) == (64, 64)
    with pytest.raises(ValueError, match="unknown nsam config"):
        build_nsam({"bogus": 1})


def test_nsam_pads_small_slices_by_default():
    from napari_sam.model.small_encoder import build_nsam

    tiny = {"img_size": 64, "widths": [8, 8, 8, 8, 8], "depths": [0, 0, 0, 0, 0],
            "embed_dim": 32, "decoder_mlp_dim": 32, "iou_head_hidden_dim": 16}  # fmt: skip
    assert build_nsam(tiny).input_min_side == 256
    assert build_nsam({**tiny, "input_min_side": None}).input_min_side is None  # SAM's rule


# ------------------------------------------------------------------ high-resolution skip


def _hires_pair():
    torch.manual_seed(3)
    base = build_nsam(TINY)
    hq = build_nsam({**TINY, "hires_chans": 2}, checkpoint=base.state_dict(), new_hires=True)
    return base, hq


def test_hires_skip_starts_equal_to_the_model_it_was_added_to():
    from napari_sam.predictor import SamPredictor

    base, hq = _hires_pair()
    assert hq.image_encoder.out_chans == 32 + 16 * 2
    assert hq.image_encoder(torch.randn(1, 3, 64, 64)).shape == (1, 64, 8, 8)
    # weights without the skip load into a skip model only when asked to
    with pytest.raises(RuntimeError, match="Missing key"):
        build_nsam({**TINY, "hires_chans": 2}, checkpoint=base.state_dict())
    img = np.random.default_rng(0).integers(0, 255, (60, 50), dtype=np.uint8)
    prompts = [
        {"point_coords": np.array([[20.0, 30.0]]), "point_labels": np.array([1])},
        {"box": np.array([5.0, 8.0, 40.0, 50.0]), "multimask_output": False},
    ]
    for kw in prompts:
        outs = []
        for model in (base, hq):
            p = SamPredictor(model)
            p.set_image(img)
            outs.append(p.predict(return_logits=True, **kw))
        np.testing.assert_allclose(outs[0][0], outs[1][0], atol=1e-5)
        np.testing.assert_allclose(outs[0][1], outs[1][1], atol=1e-6)


def test_hires_skip_adds_image_detail_in_every_decoder_path():
    """With a non-zero projection the masks change, and the predictor, the batched point
    decoder (automatic segmentation) and the decoder module agree."""
    from napari_sam._point_decoder import PointDecoder
    from napari_sam.predictor import SamPredictor

    base, hq = _hires_pair()
    with torch.no_grad():
        for p in hq.mask_decoder.hires_proj.parameters():
            p.normal_(0, 0.5)
    img = np.random.default_rng(1).integers(0, 255, (64, 64), dtype=np.uint8)
    xy = np.array([[30.0, 20.0]])
    logits = []
    for model in (base, hq):
        p = SamPredictor(model)
        p.set_image(img)
        logits.append(p.predict(point_coords=xy, point_labels=np.array([1]), return_logits=True))
    assert np.abs(logits[0][0] - logits[1][0]).max() > 0.1
    p = SamPredictor(hq)
    p.set_image(img)
    emb = p.get_embedding().features
    for fast in (True, False):  # the batched fast path and the decoder modules
        dec = PointDecoder(hq, fast=fast, precision="float32")
        assert dec.uses_fast_path == fast
        dec.set_embedding(emb)
        out = dec.decode(torch.tensor(xy, dtype=torch.float32))
        np.testing.assert_allclose(out.iou_predictions[0].numpy(), logits[1][1], atol=1e-5)
        np.testing.assert_allclose(out.logits.numpy(), logits[1][2].reshape(3, 32, 32), atol=1e-4)
    # the predictor's fast decoder against the module path
    from napari_sam import _fast_decoder

    with torch.inference_mode():
        prep = p._get_prepared()
        assert prep.skip is not None
        sparse, dense = hq.prompt_encoder(
            points=(torch.tensor([[[30.0, 20.0]]]), torch.tensor([[1]])), boxes=None, masks=None
        )
        ref = _fast_decoder.decode(hq.mask_decoder, prep, sparse, dense, True, fast=False)
        got = _fast_decoder.decode(hq.mask_decoder, prep, sparse, dense, True)
    assert torch.allclose(got[0], ref[0], atol=1e-4) and torch.allclose(got[1], ref[1], atol=1e-5)

"""The fast batched point decoder computes the same function as SAM's mask decoder."""

import pytest
import torch

from napari_sam._point_decoder import PointDecoder, resolve_dtype

from ._automatic_models import tiny_official_sam


def _reference(sam, emb, pts):
    dec = PointDecoder(sam, fast=False)
    dec.set_embedding(emb)
    return dec.decode(pts)


@pytest.fixture(scope="module")
def tiny():
    sam, _ = tiny_official_sam(img_size=256, dim=32)
    torch.manual_seed(1)
    emb = torch.randn(1, 32, 16, 16)
    pts = torch.rand(7, 2) * 256
    return sam, emb, pts


def test_fast_path_matches_modules_float32(tiny):
    sam, emb, pts = tiny
    ref = _reference(sam, emb, pts)
    fast = PointDecoder(sam, precision="float32")
    assert fast.uses_fast_path
    fast.set_embedding(emb)
    out = fast.decode(pts)
    assert out.logits.shape == (7 * 3, 64, 64)
    assert torch.equal(out.index, ref.index)
    torch.testing.assert_close(out.iou_predictions, ref.iou_predictions, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)


def test_iou_gate_returns_only_passing_outputs(tiny):
    sam, emb, pts = tiny
    ref = _reference(sam, emb, pts)
    v = ref.iou_predictions.flatten().sort().values
    thr = float(v[10] + v[11]) / 2  # between two outputs, away from rounding ties
    fast = PointDecoder(sam, precision="float32")
    fast.set_embedding(emb)
    out = fast.decode(pts, min_iou=thr)
    expected = (ref.iou_predictions >= thr).nonzero()
    assert 0 < len(expected) < 21
    assert torch.equal(out.index, expected)
    full = {tuple(i.tolist()): k for k, i in enumerate(ref.index)}
    want = torch.stack([ref.logits[full[tuple(i.tolist())]] for i in out.index])
    torch.testing.assert_close(out.logits, want, atol=1e-4, rtol=1e-4)


def test_sam_sized_decoder_matches(tiny):
    """vit_b/l/h share this decoder: 256 channels, 64 x 64 embedding, 8 heads."""
    from reference.official import import_official

    import_official()
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    torch.manual_seed(0)
    pe = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(1024, 1024),
        mask_in_chans=16,
    )
    md = MaskDecoder(
        num_multimask_outputs=3,
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
    )
    sam = torch.nn.Module()
    sam.prompt_encoder, sam.mask_decoder = pe.eval(), md.eval()
    emb = torch.randn(1, 256, 64, 64)
    pts = torch.tensor([[10.0, 20.0], [512.0, 300.0], [1000.0, 1000.0]])
    ref = _reference(sam, emb, pts)
    fast = PointDecoder(sam, precision="float32")
    fast.set_embedding(emb)
    out = fast.decode(pts)
    torch.testing.assert_close(out.logits, ref.logits, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.iou_predictions, ref.iou_predictions, atol=1e-5, rtol=1e-4)
    # bfloat16 matmuls: same masks up to a thin band around the threshold
    bf = PointDecoder(sam, precision="bfloat16")
    bf.set_embedding(emb)
    agree = ((bf.decode(pts).logits > 0) == (ref.logits > 0)).float().mean()
    assert agree > 0.99


def test_precision_names():
    assert resolve_dtype("float32", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_decode_before_embedding_is_a_clear_error(tiny):
    sam, _, pts = tiny
    with pytest.raises(RuntimeError, match="set_embedding"):
        PointDecoder(sam).decode(pts)
    with pytest.raises(ValueError, match=r"\(1, C, h, w\)"):
        PointDecoder(sam).set_embedding(torch.zeros(32, 16, 16))


def test_prompt_rendering_encoder_dense_per_prompt():
    """nsam models render the points into the dense prompt: no sharing across prompts, still
    the same numbers as the modules."""
    from napari_sam.model.small_encoder import build_nsam

    torch.manual_seed(0)
    sam = build_nsam(
        {
            "img_size": 128,
            "widths": [8, 8, 16, 16, 32],
            "depths": [0, 1, 1, 1, 1],
            "embed_dim": 32,
            "decoder_mlp_dim": 64,
            "iou_head_hidden_dim": 32,
        }
    )
    emb = torch.randn(1, 32, 16, 16)
    # corners, edges, the middle and off-grid positions: the windows are clamped at borders
    pts = torch.tensor(
        [[10.0, 20.0], [64.0, 64.0], [120.0, 5.0], [0.0, 0.0], [127.0, 127.0], [3.3, 90.7]]
    )
    ref = _reference(sam, emb, pts)
    fast = PointDecoder(sam, precision="float32")
    # the dense prompt is rendered in a window around each point, not over the whole mask
    assert fast.dense_per_prompt and fast.uses_fast_path and fast.local_render
    fast.set_embedding(emb)
    out = fast.decode(pts)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.iou_predictions, ref.iou_predictions, atol=1e-5, rtol=1e-4)
    # the official prompt encoder's dense prompt does not depend on the points: shared
    assert not PointDecoder(tiny_official_sam()[0]).dense_per_prompt

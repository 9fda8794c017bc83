"""Prompt encoder: official keys load strictly and outputs match the official module."""

from __future__ import annotations

import pytest
import torch

from napari_sam.model.prompt_encoder import PromptEncoder

EMB = (64, 64)
INP = (1024, 1024)


@pytest.fixture
def pair(official, randomize):
    ref = official.modeling.PromptEncoder(
        embed_dim=256, image_embedding_size=EMB, input_image_size=INP, mask_in_chans=16
    )
    randomize(ref, seed=1)
    ours = PromptEncoder(
        embed_dim=256, image_embedding_size=EMB, input_image_size=INP, mask_in_chans=16
    )
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def _points(b, n, gen):
    coords = torch.rand(b, n, 2, generator=gen) * 1023
    labels = torch.randint(0, 2, (b, n), generator=gen)
    labels[:, -1] = -1 if n > 2 else labels[:, -1]
    return coords, labels


def _boxes(b, gen):
    xy0 = torch.rand(b, 2, generator=gen) * 500
    return torch.cat([xy0, xy0 + 10 + torch.rand(b, 2, generator=gen) * 500], dim=1)


CASES = [
    ("points", 1, True, False, False),
    ("points_batch", 4, True, False, False),
    ("box", 1, False, True, False),
    ("boxes_batch", 3, False, True, False),
    ("points_box", 2, True, True, False),
    ("mask", 2, False, False, True),
    ("points_mask", 1, True, False, True),
    ("all", 3, True, True, True),
    ("nothing", 1, False, False, False),
]


@pytest.mark.parametrize("name,b,use_pts,use_box,use_mask", CASES, ids=[c[0] for c in CASES])
def test_matches_official(pair, maxdiff, name, b, use_pts, use_box, use_mask):
    ref, ours = pair
    gen = torch.Generator().manual_seed(3)
    points = _points(b, 5, gen) if use_pts else None
    boxes = _boxes(b, gen) if use_box else None
    masks = torch.randn(b, 1, 256, 256, generator=gen) * 5 if use_mask else None
    with torch.no_grad():
        s_ref, d_ref = ref(points, boxes, masks)
        s_ours, d_ours = ours(points, boxes, masks)
    n_tokens = (5 + (0 if use_box else 1) if use_pts else 0) + (2 if use_box else 0)
    assert s_ours.shape == (b, n_tokens, 256)
    assert d_ours.shape == (b, 256, 64, 64)
    if n_tokens:
        assert maxdiff(s_ours, s_ref) < 1e-4
    assert maxdiff(d_ours, d_ref) < 1e-4


def test_dense_pe_matches_official(pair, maxdiff):
    ref, ours = pair
    pe = ours.get_dense_pe()
    assert pe.shape == (1, 256, 64, 64)
    assert maxdiff(pe, ref.get_dense_pe()) < 1e-5


def test_label_semantics(pair):
    """Padding points ignore their position; labels 0 and 1 differ by the learned embeddings."""
    _, ours = pair
    coords = torch.tensor([[[10.0, 20.0], [500.0, 700.0], [10.0, 20.0]]])
    labels = torch.tensor([[1, -1, 0]])
    with torch.no_grad():
        sparse, _ = ours((coords, labels), None, None)
    # index 1 and the appended pad (3) are both "not a point", whatever their coordinates
    torch.testing.assert_close(sparse[0, 1], ours.not_a_point_embed.weight[0])
    torch.testing.assert_close(sparse[0, 3], ours.not_a_point_embed.weight[0])
    diff = sparse[0, 0] - sparse[0, 2]
    expected = ours.point_embeddings[1].weight[0] - ours.point_embeddings[0].weight[0]
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise(pair):
    _, ours = pair
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        ours((torch.zeros(3, 2), torch.zeros(3)), None, None)
    with pytest.raises(ValueError, match="labels"):
        ours((torch.zeros(1, 3, 2), torch.zeros(1, 2)), None, None)
    with pytest.raises(ValueError, match="XYXY"):
        ours(None, torch.zeros(1, 3), None)
    with pytest.raises(ValueError, match="256, 256"):
        ours(None, None, torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="batch size"):
        ours((torch.zeros(2, 1, 2), torch.ones(2, 1)), torch.zeros(3, 4), None)


def test_pe_frame_places_a_crop_inside_the_full_frame():
    """A point at (x, y) of a 192-pixel crop that sits at pixel offset (o_x, o_y) of a 512
    frame gets exactly the encoding of the point (x + o_x, y + o_y) of the 512 frame; the
    crop's dense grid is the matching window of the full grid."""
    from napari_sam.model.small_encoder import NSAM_S, build_nsam, set_canvas
    from napari_sam.train.loop import set_pe_frame

    torch.manual_seed(0)
    full = build_nsam({**NSAM_S, "embed_dim": 32, "decoder_mlp_dim": 64})
    crop = build_nsam({**NSAM_S, "embed_dim": 32, "decoder_mlp_dim": 64})
    crop.load_state_dict(full.state_dict())
    set_canvas(crop, 192)
    ox, oy = 128, 256  # multiples of the stride 8
    set_pe_frame(crop, 192 / 512, (ox / 512, oy / 512))
    pts = torch.tensor([[[10.0, 20.0], [150.0, 3.0]]])
    a = crop.prompt_encoder.pe_layer.forward_with_coords(pts + 0.5, (192, 192))
    b = full.prompt_encoder.pe_layer.forward_with_coords(
        pts + 0.5 + torch.tensor([ox, oy]), (512, 512)
    )
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    dense_crop = crop.prompt_encoder.get_dense_pe()
    dense_full = full.prompt_encoder.get_dense_pe()
    window = dense_full[..., oy // 8 : oy // 8 + 24, ox // 8 : ox // 8 + 24]
    torch.testing.assert_close(dense_crop, window, atol=1e-5, rtol=0)
    # and the default frame is SAM's encoding again
    set_pe_frame(crop)
    c = crop.prompt_encoder.pe_layer.forward_with_coords(pts + 0.5, (192, 192))
    d = full.prompt_encoder.pe_layer.forward_with_coords(
        pts * 512 / 192 + 0.5 * 512 / 192, (512, 512)
    )
    torch.testing.assert_close(c, d, atol=1e-5, rtol=0)

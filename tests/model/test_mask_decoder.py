"""Mask decoder + two-way transformer: strict official keys and numerical parity."""

from __future__ import annotations

import pytest
import torch

from napari_sam.model.mask_decoder import MaskDecoder
from napari_sam.model.transformer import TwoWayTransformer


def _build(mod):
    return mod.MaskDecoder(
        transformer_dim=256,
        transformer=mod.TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


class _Ours:
    MaskDecoder = MaskDecoder
    TwoWayTransformer = TwoWayTransformer


@pytest.fixture(scope="module")
def pair(official, randomize):
    ref = randomize(_build(official.modeling), seed=2, scale=0.1).eval()
    ours = _build(_Ours).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("b,n,hw", [(1, 3, 64), (3, 2, 16), (2, 0, 16)])
def test_matches_official(pair, maxdiff, multimask, b, n, hw):
    ref, ours = pair
    gen = torch.Generator().manual_seed(b * 10 + n)
    emb = torch.randn(1, 256, hw, hw, generator=gen)
    pe = torch.randn(1, 256, hw, hw, generator=gen)
    sparse = torch.randn(b, n, 256, generator=gen)
    dense = torch.randn(b, 256, hw, hw, generator=gen)
    with torch.no_grad():
        m_ref, iou_ref = ref(emb, pe, sparse, dense, multimask)
        m_ours, iou_ours = ours(emb, pe, sparse, dense, multimask)
    k = 3 if multimask else 1
    assert m_ours.shape == (b, k, 4 * hw, 4 * hw)
    assert iou_ours.shape == (b, k)
    assert maxdiff(m_ours, m_ref) < 1e-4
    assert maxdiff(iou_ours, iou_ref) < 1e-4


def test_per_prompt_image_embeddings(pair, maxdiff):
    """A (B, C, h, w) embedding batch gives each prompt its own image."""
    _, ours = pair
    gen = torch.Generator().manual_seed(7)
    emb = torch.randn(2, 256, 16, 16, generator=gen)
    pe = torch.randn(1, 256, 16, 16, generator=gen)
    sparse = torch.randn(2, 2, 256, generator=gen)
    dense = torch.randn(2, 256, 16, 16, generator=gen)
    with torch.no_grad():
        both, _ = ours(emb, pe, sparse, dense, True)
        second, _ = ours(emb[1:], pe, sparse[1:], dense[1:], True)
    assert maxdiff(both[1:], second) < 1e-5
    with pytest.raises(ValueError, match="batch"):
        ours(torch.randn(3, 256, 16, 16), pe, sparse, dense, True)

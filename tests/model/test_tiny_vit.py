"""MobileSAM TinyViT (vit_t): strict layout and parity with MobileSAM's own implementation.

There is no installable MobileSAM package, so the reference output was computed once with
MobileSAM's code on deterministic synthetic weights (see tests/fixtures/README.md) and is
compared here against our encoder on the same regenerated weights.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from synth_weights import FIXTURES, load_layout, synth_image, synth_state_dict

from napari_sam.model.build import build_sam
from napari_sam.model.tiny_vit import Attention, TinyViT


@pytest.fixture(scope="module")
def vit_t_synth():
    lay = load_layout("mobile_sam_vit_t")
    sd = synth_state_dict(lay["layout"], lay["dtypes"], seed=0)
    return build_sam("vit_t", {k: torch.from_numpy(v) for k, v in sd.items()})


def test_matches_mobilesam_reference(vit_t_synth):
    ref = np.load(FIXTURES / "tinyvit_vit_t_reference.npz")
    x = torch.from_numpy(synth_image(seed=1))
    with torch.inference_mode():
        y = vit_t_synth.image_encoder(x)[0].numpy()
    assert y.shape == (256, 64, 64)
    assert np.abs(y[ref["channels"]] - ref["embedding"]).max() < 1e-4
    assert np.abs(y.mean(axis=(1, 2)) - ref["channel_mean"]).max() < 1e-5
    assert np.abs(y.std(axis=(1, 2), ddof=1) - ref["channel_std"]).max() < 1e-4


def test_attention_bias_index_follows_first_seen_offset_order():
    """The checkpoint's attention_biases columns are offsets (|dy|, |dx|) numbered in the
    order they first appear when enumerating all point pairs row-major (TinyViT/LeViT)."""
    h, w = 3, 5
    points = list(itertools.product(range(h), range(w)))
    seen: dict[tuple[int, int], int] = {}
    expected = []
    for p in points:
        for q in points:
            off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
            expected.append(seen.setdefault(off, len(seen)))
    attn = Attention(dim=8, num_heads=2, resolution=(h, w))
    assert attn.attention_biases.shape == (2, len(seen))
    assert attn.attention_bias_idxs.tolist() == torch.tensor(expected).view(h * w, h * w).tolist()
    assert "attention_bias_idxs" not in attn.state_dict()


def test_windows_with_padding_and_stride_one_merge():
    enc = TinyViT(
        img_size=160, embed_dims=(16, 24, 32, 40), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2),
        window_sizes=(7, 7, 7, 4), num_classes=0,
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        y = enc(x)
        y1 = enc(x[1:])
    assert y.shape == (2, 256, 10, 10)  # 160 / 4 / 2 / 2, last merge stride 1
    assert torch.isfinite(y).all()
    # batch items are independent (window partitioning must not mix images)
    torch.testing.assert_close(y1, y[1:], atol=1e-5, rtol=1e-5)

"""ViT image encoder: strict official keys and numerical parity with the official encoder."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from napari_sam.model.image_encoder import ImageEncoderViT, _rel_pos_table


def _pair(official, randomize, scale=0.2, **kw):
    # Built on the meta device and then given storage: skips the default initialisation,
    # which `randomize` overwrites anyway (matters for ViT-B-sized models).
    with torch.device("meta"):
        ref = official.modeling.ImageEncoderViT(
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True, **kw
        )
        ours = ImageEncoderViT(**kw)
    ref, ours = ref.to_empty(device="cpu"), ours.to_empty(device="cpu")
    randomize(ref, seed=4, scale=scale)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


SMALL = [
    # grid 8, window 4: no padding
    {
        "img_size": 128,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "window_size": 4,
        "global_attn_indexes": (1,),
    },
    # grid 16, window 5: windows padded to 20; two global blocks
    {
        "img_size": 256,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 3,
        "window_size": 5,
        "global_attn_indexes": (1, 3),
    },
    # grid 12, all global
    {
        "img_size": 192,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 4,
        "window_size": 0,
        "global_attn_indexes": (),
    },
]


@pytest.mark.parametrize("kw", SMALL, ids=["win4", "win5_padded", "global_only"])
def test_small_configs_match_official(official, randomize, maxdiff, kw):
    ref, ours = _pair(official, randomize, mlp_ratio=4.0, out_chans=256, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    with torch.no_grad():
        a, b = ref(x), ours(x)
    side = kw["img_size"] // 16
    assert b.shape == (2, 256, side, side)
    assert maxdiff(a, b) < 1e-4


def test_vit_b_architecture_matches_official(official, randomize, maxdiff):
    """ViT-B widths, depth, heads, window 14 and global blocks, at a 224 input (grid 14 = one
    window; padding is covered above) to stay fast; the 1024 key/shape layout is checked in test_build."""
    kw = {
        "img_size": 224, "embed_dim": 768, "depth": 12, "num_heads": 12, "window_size": 14,
        "global_attn_indexes": (2, 5, 8, 11), "mlp_ratio": 4.0, "out_chans": 256,
    }  # fmt: skip
    ref, ours = _pair(official, randomize, scale=0.02, **kw)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        a, b = ref(x), ours(x)
    assert b.shape == (1, 256, 14, 14)
    assert a.abs().max() > 0.1  # not a degenerate output
    assert maxdiff(a, b) < 1e-4


@pytest.mark.parametrize("stored,size", [(13, 10), (27, 14), (7, 7)])
def test_rel_pos_table_matches_official(official, stored, size):
    """Offset tables, including linear resampling when the stored table has another size."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    rel = torch.randn(stored, 8)
    torch.testing.assert_close(_rel_pos_table(rel, size), get_rel_pos(size, size, rel))


def test_rejects_bad_config():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ImageEncoderViT(img_size=100, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="must divide"):
        ImageEncoderViT(img_size=64, embed_dim=30, depth=1, num_heads=4)

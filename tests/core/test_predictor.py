"""SamPredictor: contract on odd inputs, geometry, batching, caching, parity with the official
segment-anything predictor, and the re-associated decoder against the model's own decoder.

Models are tiny (encoder input 128 px, an 8 x 8 embedding) with SAM's full-width prompt
encoder and mask decoder and random weights, so everything runs in seconds on a CPU.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from napari_sam import _fast_decoder
from napari_sam.model import build_sam_from_parts
from napari_sam.predictor import (
    Embedding,
    EmbeddingCache,
    SamPredictor,
    upsample_binary,
    upsample_logits,
)
from napari_sam.preprocess import Contrast
from napari_sam.prompts import PromptWarning

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
from reference.official import import_official, official_available  # noqa: E402

S = 128  # encoder input side of the test models; embedding 8 x 8, low-res masks 32 x 32


class PatchEncoder(nn.Module):
    """A small real image encoder: 16 x 16 patch embedding + a 3 x 3 conv; counts its calls."""

    def __init__(self, img_size: int = S, dim: int = 256) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch = nn.Conv2d(3, dim, 16, 16)
        self.mix = nn.Conv2d(dim, dim, 3, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.mix(F.gelu(self.patch(x)))


def _randomize(module: nn.Module, seed: int, scale: float = 0.3) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(module.state_dict().items()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * scale)
    return module


def _smooth_image(h: int, w: int, rgb: bool = True) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [
        (np.sin(xx / 9.0) + 1) * 120,
        (np.cos(yy / 13.0) + 1) * 120,
        (xx + yy) / (h + w) * 255,
    ]
    img = np.stack(chans, -1) if rgb else chans[0]
    return img.astype(np.uint8)


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    model = build_sam_from_parts(PatchEncoder())
    _randomize(model.mask_decoder, 1)
    _randomize(model.prompt_encoder, 2, scale=1.0)
    return model.eval()


@pytest.fixture
def predictor(sam):
    return SamPredictor(sam)


@pytest.fixture(scope="module")
def official():
    if not official_available():
        pytest.skip("segment-anything (the [parity] extra) is not installed")
    return import_official()


def _close(a, b, rel: float = 2e-5) -> None:
    """max |a - b| <= rel * max(1, max |b|): float rounding of a different operation order."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= rel * max(1.0, np.abs(b).max()), np.abs(a - b).max()


POINT = {"point_coords": np.array([[30.0, 20.0]]), "point_labels": np.array([1])}


# ------------------------------------------------------------------ contract
def test_predict_before_set_image_is_a_clear_error(predictor):
    for call in (
        lambda: predictor.predict(**POINT),
        lambda: predictor.predict_torch(torch.zeros(1, 1, 2), torch.ones(1, 1)),
        predictor.get_embedding,
    ):
        with pytest.raises(RuntimeError, match="set_image"):
            call()
    assert not predictor.is_image_set and predictor.original_size is None


def _nan_float(h, w):
    img = np.random.default_rng(0).normal(100, 20, (h, w)).astype(np.float32)
    img[::7, ::5] = np.nan
    img[1, 1] = np.inf
    return img


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(1).integers(0, 65535, (50, 70)).astype(np.uint16),
        _nan_float(40, 30),
        _smooth_image(33, 45),
        _smooth_image(1, 300, rgb=False),
        _smooth_image(8, 8),
        _smooth_image(4000, 300, rgb=False).astype(np.int32) - 1000,
        np.full((20, 30), np.nan),
    ],
    ids=["uint16", "float-nan", "rgb", "1xN", "8x8", "4000x300-int", "all-nan"],
)
def test_odd_inputs_give_masks_at_slice_resolution(predictor, image):
    predictor.set_image(image)
    h, w = image.shape[:2]
    assert predictor.original_size == (h, w)
    assert max(predictor.input_size) == S and min(predictor.input_size) >= 1
    x, y = (w - 1) / 2, (h - 1) / 2
    masks, iou, low = predictor.predict(np.array([[x, y]]), np.array([1]))
    assert masks.shape == (3, h, w) and masks.dtype == bool
    assert iou.shape == (3,) and iou.dtype == np.float32
    assert low.shape == (3, 32, 32) and low.dtype == np.float32
    box = np.array([-0.5, -0.5, w - 0.5, h - 0.5])  # the whole slice, pixel edges
    logits, _, _ = predictor.predict(box=box, return_logits=True)
    assert logits.shape == (3, h, w) and logits.dtype == np.float32 and np.isfinite(logits).all()
    m1, i1, l1 = predictor.predict(np.array([[x, y]]), np.array([1]), multimask_output=False)
    assert m1.shape == (1, h, w) and i1.shape == (1,) and l1.shape == (1, 32, 32)


def test_input_sizes_for_extreme_aspect_ratios(predictor):
    predictor.set_image(np.zeros((4000, 300), np.uint16))
    assert predictor.input_size == (128, 10)
    predictor.set_image(np.zeros((1, 5000), np.uint8))
    assert predictor.input_size == (1, 128)  # 0.0256 px would round to 0 -> 1
    masks, _, _ = predictor.predict(box=np.array([10, 0, 4000, 0.9]))
    assert masks.shape == (3, 1, 5000)


def test_prompt_errors(predictor):
    predictor.set_image(_smooth_image(40, 60))
    with pytest.raises(ValueError, match="needs a prompt"):
        predictor.predict()
    with pytest.raises(ValueError, match="without point_coords"):
        predictor.predict(point_labels=np.array([1]))
    with pytest.raises(ValueError, match="zero area"):
        predictor.predict(box=np.array([5, 5, 5, 20]))
    with pytest.raises(ValueError, match="mask_input must be"):
        predictor.predict(**POINT, mask_input=np.zeros((1, 64, 64)))
    with pytest.raises(ValueError, match="mask_input must be"):
        predictor.predict(**POINT, mask_input=np.zeros((32, 32)))
    with pytest.warns(PromptWarning, match="outside"):
        predictor.predict(np.array([[20.0, 100.0]]), np.array([1]))  # y = 100 > H = 40


# ------------------------------------------------------------------ geometry
def test_points_are_transformed_to_the_resized_frame(predictor):
    predictor.set_image(_smooth_image(60, 100))  # -> input (77, 128)
    assert predictor.input_size == (77, 128)
    xy = np.array([[50.0, 30.0], [10.0, 55.0]])
    t = predictor.transform.apply_coords(xy, predictor.original_size)
    np.testing.assert_allclose(t, xy * [128 / 100, 77 / 60])
    labels = np.array([1, 0])
    a = predictor.predict(xy, labels, return_logits=True)
    b = predictor.predict_torch(
        torch.as_tensor(t, dtype=torch.float32)[None],
        torch.as_tensor(labels)[None],
        return_logits=True,
    )
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v[0].numpy())
    # swapping x and y is a different prompt
    c = predictor.predict(xy[:, ::-1].copy(), labels, return_logits=True)
    assert np.abs(c[2] - a[2]).max() > 1e-3


@pytest.mark.parametrize("hw", [(300, 400), (4000, 300), (50, 50), (120, 2000)])
def test_upsampled_masks_land_on_the_right_slice_pixels(hw):
    """Low-res logits positive over a known region give a mask over that slice region."""
    h, w = hw
    ih, iw = (max(1, int(h * S / max(h, w) + 0.5)), max(1, int(w * S / max(h, w) + 0.5)))
    # region: rows [0.2, 0.6) x cols [0.5, 0.9) of the slice, drawn in low-res pixels
    r0, r1, c0, c1 = 0.2 * h, 0.6 * h, 0.5 * w, 0.9 * w
    k = 32 / S  # low-res px per input px
    low = -torch.ones(1, 1, 32, 32)
    u = (torch.arange(32) + 0.5) / k  # low-res pixel centres in input px
    rows = (u >= r0 * ih / h) & (u < r1 * ih / h)
    cols = (u >= c0 * iw / w) & (u < c1 * iw / w)
    low[0, 0][rows[:, None] & cols[None, :]] = 1.0
    masks = upsample_logits(low, (ih, iw), (h, w), S)[0, 0] > 0
    assert masks.shape == (h, w)
    expected = np.zeros((h, w), bool)
    expected[
        int(np.ceil(r0 - 0.5)) : int(np.ceil(r1 - 0.5)),
        int(np.ceil(c0 - 0.5)) : int(np.ceil(c1 - 0.5)),
    ] = True
    # boundaries may move by up to one low-res pixel in slice pixels
    tol_r, tol_c = h / ih / k, w / iw / k
    err = masks.numpy() ^ expected
    rr, cc = np.nonzero(err)
    near_r = np.minimum(np.abs(rr - r0), np.abs(rr - r1)) <= tol_r + 1
    near_c = np.minimum(np.abs(cc - c0), np.abs(cc - c1)) <= tol_c + 1
    assert np.all(near_r | near_c), "mask pixels wrong far from the region's border"
    assert masks.sum() > 0


def test_upsampling_agrees_with_reference_on_smooth_logits(sam):
    gen = torch.Generator().manual_seed(3)
    low = F.interpolate(torch.randn(2, 3, 6, 6, generator=gen), (32, 32), mode="bicubic")
    for hw in [(300, 400), (128, 128), (4000, 300), (50, 700), (8, 8)]:
        ih, iw = sam.image_encoder.img_size, sam.image_encoder.img_size
        scale = S / max(hw)
        ih, iw = max(1, int(hw[0] * scale + 0.5)), max(1, int(hw[1] * scale + 0.5))
        ref = sam.postprocess_masks(low, (ih, iw), hw)  # reference: up to S, crop, resize
        ours = upsample_logits(low, (ih, iw), hw, S)
        assert ours.shape == ref.shape
        assert (ours - ref).abs().max() < 0.05 * ref.abs().max()
        assert ((ours > 0) != (ref > 0)).float().mean() < 2e-3


@pytest.mark.parametrize(
    "hw", [(300, 400), (128, 128), (1000, 90), (2000, 1500), (1, 700), (8, 8), (513, 1)]
)
@pytest.mark.parametrize("kind", ["disk", "smooth", "noise"])
def test_cheap_threshold_equals_thresholded_logits(hw, kind):
    """upsample_binary only interpolates cells whose corners disagree; the masks must be
    those of thresholding the fully interpolated logits (up to values within float
    rounding of the threshold)."""
    gen = torch.Generator().manual_seed(hash((hw, kind)) % 2**31)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    if kind == "disk":
        low = torch.stack([4 - ((yy - 12) ** 2 + (xx - 15) ** 2).sqrt() / r for r in (1, 2, 3)])
        low = low[None]
    elif kind == "smooth":
        low = F.interpolate(torch.randn(2, 3, 5, 5, generator=gen), (32, 32), mode="bicubic")
    else:
        low = torch.randn(2, 3, 32, 32, generator=gen)
    scale = S / max(hw)
    ih, iw = max(1, int(hw[0] * scale + 0.5)), max(1, int(hw[1] * scale + 0.5))
    for thr in (0.0, 0.7):
        logits = upsample_logits(low, (ih, iw), hw, S)
        fast = upsample_binary(low, (ih, iw), hw, S, thr)
        assert fast.shape == logits.shape and fast.dtype == torch.bool
        wrong = fast != (logits > thr)
        assert not wrong.any() or (logits[wrong] - thr).abs().max() < 1e-5


def test_cheap_threshold_of_a_mask_does_not_depend_on_the_rest_of_the_batch():
    """A ragged mask (interpolated in full) next to smooth ones (outline cells only) gives
    each mask exactly as it is alone, so one candidate's mask can be recomputed by itself."""
    gen = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disk = 4 - ((yy - 12) ** 2 + (xx - 15) ** 2).sqrt() / 2
    smooth = F.interpolate(torch.randn(1, 1, 5, 5, generator=gen), (32, 32), mode="bicubic")
    noise = torch.randn(32, 32, generator=gen)
    low = torch.stack([disk, smooth[0, 0], noise])[None]  # 1 x 3 x 32 x 32
    for hw in [(300, 400), (97, 61), (1000, 90)]:
        scale = S / max(hw)
        ih, iw = max(1, int(hw[0] * scale + 0.5)), max(1, int(hw[1] * scale + 0.5))
        together = upsample_binary(low, (ih, iw), hw, S)
        for m in range(3):
            alone = upsample_binary(low[:, m : m + 1], (ih, iw), hw, S)
            assert torch.equal(together[:, m : m + 1], alone), (hw, m)


# ------------------------------------------------------------------ reduced masks
@pytest.mark.parametrize("hw", [(90, 120), (121, 77), (333, 1001), (1, 300), (640, 480)])
def test_masks_from_logits_equal_predict_at_full_size(sam, hw):
    """A candidate's full-resolution mask recomputed from its low-res logits is exactly the
    mask predict returned, and masks at mask_size = slice size are today's masks."""
    predictor = SamPredictor(sam)
    h, w = hw
    predictor.set_image(_smooth_image(h, w))
    pt = {
        "point_coords": np.array([[(w - 1) * 0.4, (h - 1) * 0.6]]),
        "point_labels": np.array([1]),
    }
    masks, iou, low = predictor.predict(**pt)
    same, _, low2 = predictor.predict(**pt, mask_size=(h, w))
    np.testing.assert_array_equal(same, masks)
    np.testing.assert_array_equal(low2, low)
    small = (max(1, h // 3), max(1, w // 3))
    reduced, iou_r, low_r = predictor.predict(**pt, mask_size=small)
    assert reduced.shape == (3, *small) and reduced.dtype == bool
    np.testing.assert_array_equal(low_r, low)  # the decoder's output does not change
    np.testing.assert_array_equal(iou_r, iou)
    for i in range(3):
        full = predictor.masks_from_logits(low[i])
        assert full.shape == (h, w) and full.dtype == bool
        np.testing.assert_array_equal(full, masks[i])
        np.testing.assert_array_equal(predictor.masks_from_logits(low[i], small), reduced[i])
    np.testing.assert_array_equal(predictor.masks_from_logits(low), masks)
    logits = predictor.predict(**pt, return_logits=True)[0]
    np.testing.assert_array_equal(predictor.masks_from_logits(low, return_logits=True), logits)
    # the slice size alone is enough: no embedding needed
    fresh = SamPredictor(sam)
    np.testing.assert_array_equal(fresh.masks_from_logits(low[1], original_size=hw), masks[1])


def test_reduced_masks_sample_the_centres_of_pixel_blocks(predictor):
    """With 3 x 3 blocks, reduced pixel (i, j) covers slice pixels 3i..3i+2 and samples the
    logits at the block's centre pixel (3i + 1, 3j + 1)."""
    predictor.set_image(_smooth_image(93, 126))
    full, _, low = predictor.predict(**POINT, return_logits=True)
    reduced = predictor.predict(**POINT, return_logits=True, mask_size=(31, 42))[0]
    _close(reduced, full[:, 1::3, 1::3], rel=1e-5)
    with pytest.raises(ValueError, match="two positive integers"):
        predictor.predict(**POINT, mask_size=(0, 10))
    with pytest.raises(ValueError, match="two positive integers"):
        predictor.predict(**POINT, mask_size=(10.5, 10))
    with pytest.raises(ValueError, match="low-res logits"):
        predictor.masks_from_logits(low[:, :16])
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(predictor.model).masks_from_logits(low)


# ------------------------------------------------------------------ batching & mask input
def test_batched_boxes_equal_single_box_predictions(predictor):
    img = _smooth_image(90, 120)
    predictor.set_image(img)
    boxes = np.array([[10, 10, 60, 50], [30, 20, 110, 85], [0, 0, 119, 89]], float)
    bm, bi, bl = predictor.predict(box=boxes, return_logits=True)
    assert bm.shape == (3, 3, 90, 120) and bi.shape == (3, 3) and bl.shape == (3, 3, 32, 32)
    for i, box in enumerate(boxes):
        m, iou, low = predictor.predict(box=box, return_logits=True)
        _close(bm[i], m)
        _close(bi[i], iou)
    # one point list shared by every box, and per-box points
    shared = predictor.predict(**POINT, box=boxes)[0]
    assert shared.shape == (3, 3, 90, 120)
    per_box = predictor.predict(
        point_coords=np.repeat(POINT["point_coords"][None], 3, 0),
        point_labels=np.ones((3, 1)),
        box=boxes,
    )[0]
    np.testing.assert_array_equal(shared, per_box)


def test_mask_input_round_trip(predictor):
    predictor.set_image(_smooth_image(70, 50))
    masks, iou, low = predictor.predict(**POINT)
    best = int(np.argmax(iou))
    m2, i2, l2 = predictor.predict(**POINT, mask_input=low[[best]], multimask_output=False)
    assert m2.shape == (1, 70, 50) and l2.shape == (1, 32, 32)
    # the mask prompt is used: a different mask input gives different logits
    m3, i3, l3 = predictor.predict(**POINT, mask_input=-low[[best]], multimask_output=False)
    assert np.abs(l3 - l2).max() > 1e-3
    # batched mask inputs with a box batch
    boxes = np.array([[5, 5, 40, 60], [10, 20, 30, 30]], float)
    bm, bi, bl = predictor.predict(box=boxes, mask_input=np.stack([low[[0]], low[[1]]]))
    assert bm.shape == (2, 3, 70, 50)
    single = predictor.predict(box=boxes[1], mask_input=low[[1]], return_logits=True)[2]
    _close(bl[1], single)


# ------------------------------------------------------------------ caching
def test_returning_to_a_cached_slice_does_not_encode(sam):
    p = SamPredictor(sam)
    enc = sam.image_encoder
    calls0 = enc.calls
    a, b = _smooth_image(40, 50), _smooth_image(40, 50)[::-1].copy()
    p.set_image(a, key=0)
    p.set_image(b, key=1)
    first = p.predict(**POINT)
    p.set_image(a, key=0)
    p.set_image(b, key=1)
    assert p.encoder_runs == 2 and enc.calls - calls0 == 2
    assert p.cache.hits == 2 and len(p.cache) == 2
    again = p.predict(**POINT)
    for u, v in zip(first, again, strict=True):
        np.testing.assert_array_equal(u, v)
    p.set_image(a, key=5)  # same content under another key is another entry
    assert p.encoder_runs == 3
    p.set_image(a.copy(), key=0)  # a copy with the same content hits
    assert p.encoder_runs == 3


def test_cache_signature_covers_contrast_and_weights(sam):
    img = np.random.default_rng(5).normal(size=(30, 30)).astype(np.float32)
    p = SamPredictor(sam)
    p.set_image(img)
    p.contrast = Contrast("minmax")
    p.set_image(img)
    assert p.encoder_runs == 2
    sig = p.signature(img)
    with torch.no_grad():
        sam.image_encoder.mix.bias.add_(0.0)  # an in-place update bumps the weights' version
    assert p.signature(img) != sig
    p.set_image(img)
    assert p.encoder_runs == 3
    named = SamPredictor(sam, model_key="tiny:v1")
    assert "tiny:v1" in named.signature(img)


def test_lru_evicts_by_bytes(sam):
    nbytes = 256 * 8 * 8 * 4
    p = SamPredictor(sam, cache_bytes=int(2.5 * nbytes))
    imgs = [_smooth_image(20 + i, 30) for i in range(3)]
    for img in imgs:
        p.set_image(img)
    assert len(p.cache) == 2 and p.cache.nbytes == 2 * nbytes and p.cache.evictions == 1
    p.set_image(imgs[2])  # most recent: cached
    p.set_image(imgs[1])  # cached; now imgs[2] is the least recently used
    assert p.encoder_runs == 3
    p.set_image(imgs[0])  # evicted earlier: encodes again, evicts imgs[2]
    assert p.encoder_runs == 4
    p.set_image(imgs[1])
    assert p.encoder_runs == 4
    p.set_image(imgs[2])
    assert p.encoder_runs == 5
    off = SamPredictor(sam, cache_bytes=0)
    off.set_image(imgs[0])
    off.set_image(imgs[0])
    assert off.encoder_runs == 2 and len(off.cache) == 0


def test_embedding_cache_unit():
    cache = EmbeddingCache(100)
    e = [Embedding(torch.zeros(10), (1, 1), (1, 1), f"s{i}") for i in range(4)]  # 40 B each
    for x in e[:2]:
        cache.put(x)
    assert cache.get("s0") is e[0]  # s1 becomes LRU
    cache.put(e[2])
    assert "s1" not in cache and cache.keys() == ["s0", "s2"]
    cache.put(Embedding(torch.zeros(30), (1, 1), (1, 1), "big"))  # 120 B > budget: not stored
    assert "big" not in cache and cache.nbytes == 80
    cache.put(Embedding(torch.zeros(10), (1, 1), (1, 1), ""))  # no signature: not stored
    assert len(cache) == 2
    with pytest.raises(ValueError, match=">= 0"):
        EmbeddingCache(-1)


def test_get_and_set_embedding(sam):
    img = _smooth_image(45, 64)
    p = SamPredictor(sam)
    p.set_image(img)
    emb = p.get_embedding()
    assert emb.features.shape == (1, 256, 8, 8) and emb.original_size == (45, 64)
    assert emb.input_size == (90, 128) and emb.nbytes == 256 * 64 * 4
    expected = p.predict(**POINT)
    q = SamPredictor(sam)
    q.set_embedding(Embedding(emb.features.clone(), emb.original_size, emb.input_size))
    assert q.encoder_runs == 0
    for u, v in zip(expected, q.predict(**POINT), strict=True):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="another model"):
        q.set_embedding(Embedding(torch.zeros(1, 256, 16, 16), (45, 64), (90, 128)))
    with pytest.raises(ValueError, match="input_size"):
        q.set_embedding(Embedding(emb.features, (45, 64), (64, 128)))
    with pytest.raises(TypeError, match="Embedding"):
        q.set_embedding(emb.features)
    q.reset_image()
    assert not q.is_image_set
    with pytest.raises(RuntimeError, match="set_image"):
        q.predict(**POINT)


def test_bfloat16_encoder_is_close_and_cached_separately(sam):
    img = _smooth_image(64, 64)
    p32 = SamPredictor(sam)
    p16 = SamPredictor(sam, encoder_dtype="bfloat16")
    p32.set_image(img)
    p16.set_image(img)
    f32, f16 = p32.features, p16.features
    assert f16.dtype == torch.float32
    assert (f16 - f32).abs().max() < 0.05 * f32.abs().max()
    assert p16.signature(img) != p32.signature(img)
    with pytest.raises(ValueError, match="encoder_dtype"):
        SamPredictor(sam, encoder_dtype="float16")


# ------------------------------------------------------------------ parity with the official predictor
PROMPTS = [
    {"point_coords": np.array([[30.0, 20.0]]), "point_labels": np.array([1])},
    {"box": np.array([10.0, 12.0, 70.0, 50.0])},
    {
        "point_coords": np.array([[30.0, 20.0], [60.0, 40.0]]),
        "point_labels": np.array([1, 0]),
        "box": np.array([10.0, 12.0, 70.0, 50.0]),
        "multimask_output": False,
    },
]


def _assert_masks_close(masks, ref_logits):
    """Our masks vs the official logits: the one-step upsampling may flip pixels only where
    the reference is uncertain. Measured with these random-weight models (whose low-res
    logits are rough, the worst case for resampling): 0.5-1.0 % of pixels, all with
    |logit| <= 5 % of the largest |logit|."""
    ref_masks = ref_logits > 0
    assert masks.shape == ref_masks.shape
    wrong = masks != ref_masks
    assert wrong.mean() < 0.015
    if wrong.any():
        assert np.abs(ref_logits[wrong]).max() < 0.08 * np.abs(ref_logits).max()


def test_same_results_as_official_predictor_for_the_same_embedding(sam, official):
    img = _smooth_image(60, 90)
    ref = official.SamPredictor(sam)
    ref.set_image(img)
    ours = SamPredictor(sam)
    ours.set_embedding(Embedding(ref.features, ref.original_size, ref.input_size))
    for kw in PROMPTS:
        l_full, i_ref, l_ref = ref.predict(**kw, return_logits=True)
        m, i, low = ours.predict(**kw)
        _close(low, l_ref)
        _close(i, i_ref)
        _assert_masks_close(m, l_full)
        # mask_input round trip, fed identically to both
        kw2 = {**kw, "mask_input": l_ref[[0]]}
        _close(ours.predict(**kw2)[2], ref.predict(**kw2)[2])


def test_same_masks_as_official_predictor_from_the_image(sam, official):
    """End to end on a uint8 RGB image. Our resize (torch, antialiased) and PIL's differ by
    at most one grey level, so the embeddings differ slightly; the masks are as close as
    with identical embeddings (see _assert_masks_close)."""
    img = _smooth_image(150, 200)
    ref = official.SamPredictor(sam)
    ref.set_image(img)
    ours = SamPredictor(sam)
    ours.set_image(img)
    assert ours.input_size == ref.input_size and ours.original_size == ref.original_size
    assert (ours.features - ref.features).abs().max() < 0.02 * ref.features.abs().max()
    for kw in PROMPTS:
        l_full, i_ref, _ = ref.predict(**kw, return_logits=True)
        m, i, _ = ours.predict(**kw)
        _assert_masks_close(m, l_full)
        np.testing.assert_allclose(i, i_ref, rtol=0.01, atol=0.01)


# ------------------------------------------------------------------ re-associated decoder
def _official_decoder(official):
    torch.manual_seed(0)
    dec = official.modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=official.modeling.TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8
        ),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return _randomize(dec, 7).eval()


@pytest.mark.parametrize("which", ["ours", "official"])
def test_fast_decoder_matches_the_module(sam, official, which):
    dec = sam.mask_decoder if which == "ours" else _official_decoder(official)
    pe = sam.prompt_encoder
    assert _fast_decoder.supports_fast_path(dec)
    gen = torch.Generator().manual_seed(11)
    emb = torch.randn(1, 256, 8, 8, generator=gen)
    with torch.inference_mode():
        image_pe = pe.get_dense_pe()
        _, no_mask = pe(points=None, boxes=None, masks=None)
        # with the decoder: the first block's image projections are precomputed
        preps = [_fast_decoder.prepare(emb, image_pe, no_mask, dec)]
        preps.append(_fast_decoder.prepare(emb, image_pe, no_mask))
        assert preps[0].first_k is not None and preps[1].first_k is None
        pts = (torch.rand(2, 3, 2, generator=gen) * S, torch.tensor([[1, 0, 1], [1, 1, 0]]))
        boxes = torch.tensor([[5.0, 8.0, 90.0, 100.0], [20.0, 30.0, 60.0, 70.0]])
        masks = torch.randn(2, 1, 32, 32, generator=gen)
        cases = [
            {"points": (pts[0][:1, :1], pts[1][:1, :1]), "boxes": None, "masks": None},
            {"points": None, "boxes": boxes[:1], "masks": None},
            {"points": None, "boxes": boxes, "masks": None},
            {"points": pts, "boxes": boxes, "masks": masks},
            {"points": None, "boxes": None, "masks": masks[:1]},
            # 16 points -> heads * tokens >= internal width: falls back to the module
            {
                "points": (torch.rand(1, 16, 2, generator=gen) * S, torch.ones(1, 16)),
                "boxes": None,
                "masks": None,
            },
        ]
        for kw in cases:
            sparse, dense = pe(**kw)
            for multi, prep, ws in itertools.product(
                (True, False), preps, (None, _fast_decoder.Workspace())
            ):
                ref_m, ref_i = dec(emb, image_pe, sparse, dense, multi)
                dense_arg = None if kw["masks"] is None else dense
                m, i = _fast_decoder.decode(dec, prep, sparse, dense_arg, multi, ws=ws)
                assert m.shape == ref_m.shape and i.shape == ref_i.shape
                _close(m, ref_m)
                _close(i, ref_i)
                if ws is not None:  # results never alias the reused scratch buffers
                    kept = m.clone()
                    other = pe(points=None, boxes=boxes[1:] * 0.5, masks=None)[0]
                    _fast_decoder.decode(
                        dec, prep, other.expand(m.shape[0], -1, -1), None, multi, ws=ws
                    )
                    assert torch.equal(m, kept)


def test_fast_decoder_can_be_switched_off(sam):
    img = _smooth_image(40, 40)
    fast, slow = SamPredictor(sam), SamPredictor(sam, fast_decoder=False)
    fast.set_image(img)
    slow.set_embedding(fast.get_embedding())
    a = fast.predict(**POINT, return_logits=True)
    b = slow.predict(**POINT, return_logits=True)
    _close(a[2], b[2])
    _close(a[0], b[0])


def test_input_min_side_keeps_small_slices_at_their_own_scale(sam):
    """A model with ``input_min_side`` (the nsam models) sees a slice between that side and
    its input size at its own pixel size, padded; tinier slices are enlarged only up to
    ``input_min_side``; prompts and masks keep their meaning; larger slices shrink."""
    sam.input_min_side = 64
    try:
        pred = SamPredictor(sam)
        assert pred.transform.min_side == 64
        pred.set_image(_smooth_image(60, 100))
        assert pred.input_size == (60, 100)  # not (77, 128)
        xy = np.array([[50.0, 30.0]])
        np.testing.assert_allclose(pred.transform.apply_coords(xy, (60, 100)), xy)
        masks, _, low = pred.predict(xy, np.array([1]))
        assert masks.shape == (3, 60, 100) and low.shape == (3, 32, 32)
        # the cache key names the geometry: another rule is another input
        plain_key = SamPredictor(build_sam_from_parts(PatchEncoder())).signature(
            _smooth_image(60, 100)
        )
        assert pred.signature(_smooth_image(60, 100)).split("|")[4] == "S128m64"
        assert plain_key.split("|")[4] == "S128"
        pred.set_image(_smooth_image(20, 40))  # tiny: enlarged to the min side only
        assert pred.input_size == (32, 64)
        pred.set_image(_smooth_image(300, 200))  # larger than the input: shrunk as before
        assert pred.input_size == (128, 85)
    finally:
        del sam.input_min_side


# --------------------------------------------------------- test-time augmentation
def _flip_frame(a, fx: bool, fy: bool, extent: tuple[int, int]) -> np.ndarray:
    """Mirror the first ``extent = (rows, cols)`` cells of the last two axes (columns
    0..cols-1 of every row left-right, rows 0..rows-1 up-down; a reference for whole-cell
    extents)."""
    a = np.array(a, copy=True)
    r, c = extent
    if fx:
        a[..., :c] = a[..., :c][..., ::-1]
    if fy:
        a[..., :r, :] = a[..., :r, :][..., ::-1, :]
    return a


def _flip_prompts_np(flip, hw, coords=None, box=None):
    (fx, fy), (h, w) = flip, hw
    out = []
    if coords is not None:
        c = np.array(coords, float)
        if fx:
            c[:, 0] = w - 1 - c[:, 0]
        if fy:
            c[:, 1] = h - 1 - c[:, 1]
        out.append(c)
    if box is not None:
        x0, y0, x1, y1 = box
        if fx:
            x0, x1 = w - 1 - x1, w - 1 - x0
        if fy:
            y0, y1 = h - 1 - y1, h - 1 - y0
        out.append(np.array([x0, y0, x1, y1], float))
    return out


TTA_IMAGE_HW = (96, 128)  # no resizing at S = 128; low-res cells cover 24 x 32 of 32 x 32


@pytest.mark.parametrize("tta", [2, 4])
def test_tta_averages_the_flipped_views(sam, tta):
    """tta=V gives the mean of V plain predictions, each on the flipped slice with flipped
    points, box and mask prompt, its logits flipped back (a reference built from tta=1)."""
    from napari_sam.predictor import TTA_VIEWS

    img = _smooth_image(*TTA_IMAGE_HW)
    img[20:50, 70:110] = 250  # break the symmetry of the smooth pattern
    coords, labels = np.array([[90.0, 30.0], [20.0, 70.0]]), np.array([1, 0])
    box = np.array([60.0, 12.0, 115.0, 58.0])
    aug = SamPredictor(sam, tta=tta, cache_bytes=0)
    aug.set_image(img)
    assert aug.get_embedding().features.shape == (tta, 256, 8, 8)
    _, iou1, low1 = aug.predict(coords, labels, box=box)
    masks2, iou2, low2 = aug.predict(coords, labels, box=box, mask_input=low1[[0]])

    plain = SamPredictor(sam, tta=1, cache_bytes=0)
    extent = (24, 32)
    ref_low1, ref_iou1, ref_low2, ref_iou2 = [], [], [], []
    for flip in TTA_VIEWS[tta]:
        c, b = _flip_prompts_np(flip, TTA_IMAGE_HW, coords, box)
        plain.set_image(
            _flip_frame(img.transpose(2, 0, 1), *flip, TTA_IMAGE_HW).transpose(1, 2, 0)
        )
        _, i1, l1 = plain.predict(c, labels, box=b)
        m_in = _flip_frame(low1[[0]], *flip, extent)
        _, i2, l2 = plain.predict(c, labels, box=b, mask_input=m_in)
        ref_low1.append(_flip_frame(l1, *flip, extent))
        ref_low2.append(_flip_frame(l2, *flip, extent))
        ref_iou1.append(i1)
        ref_iou2.append(i2)
    _close(low1, np.mean(ref_low1, 0), rel=1e-5)
    _close(iou1, np.mean(ref_iou1, 0), rel=1e-5)
    _close(low2, np.mean(ref_low2, 0), rel=1e-5)
    _close(iou2, np.mean(ref_iou2, 0), rel=1e-5)
    np.testing.assert_array_equal(
        masks2, plain.masks_from_logits(low2, original_size=TTA_IMAGE_HW)
    )
    # the views differ (else averaging would be a no-op and this test would prove nothing)
    assert np.abs(ref_low1[0] - ref_low1[1]).max() > 0.1


def test_tta_predictions_are_equivariant_under_the_flips(sam):
    """With all four flips, predicting on a flipped slice with flipped prompts gives the
    flipped low-res logits of the original over the slice (the average runs over a group
    of flips; the padding cells beyond the slice are not mirrored)."""
    img = _smooth_image(*TTA_IMAGE_HW)
    img[10:40, 20:60] = 240
    coords, labels = np.array([[40.0, 25.0]]), np.array([1])
    box = np.array([15.0, 5.0, 70.0, 45.0])
    extent = (24, 32)
    pred = SamPredictor(sam, tta=4, cache_bytes=0)
    pred.set_image(img)
    _, iou, low = pred.predict(coords, labels, box=box)
    for flip in [(True, False), (False, True), (True, True)]:
        c, b = _flip_prompts_np(flip, TTA_IMAGE_HW, coords, box)
        pred.set_image(_flip_frame(img.transpose(2, 0, 1), *flip, TTA_IMAGE_HW).transpose(1, 2, 0))
        _, io, lw = pred.predict(c, labels, box=b)
        _close(_flip_frame(lw, *flip, extent)[:, :24], low[:, :24], rel=1e-5)
        _close(io, iou, rel=1e-5)
    # a plain predictor is not equivariant: the test above can fail
    plain = SamPredictor(sam, tta=1, cache_bytes=0)
    plain.set_image(img)
    low0 = plain.predict(coords, labels, box=box)[2]
    c, b = _flip_prompts_np((True, False), TTA_IMAGE_HW, coords, box)
    plain.set_image(np.ascontiguousarray(img[:, ::-1]))
    low1 = plain.predict(c, labels, box=b)[2]
    assert np.abs(_flip_frame(low1, True, False, extent) - low0)[:, :24].max() > 0.1


def test_flip_of_a_fractional_extent_interpolates():
    from napari_sam.predictor import _flip_axis

    v = torch.arange(5.0)
    np.testing.assert_allclose(_flip_axis(v, 0, 2.5).numpy(), [1.5, 0.5, 0.0, 3.0, 4.0])
    np.testing.assert_allclose(_flip_axis(v, 0, 4).numpy(), [3.0, 2.0, 1.0, 0.0, 4.0])
    t = torch.randn(2, 6, 7)
    torch.testing.assert_close(_flip_axis(_flip_axis(t, 2, 5), 2, 5), t)


def test_tta_settings_cache_and_embeddings(sam):
    img = _smooth_image(45, 64)
    with pytest.raises(ValueError, match="tta must be one of"):
        SamPredictor(sam, tta=3)
    plain, aug = SamPredictor(sam), SamPredictor(sam, tta=4)
    assert plain.tta == 1 and aug.tta == 4
    assert plain.signature(img) != aug.signature(img)  # other features: other cache entry
    aug.set_image(img)
    emb = aug.get_embedding()
    assert emb.features.shape == (4, 256, 8, 8) and emb.nbytes == 4 * 256 * 64 * 4
    assert aug.encoder_runs == 1
    torch.testing.assert_close(emb.features[:1], (plain.set_image(img), plain.features)[1])
    with pytest.raises(ValueError, match="1 test-time view.*uses 4"):
        aug.set_embedding(plain.get_embedding())
    # fewer views than stored: the first ones serve (view 0 is the slice itself)
    plain2 = SamPredictor(sam, tta=1)
    plain2.set_embedding(emb)
    assert plain2.features.shape[0] == 1
    for u, v in zip(plain2.predict(**POINT), plain.predict(**POINT), strict=True):
        np.testing.assert_array_equal(u, v)
    two = SamPredictor(sam, tta=2)
    two.set_embedding(emb)
    ref2 = SamPredictor(sam, tta=2)
    ref2.set_image(img)
    for u, v in zip(two.predict(**POINT), ref2.predict(**POINT), strict=True):
        np.testing.assert_array_equal(u, v)
    two.tta = 4  # another setting: the slice must be set again
    assert not two.is_image_set
    with pytest.raises(ValueError, match="tta must be one of"):
        two.tta = 8
    other = SamPredictor(sam, tta=4)
    other.set_embedding(emb)
    for u, v in zip(aug.predict(**POINT), other.predict(**POINT), strict=True):
        np.testing.assert_array_equal(u, v)
    # odd sizes: low-res extents of 18.75 x 25.25 cells are flipped by interpolation
    aug.set_image(_smooth_image(75, 101))
    m, _, low = aug.predict(box=np.array([10.0, 10.0, 60.0, 50.0]), multimask_output=False)
    assert m.shape == (1, 75, 101) and np.isfinite(low).all()

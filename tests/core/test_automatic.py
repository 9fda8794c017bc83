"""Automatic segmentation pipeline.

Mechanics run on tiny random-init models: the project's SamPredictor (gray images), and
the official segment-anything predictor as a reference for the mask geometry. Quality (F1
on synthetic scenes) needs the project's trained default model and is skipped until
``napari_sam.load_model()`` provides it."""

import numpy as np
import pytest

from napari_sam._point_decoder import PointDecoder
from napari_sam._sample_data import _blobs
from napari_sam.automatic import (
    AutomaticParams,
    Cancelled,
    generate_masks,
    segment_slice,
    segment_volume,
)
from napari_sam.stitching import StitchParams

from ._automatic_models import nsam_predictor, project_predictor, tiny_official_sam

# accept every candidate: random weights give meaningless scores
PERMISSIVE = {
    "pred_iou_thresh": -1e9,
    "stability_score_thresh": 0.0,
    "min_region_area": 0,
    "min_object_area": 0,
    "max_area_fraction": 1.0,
    "precision": "float32",
}


def _rgb(img):
    """The official predictor takes uint8 RGB."""
    return np.repeat((img / img.max() * 255).astype(np.uint8)[..., None], 3, -1)


@pytest.fixture(scope="module")
def predictor():
    return project_predictor()


@pytest.fixture(scope="module")
def scene():
    img, gt = _blobs((150, 100), 6, seed=3, radius=(8, 16))
    return img, gt


def test_kept_masks_equal_official_full_resolution_masks(scene):
    """Masks upsampled window by window equal SAM's own postprocessing of the same prompt
    (official segment-anything predictor, non-square image: resize, crop, resize)."""
    sam, sa = tiny_official_sam(img_size=256, dim=32)
    predictor = sa.SamPredictor(sam)
    img = _rgb(scene[0])
    p = AutomaticParams(
        points_per_side=3, nms_iou_thresh=1.0, skip_covered_points=False, **PERMISSIVE
    )
    records = generate_masks(predictor, img, p)
    assert len(records) > 4
    for r in records[:5]:
        masks, scores, _ = predictor.predict(np.array([r.point]), np.array([1]))
        k = int(np.argmin(np.abs(scores - r.score)))
        assert abs(scores[k] - r.score) < 1e-4
        full = r.full(img.shape[:2])
        assert (full != masks[k]).mean() < 1e-3
        assert r.box == _box(masks[k]) or (full != masks[k]).any()


def _box(m):
    ys, xs = np.nonzero(m)
    return (xs.min(), ys.min(), xs.max(), ys.max())


def test_label_image_properties(predictor, scene):
    img, _ = scene
    calls = []
    p = AutomaticParams(points_per_side=8, points_per_batch=16, **PERMISSIVE)
    lab = segment_slice(predictor, img, p, progress=lambda d, t: calls.append((d, t)))
    assert lab.shape == img.shape[:2] and lab.dtype == np.int32
    ids = np.unique(lab)
    assert ids[0] == 0 and (ids[1:] == np.arange(1, len(ids))).all()
    # first pixels of the objects come in raster order
    first = [np.flatnonzero(lab.ravel() == i)[0] for i in ids[1:]]
    assert first == sorted(first)
    assert calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)
    # deterministic
    assert (segment_slice(predictor, img, p) == lab).all()


def test_nsam_model_runs(scene):
    """The project's nsam layout (rendered prompts, 8x-downsampling encoder) goes through."""
    img, _ = scene
    lab = segment_slice(nsam_predictor(), img, AutomaticParams(points_per_side=4, **PERMISSIVE))
    assert lab.shape == img.shape and lab.max() > 0


def test_cancel(predictor, scene):
    img, _ = scene
    with pytest.raises(Cancelled):
        segment_slice(
            predictor,
            img,
            AutomaticParams(points_per_side=8, points_per_batch=8),
            should_cancel=lambda: True,
        )


class _CountingDecoder(PointDecoder):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.points = 0

    def decode(self, points, min_iou=None):
        self.points += len(points)
        return super().decode(points, min_iou)


def test_skip_covered_points_prompts_fewer_points(predictor, scene):
    img, _ = scene
    sam = predictor.model
    counts = {}
    for skip in (False, True):
        dec = _CountingDecoder(sam, precision="float32")
        p = AutomaticParams(points_per_side=12, skip_covered_points=skip, **PERMISSIVE)
        records = generate_masks(predictor, img, p, _decoder=dec)
        counts[skip] = (dec.points, len(records))
    assert counts[False][0] == 144
    assert 9 <= counts[True][0] < 144  # the 3 x 3 coarse level always runs
    assert counts[True][1] > 0


def test_crop_layers_run(predictor, scene):
    img, _ = scene
    p = AutomaticParams(points_per_side=4, crop_n_layers=1, **PERMISSIVE)
    records = generate_masks(predictor, img, p)
    assert {r.layer for r in records} <= {0, 1}
    assert all(r.mask.any() for r in records)
    # the predictor is left on the full image
    assert predictor.get_embedding().original_size == img.shape[:2]


def test_crop_layers_restore_official_predictor(scene):
    sam, sa = tiny_official_sam(img_size=128, dim=32)
    predictor = sa.SamPredictor(sam)
    img = _rgb(scene[0])
    generate_masks(predictor, img, AutomaticParams(points_per_side=2, crop_n_layers=1))
    assert tuple(predictor.original_size) == img.shape[:2]


def test_volume_with_embedding_callable_matches_image_path(predictor):
    vol_img, _ = _blobs((3, 64, 64), 3, seed=5, radius=(8, 14))
    vol = np.stack([_rgb(s) for s in vol_img])  # (Z, H, W, 3) for the official predictor
    p = AutomaticParams(points_per_side=4, **PERMISSIVE)
    st = StitchParams(min_z_extent=1)
    embs = []
    for s in vol:
        predictor.set_image(s)
        embs.append(
            {
                "features": predictor.features.clone(),
                "input_size": predictor.input_size,
                "original_size": predictor.original_size,
            }
        )
    a = segment_volume(_Stack(vol), predictor, p, stitch=st)
    b = segment_volume(_Stack(vol), predictor, p, stitch=st, embeddings=lambda z: embs[z])
    assert a.shape == (3, 64, 64) and a.dtype == np.int32 and a.max() > 0
    assert (a == b).all()


class _Stack:
    """An RGB stack presented as (Z, H, W) (what segment_volume expects of gray data)."""

    def __init__(self, rgb):
        self.rgb = rgb
        self.shape = rgb.shape[:3]

    def __getitem__(self, z):
        return self.rgb[z]


def test_volume_from_embedding_store(predictor):
    """The volume helper's EmbeddingStore plugs in as the embeddings callable."""
    from napari_sam.embeddings import EmbeddingStore

    vol, _ = _blobs((3, 64, 64), 3, seed=6, radius=(8, 14))
    p = AutomaticParams(points_per_side=4, **PERMISSIVE)
    st = StitchParams(min_z_extent=1)
    store = EmbeddingStore(vol, predictor, dtype="float32")
    a = segment_volume(vol, predictor, p, stitch=st, embeddings=store.get)
    b = segment_volume(vol, predictor, p, stitch=st)
    assert a.max() > 0 and (a == b).all()


def test_bad_input_errors(predictor, scene):
    img, _ = scene
    with pytest.raises(ValueError, match="segment_volume"):
        segment_slice(predictor, np.zeros((4, 32, 32)))
    with pytest.raises(ValueError, match="points_per_side"):
        AutomaticParams(points_per_side=0)
    with pytest.raises(ValueError, match="max_area_fraction"):
        AutomaticParams(max_area_fraction=0)
    with pytest.raises(RuntimeError, match="set_image"):
        segment_slice(project_predictor())
    predictor.set_image(img)
    with pytest.raises(ValueError, match="crop layers need the image"):
        generate_masks(predictor, None, AutomaticParams(crop_n_layers=1))
    with pytest.raises(ValueError, match=r"\(Z, H, W\)"):
        segment_volume(np.zeros((32, 32)), predictor)
    with pytest.raises(TypeError, match="SamPredictor"):
        segment_slice(object(), img)


# -- quality with the default model ----------------------------------------------------------


def _default_predictor():
    import napari_sam
    from napari_sam.model.small_encoder import default_weights

    if not default_weights().is_file():
        pytest.skip("no default model is bundled")
    return napari_sam.SamPredictor(napari_sam.load_model())


def _single_point_miou(predictor, img, gt, n=20) -> float:
    """Mean IoU of the model's best-of-3 mask (by predicted IoU) for one click at the
    innermost pixel of each of ``n`` objects - what automatic segmentation builds on."""
    from scipy import ndimage

    ious = []
    predictor.set_image(img)
    for i in np.unique(gt)[1 : n + 1]:
        obj = gt == i
        dist = ndimage.distance_transform_edt(np.pad(obj, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(np.argmax(dist), dist.shape)
        masks, scores, _ = predictor.predict(np.array([[c, r]]), np.array([1]))
        m = masks[int(np.argmax(scores))]
        ious.append((m & obj).sum() / (m | obj).sum())
    return float(np.mean(ious))


def test_instance_f1_on_synthetic_scenes_with_default_model():
    """Synthetic nuclei scenes (napari_sam.train.synthetic) with known instances.

    Automatic segmentation keeps only masks the model itself rates well, so its F1 is
    bounded by the model's single-click quality: below 0.6 mIoU the test measures the model,
    not this pipeline, and is skipped with the numbers.
    """
    from napari_sam.instance_metrics import instance_scores
    from napari_sam.train.synthetic import make_image

    predictor = _default_predictor()
    # held-out seeds (training draws seeds below 1,000,000; calibration uses 3,200,000+)
    scenes = [make_image(3_400_000 + s, shape=(256, 256), kind="nuclei") for s in range(2)]
    miou = _single_point_miou(predictor, *scenes[0])
    if miou < 0.6:
        pytest.skip(
            f"default model too weak for automatic segmentation: single-click mIoU "
            f"{miou:.2f} < 0.6 on a synthetic scene (the F1 would measure the model)"
        )
    f1 = []
    for img, gt in scenes:
        lab = segment_slice(predictor, img)  # the model's recommended thresholds
        f1.append(instance_scores(gt, lab)["f1"])
    # measured with the session-3 default model and its thresholds (0.45 / 0.75): 0.67, 0.65
    assert np.mean(f1) > 0.5, f1


def test_imports_are_light():
    """torch loads only when segmentation runs (the widget module is a manifest python_name)."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, napari_sam.automatic, napari_sam.stitching, napari_sam.amg_ops,"
        " napari_sam.instance_metrics, napari_sam._cli_segment_all,"
        " napari_sam._qt.automatic_widget;"
        "print(','.join(m for m in ('torch', 'napari') if m in sys.modules))"
    )
    src = str(Path(__file__).parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src},
    )
    assert out.stdout.strip() == ""


def test_params_for_model_take_the_models_recommended_thresholds(predictor, scene):
    model = predictor.model
    assert AutomaticParams.for_model(model) == AutomaticParams()  # no recommendation: SAM's
    model.automatic_defaults = {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.7}
    try:
        p = AutomaticParams.for_model(predictor, points_per_side=8)  # a predictor works too
        assert (p.pred_iou_thresh, p.stability_score_thresh, p.points_per_side) == (0.4, 0.7, 8)
        assert AutomaticParams.for_model(model, pred_iou_thresh=0.9).pred_iou_thresh == 0.9
        # segment_slice without params uses them (random weights: SAM's thresholds keep
        # nothing, the permissive ones keep masks)
        img = scene[0]
        assert not segment_slice(predictor, img, AutomaticParams(points_per_side=4)).any()
        loose = dict(PERMISSIVE)
        model.automatic_defaults = {**loose, "points_per_side": 4, "unknown": 1}
        lab = segment_slice(predictor, img)
        assert lab.any()
        expected = segment_slice(predictor, img, AutomaticParams(points_per_side=4, **loose))
        np.testing.assert_array_equal(lab, expected)
    finally:
        del model.automatic_defaults

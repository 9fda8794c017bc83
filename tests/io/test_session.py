"""Sessions: JSON round trip, versioning, saving beside the labels, and replay."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_sam.io.labels_zarr import write_labels_zarr, write_ome_zarr_labels
from napari_sam.io.session import (
    FORMAT_VERSION,
    ObjectRecord,
    PromptRecord,
    SessionRecord,
    load_session,
    replay,
    save_session,
    session_path,
)
from napari_sam.io.tiff import write_labels_tiff


class FloodPredictor:
    """A deterministic predictor following the contract in docs/architecture.md.

    The object under a positive point is its connected bright component (the image is
    thresholded at its mean); negative points remove their component; a box keeps what
    lies inside it (or, alone, all bright pixels inside it). Three candidates: the mask,
    the mask dilated by one pixel (highest predicted IoU), the mask eroded. ``mask_input``
    (previous logits > 0) is added to the mask. Points are (x, y), boxes XYXY.
    """

    def __init__(self):
        self.calls = []
        self.n_set_image = 0

    def set_image(self, image):
        img = np.asarray(image, dtype=float)
        if img.ndim == 3:
            img = img.mean(-1)
        self.comp, _ = ndimage.label(img > img.mean())
        self.n_set_image += 1

    def predict(
        self,
        point_coords=None,
        point_labels=None,
        box=None,
        mask_input=None,
        multimask_output=True,
        return_logits=False,
        clicked_parts_only=False,  # its masks are whole components already
    ):
        self.calls.append((point_coords, point_labels, box, mask_input is not None))
        h, w = self.comp.shape
        mask = np.zeros((h, w), bool)
        if point_coords is not None:
            for (x, y), lab in zip(point_coords, point_labels, strict=True):
                cid = self.comp[int(round(y)), int(round(x))]
                if cid:
                    mask[self.comp == cid] = bool(lab)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            inside = np.zeros((h, w), bool)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            mask = mask & inside if point_coords is not None else (self.comp > 0) & inside
        if mask_input is not None:
            mask |= np.asarray(mask_input)[0] > 0
        cands = [mask, ndimage.binary_dilation(mask), ndimage.binary_erosion(mask)]
        iou = np.array([0.5, 0.9, 0.7])
        if not multimask_output:
            cands, iou = cands[:1], iou[:1]
        masks = np.stack(cands)
        return masks, iou, masks.astype(np.float32) * 2 - 1


def _blobs_image(shape=(40, 60)):
    img = np.zeros(shape, np.float32)
    img[5:15, 5:20] = 1  # blob A
    img[20:35, 30:50] = 1  # blob B
    img[25:30, 5:10] = 1  # blob C
    return img


def _session_2d():
    return SessionRecord(
        image_name="blobs",
        image_shape=(40, 60),
        model="vit_t",
        objects=[
            ObjectRecord(1, [PromptRecord(points=[(10, 10)], point_labels=[1], candidate=0)]),
            ObjectRecord(2, [PromptRecord(box=(18, 28, 36, 52))], contrast={"mode": "percentile"}),
            ObjectRecord(
                3,
                [
                    PromptRecord(points=[(27, 7)], point_labels=[1], candidate=0),
                    PromptRecord(
                        points=[(10, 10)], point_labels=[1], candidate=0, use_previous_mask=True
                    ),
                ],
            ),
        ],
    )


def test_json_round_trip(tmp_path):
    s = _session_2d()
    s.objects[0].prompts[0].slice_index = None
    again = SessionRecord.from_json(s.to_json())
    assert again == s
    p = save_session(s, tmp_path / "s.json")
    assert load_session(p) == s
    with pytest.raises(FileExistsError):
        save_session(s, p)


def test_versioning_and_bad_files(tmp_path):
    d = _session_2d().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="newer napari-sam"):
        SessionRecord.from_dict(d)
    with pytest.raises(ValueError, match="not a napari-sam session"):
        SessionRecord.from_dict({"objects": []})
    with pytest.raises(ValueError, match="not valid JSON"):
        SessionRecord.from_json('{"kind": "napari-sam-sess')
    d = _session_2d().to_dict()
    d["objects"][0]["prompts"][0]["point_labels"] = [1, 0]
    with pytest.raises(ValueError, match="1 points but 2 point labels"):
        SessionRecord.from_dict(d)
    d = _session_2d().to_dict()
    d["some_future_field"] = 5  # unknown keys are kept, not fatal
    assert SessionRecord.from_dict(d).extra["unknown:some_future_field"] == 5
    with pytest.raises(ValueError, match="at least one point or a box"):
        PromptRecord()
    with pytest.raises(ValueError, match="0 is background"):
        ObjectRecord(0)


def test_saved_beside_each_label_format(tmp_path):
    s = _session_2d()
    lab = np.zeros((40, 60), np.uint8)
    ome = write_ome_zarr_labels(tmp_path / "a.ome.zarr", lab, session=s)
    assert (ome / "napari_sam_session.json").exists() and load_session(ome) == s
    img = write_ome_zarr_labels(tmp_path / "b.ome.zarr", lab, image=lab, name="cells", session=s)
    assert session_path(img) == img / "labels" / "cells" / "napari_sam_session.json"
    assert load_session(img) == s
    plain = write_labels_zarr(tmp_path / "c.zarr", lab, session=s)
    assert load_session(plain) == s
    tif = write_labels_tiff(tmp_path / "d.tif", lab, session=s)
    assert session_path(tif).name == "d.tif.session.json" and load_session(tif) == s
    with pytest.raises(FileExistsError):  # the sidecar counts as part of the destination
        (tmp_path / "e.tif.session.json").write_text("{}")
        write_labels_tiff(tmp_path / "e.tif", lab, session=s)
    assert not (tmp_path / "e.tif").exists()


def test_replay_2d_with_contract_predictor():
    img = _blobs_image()
    pred = FloodPredictor()
    labels = replay(_session_2d(), pred, img)
    comp, _ = ndimage.label(img > img.mean())
    expected = np.zeros(img.shape, np.uint8)
    expected[comp == comp[10, 10]] = 1
    # object 2: box -> candidate None -> highest IoU (the dilated mask), clipped by nothing
    box_mask = np.zeros(img.shape, bool)
    box_mask[18:37, 28:53] = True
    expected[ndimage.binary_dilation((comp > 0) & box_mask)] = 2
    # object 3: blob C, then refined with blob A + previous mask -> A and C, painted last
    expected[(comp == comp[27, 7]) | (comp == comp[10, 10])] = 3
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.uint8
    assert pred.n_set_image == 1  # one embedding for the whole 2D session
    # napari (row, col) reached the predictor as (x, y); the box as XYXY
    np.testing.assert_array_equal(pred.calls[0][0], [[10.0, 10.0]])
    np.testing.assert_array_equal(pred.calls[1][2], [28.0, 18.0, 52.0, 36.0])
    assert pred.calls[3][3]  # the refinement passed mask_input


def test_replay_paint_keep():
    s = _session_2d()
    s.paint = "keep"
    labels = replay(s, FloodPredictor(), _blobs_image())
    assert labels[10, 10] == 1 and labels[27, 7] == 3  # object 3 did not take object 1


def test_replay_3d_slices_and_axes():
    vol = np.stack([_blobs_image(), np.roll(_blobs_image(), 3, axis=1), _blobs_image()])
    s = SessionRecord(
        objects=[
            ObjectRecord(
                5,
                [
                    PromptRecord(points=[(10, 10)], point_labels=[1], slice_index=0, candidate=0),
                    PromptRecord(points=[(10, 13)], point_labels=[1], slice_index=1, candidate=0),
                ],
            ),
            ObjectRecord(
                300, [PromptRecord(points=[(27, 7)], point_labels=[1], slice_index=2, candidate=0)]
            ),
        ]
    )
    pred = FloodPredictor()
    labels = replay(s, pred, vol)
    assert labels.dtype == np.uint16 and labels.shape == vol.shape
    for z, (r, c), oid in [(0, (10, 10), 5), (1, (10, 13), 5), (2, (27, 7), 300)]:
        comp, _ = ndimage.label(vol[z] > vol[z].mean())
        np.testing.assert_array_equal(labels[z] == oid, comp == comp[r, c])
    assert (labels[2] == 5).sum() == 0 and pred.n_set_image == 3
    # a prompt on axis 1 (a y-slice of the volume): the (row, col) are then (z, x)
    s2 = SessionRecord(
        objects=[
            ObjectRecord(
                1, [PromptRecord(points=[(1, 10)], point_labels=[1], slice_index=10, axis=1)]
            )
        ]
    )
    lab2 = replay(s2, FloodPredictor(), vol)
    assert lab2[1, 10, 10] == 1 and lab2[:, :9].max() == 0


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        (PromptRecord(points=[(45, 10)], point_labels=[1]), "outside the image"),
        (PromptRecord(points=[(-1, 10)], point_labels=[1]), "outside the image"),
        (PromptRecord(box=(5, 5, 5, 20)), "zero area"),
        (PromptRecord(points=[(5, 5)], point_labels=[1], slice_index=2), "image is 2D"),
    ],
)
def test_replay_bad_prompts(prompt, message):
    s = SessionRecord(objects=[ObjectRecord(1, [prompt])])
    with pytest.raises(ValueError, match=message):
        replay(s, FloodPredictor(), _blobs_image())


def test_replay_refuses_other_model_or_image():
    s = _session_2d()
    with pytest.raises(ValueError, match="made with model 'vit_t'"):
        replay(s, FloodPredictor(), _blobs_image(), model="vit_b")
    with pytest.raises(ValueError, match="belongs to another image"):
        replay(s, FloodPredictor(), np.zeros((30, 60), np.float32))
    s3 = SessionRecord(
        objects=[ObjectRecord(1, [PromptRecord(points=[(1, 1)], point_labels=[1])])]
    )
    with pytest.raises(ValueError, match="every prompt needs a slice_index"):
        replay(s3, FloodPredictor(), np.zeros((3, 30, 60), np.float32))


def _official_tiny_predictor():
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from reference.official import import_official, official_available

    if not official_available():
        pytest.skip("segment-anything not installed")
    torch = pytest.importorskip("torch")
    sa = import_official()
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    torch.manual_seed(0)
    dim, img_size = 32, 64
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=1,
            embed_dim=dim,
            img_size=img_size,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(0,),
            window_size=0,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img_size // 16, img_size // 16),
            input_image_size=(img_size, img_size),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=2),
            transformer_dim=dim,
            iou_head_depth=2,
            iou_head_hidden_dim=32,
        ),
    ).eval()
    return sa.SamPredictor(sam)


def test_replay_reproduces_official_sam_objects():
    """Record objects the way an annotator does (predict, choose, paint), then replay the
    session with the same model: identical labels."""
    pred = _official_tiny_predictor()
    rng = np.random.default_rng(0)
    image = (rng.random((48, 64, 3)) * 255).astype(np.uint8)
    session = SessionRecord(image_shape=(48, 64), model="tiny-test")
    labels = np.zeros((48, 64), np.uint8)
    pred.set_image(image)
    prompts = [
        (1, PromptRecord(points=[(10, 12)], point_labels=[1], candidate=2)),
        (2, PromptRecord(points=[(30, 40), (5, 5)], point_labels=[1, 0], candidate=None)),
        (3, PromptRecord(box=(20, 10, 40, 30), candidate=1)),
        (4, PromptRecord(points=[(24, 50)], point_labels=[1], multimask=False)),
    ]
    for oid, p in prompts:
        kw = {"multimask_output": p.multimask}
        if p.points:
            kw["point_coords"] = np.array(p.points)[:, ::-1]
            kw["point_labels"] = np.array(p.point_labels)
        if p.box is not None:
            r0, c0, r1, c1 = p.box
            kw["box"] = np.array([c0, r0, c1, r1])
        masks, iou, _ = pred.predict(**kw)
        c = p.candidate if p.candidate is not None else int(np.argmax(iou))
        labels[masks[c]] = oid
        session.add(ObjectRecord(oid, [p], model="tiny-test"))
    assert len(np.unique(labels)) > 2  # the random model does produce objects
    again = replay(SessionRecord.from_json(session.to_json()), pred, image, model="tiny-test")
    np.testing.assert_array_equal(again, labels)


def test_session_file_is_plain_json(tmp_path):
    p = save_session(_session_2d(), tmp_path / "s.json")
    d = json.loads(p.read_text())
    assert d["kind"] == "napari-sam-session" and d["format_version"] == FORMAT_VERSION
    assert d["objects"][0]["prompts"][0]["points"] == [[10.0, 10.0]]


def test_replay_with_the_project_predictor_on_a_gray_volume():
    """The project's own SamPredictor (tiny random model) on a 3D gray stack: recorded
    objects come back identical from the saved session."""
    pytest.importorskip("torch")
    build = pytest.importorskip("napari_sam.model.build")
    predictor_mod = pytest.importorskip("napari_sam.predictor")
    import torch

    if "test_vit" not in build.CONFIGS:
        pytest.skip("no small test config")
    torch.manual_seed(0)
    pred = predictor_mod.SamPredictor(build.build_sam("test_vit"))
    rng = np.random.default_rng(1)
    vol = rng.normal(100, 20, (3, 40, 56)).astype(np.float32)
    session = SessionRecord(image_shape=vol.shape)
    labels = np.zeros(vol.shape, np.uint8)
    for oid, (z, pt) in enumerate([(0, (10, 12)), (2, (30, 40)), (2, (5, 50))], start=1):
        p = PromptRecord(points=[pt], point_labels=[1], slice_index=z)
        pred.set_image(vol[z])
        masks, iou, _ = pred.predict(
            point_coords=np.array([pt[::-1]], float), point_labels=np.array([1])
        )
        labels[z][masks[int(np.argmax(iou))]] = oid
        session.add(ObjectRecord(oid, [p]))
    assert len(np.unique(labels)) > 1
    np.testing.assert_array_equal(
        replay(SessionRecord.from_json(session.to_json()), pred, vol), labels
    )

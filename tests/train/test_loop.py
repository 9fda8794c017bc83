"""Training loop: a short run on a tiny model learns; resume reproduces the exact state."""

import json

import numpy as np
import pytest
import torch

from napari_sam.train import loop as L

TINY = {
    "img_size": 64,
    "widths": [8, 12, 16, 24, 32],
    "depths": [0, 1, 1, 0, 0],
    "embed_dim": 64,
    "mask_in_chans": 8,
    "decoder_depth": 1,
    "decoder_num_heads": 4,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 32,
}


def _cfg(tmp_path, **kw):
    base = {
        "out_dir": str(tmp_path / "run"),
        "model": TINY,
        "canvas": 64,
        "images_per_step": 2,
        "objects_per_image": 4,
        "max_rounds": 1,
        "scale_range": (0.3, 0.7),
        "kind": "nuclei",
        "threads": 1,
        "ckpt_every": 2,
        "eval_every": 0,
        "eval_images": 6,
        "eval_clicks": 1,
        "warmup": 5,
        "lr": 3e-3,
    }
    base.update(kw)
    return L.TrainConfig(**base)


def test_short_training_improves_held_out_iou(tmp_path):
    # first prompts only (no correction rounds): enough to learn box/point following
    cfg = _cfg(tmp_path, steps=60, max_rounds=0, box_prob=0.7)
    held_out = L.eval_set(cfg)
    before = L.evaluate(L.build_model(cfg), held_out, n_clicks=1)
    events = []
    model, _ = L.train(cfg, callback=events.append, eval_samples=held_out)
    after = L.evaluate(model, held_out, n_clicks=1)
    assert after["objects"] == before["objects"] > 10
    # measured: box 0.04 -> 0.51, point 0.04 -> 0.31
    assert after["box"] > before["box"] + 0.25, (before, after)
    assert after["point"] > before["point"] + 0.1, (before, after)
    steps = [e for e in events if e["kind"] == "step"]
    assert len(steps) == 60 and events[-1]["kind"] == "done"
    assert np.mean([e["loss"] for e in steps[-10:]]) < np.mean([e["loss"] for e in steps[:10]])


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_gives_identical_state(tmp_path):
    straight = _cfg(tmp_path / "a", steps=4)
    L.train(straight)
    # same run, interrupted after 2 steps and resumed
    interrupted = _cfg(tmp_path / "b", steps=4)
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    _, _ = L.train(interrupted, should_stop=stop_after_two)
    mid = _state(tmp_path / "b" / "run" / "last.pt")
    assert mid["step"] == 2
    L.train(interrupted)
    a = _state(tmp_path / "a" / "run" / "last.pt")
    b = _state(tmp_path / "b" / "run" / "last.pt")
    assert a["step"] == b["step"] == 4
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa[k][name]), torch.as_tensor(sb[k][name]))
    assert a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the log has every step exactly once across the two sessions
    lines = (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["kind"] == "step"]
    assert steps == [1, 2, 3, 4]


def test_export_weights_roundtrip(tmp_path):
    from napari_sam.model.small_encoder import build_nsam

    cfg = _cfg(tmp_path)
    model = L.build_model(cfg)
    info = L.export_weights(model, tmp_path / "w.pt", {"box": 0.5})
    assert info["dtype"] == "float16" and info["config"]["embed_dim"] == 64
    sidecar = json.loads((tmp_path / "w.json").read_text())
    assert sidecar["sha256"] == info["sha256"]
    again = build_nsam(sidecar["config"], checkpoint=tmp_path / "w.pt")
    for (k, v), v2 in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        if v.is_floating_point():
            torch.testing.assert_close(v2, v.half().float(), msg=k)


def test_normalize_and_to_canvas():
    img = np.arange(100 * 50, dtype=np.uint16).reshape(100, 50)
    lab = np.zeros((100, 50), np.int32)
    lab[10:30, 10:20] = 1
    s = L.to_canvas(img, lab, 64)
    assert s.image.shape == (3, 64, 64)
    assert len(s.masks) == 1 and s.masks[0].shape == (64, 64)
    assert not s.masks[0][:, 33:].any()  # right padding (100 x 50 -> 64 x 32)
    assert np.all(s.image[:, :, 33:] == 0)
    with pytest.raises(ValueError, match="differ in size"):
        L.to_canvas(img, lab[:50], 64)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        L.normalize_image(np.zeros((2, 3, 4, 5)))


def test_early_stop_when_the_score_stops_improving(tmp_path):
    # lr = 0: the score never changes, so after the first evaluation nothing improves
    cfg = _cfg(tmp_path, steps=10, lr=0.0, eval_every=1, eval_images=2, patience=2)
    events = []
    L.train(cfg, callback=events.append)
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["best"] for e in evals] == [True, False, False]
    assert events[-1] == {**events[-1], "kind": "done", "step": 3, "reason": "early_stop"}
    assert (tmp_path / "run" / "best.pt").exists()


def _interrupted_run_matches(tmp_path, opts: dict, stop_after: int):
    """Train ``opts`` once straight through and once stopped after ``stop_after`` steps
    and resumed; assert identical weights; return the interrupted run's first model."""
    L.train(_cfg(tmp_path / "a", **opts))
    cfg = _cfg(tmp_path / "b", **opts)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > stop_after

    model, _ = L.train(cfg, should_stop=stop)
    L.train(cfg)
    a = _state(tmp_path / "a" / "run" / "last.pt")
    b = _state(tmp_path / "b" / "run" / "last.pt")
    assert a["step"] == b["step"] == opts["steps"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    return model


def test_resume_is_identical_with_the_session3_options(tmp_path):
    """pe_reference, mask-only first prompts and resampled images draw from the same
    seeded generator: an interrupted run still reproduces the uninterrupted one."""
    opts = {
        "steps": 4,
        "pe_reference": 128,
        "mask_prompt_prob": 0.5,
        "resample_range": (0.8, 2.0),
        "max_rounds": 1,
    }
    model = _interrupted_run_matches(tmp_path, opts, stop_after=1)
    # the positional-encoding frame is restored for inference after training
    assert model.prompt_encoder.pe_layer.frame_span == 1.0
    assert model.prompt_encoder.pe_layer.frame_offset == (0.0, 0.0)


def test_volume_samples_prompt_with_the_neighbouring_slices_masks(tmp_path):
    cfg = _cfg(tmp_path, volume_prob=1.0, volume_depth=8, volume_kinds=("nuclei", "dense"))
    src = L.SyntheticSource(cfg)
    rng = np.random.default_rng(0)
    empty = changed = total = 0
    for _ in range(12):
        s = src.sample(rng)
        assert s.image.shape == (3, 64, 64)
        assert s.prompts is not None and len(s.prompts) == len(s.masks) > 0
        for p, m in zip(s.prompts, s.masks, strict=True):
            assert p.shape == m.shape == (64, 64) and p.sum() >= 20
            # the same object on the next slice overlaps its prompt, or has ended
            assert not m.any() or (p & m).any()
            empty += not m.any()
            changed += not np.array_equal(p, m)
            total += 1
    assert 0 < empty < total and changed > total // 2


def test_volume_end_share_raises_the_share_of_ended_objects(tmp_path):
    def ended_share(**kw):
        cfg = _cfg(tmp_path, canvas=128, volume_prob=1.0, volume_kinds=("dense",), **kw)
        src, rng = L.SyntheticSource(cfg), np.random.default_rng(1)
        flags = [not m.any() for _ in range(10) for m in src.sample(rng).masks]
        return np.mean(flags)

    natural, raised = ended_share(), ended_share(volume_end_share=0.4)
    assert natural < 0.15 and 0.25 < raised < 0.6, (natural, raised)


def test_training_with_volume_samples_resumes_identically(tmp_path):
    opts = {
        "steps": 4,
        "volume_prob": 0.5,
        "volume_depth": 8,
        "volume_end_share": 0.3,
        "max_rounds": 1,
    }
    _interrupted_run_matches(tmp_path, opts, stop_after=2)


def test_mask_prompt_metric_and_score(tmp_path):
    cfg = _cfg(tmp_path, eval_images=3)
    model = L.build_model(cfg)
    m = L.evaluate(model, L.eval_set(cfg), n_clicks=1, mask_prompt=True)
    assert 0.0 <= m["mask"] <= 1.0
    assert L.score(m) == pytest.approx((m["box"] + m["point"] + m["mask"]) / 3)
    plain = L.evaluate(model, L.eval_set(cfg), n_clicks=1)
    assert "mask" not in plain
    assert L.score(plain) == pytest.approx((plain["box"] + plain["point"]) / 2)


def test_mask_prompt_logits_follow_the_perturbed_mask():
    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    logits = L._mask_prompt(mask, rng, 32, torch)
    assert logits.shape == (1, 32, 32)
    assert float(logits.max()) == 8.0 and float(logits.min()) == -8.0
    inside = logits[0] > 0
    # the object's centre stays inside, far corners stay outside
    assert inside[15, 10] and not inside[0, 0] and not inside[31, 31]


def test_resampled_images_keep_object_size_in_canvas_pixels():
    """resample_range draws the image smaller (or larger) and to_canvas resizes it back:
    the median object area in canvas pixels stays in the same range."""

    def median_area(rr):
        cfg = L.TrainConfig(canvas=96, kind="nuclei", scale_range=(1.0, 1.0), resample_range=rr)
        src = L.SyntheticSource(cfg)
        rng = np.random.default_rng(5)
        areas = [m.sum() for _ in range(6) for m in src.sample(rng).masks]
        return float(np.median(areas))

    plain, resampled = median_area((1.0, 1.0)), median_area((2.0, 2.0))
    assert 0.5 < resampled / plain < 2.0, (plain, resampled)


def test_pick_objects_favours_large_objects_with_size_power():
    masks = [np.zeros((10, 10), bool) for _ in range(10)]
    for i, m in enumerate(masks):
        m.flat[: (i + 1) ** 2 // 2 + 1] = True  # areas 1 .. 51
    areas = np.array([m.sum() for m in masks])

    def mean_area(power):
        rng = np.random.default_rng(0)
        picks = [L.pick_objects(masks, 3, rng, power) for _ in range(400)]
        assert all(len(set(p)) == 3 for p in picks)  # distinct objects
        return areas[np.concatenate(picks)].mean()

    uniform, weighted = mean_area(0.0), mean_area(1.0)
    assert uniform == pytest.approx(areas.mean(), rel=0.1)
    assert weighted > 1.3 * uniform


def test_evaluation_through_a_larger_frame(tmp_path):
    """eval_canvas / eval_size: held-out images of eval_size pixels resized to eval_canvas
    (like the predictor), evaluated with SAM's encoding; training goes on at its canvas."""
    cfg = _cfg(tmp_path, steps=2, eval_every=2, eval_images=3, eval_size=48, eval_canvas=128)
    samples = L.eval_set(cfg)
    assert samples[0].image.shape == (3, 128, 128) and samples[0].masks[0].shape == (128, 128)
    events = []
    model, history = L.train(cfg, callback=events.append, eval_samples=samples)
    assert [e["step"] for e in events if e["kind"] == "eval"] == [2]
    assert history[-1]["objects"] > 0
    assert tuple(model.prompt_encoder.input_image_size) == (64, 64)  # back to the canvas


def test_array_source_crops_keep_the_predictors_pixel_scale():
    """frame mode: images at the predictor's scale (here 1:1, a 200 px image in a 512
    frame with min_side 128), random canvas crops that always hold an object."""
    lab = np.zeros((200, 150), np.int32)
    lab[20:40, 30:50] = 1  # 400 px
    lab[150:190, 100:140] = 2  # 1600 px
    img = (lab > 0).astype(np.float32) * 200 + 20
    src = L.ArraySource([img], [lab], canvas=64, frame=512, min_side=128)
    rng = np.random.default_rng(0)
    areas = set()
    for _ in range(20):
        s = src.sample(rng)
        assert s.image.shape == (3, 64, 64) and s.masks
        assert all(m.shape == (64, 64) and m.any() for m in s.masks)
        areas |= {int(m.sum()) for m in s.masks}
    assert {400, 1600} <= areas  # whole objects at their own size (no resizing)
    # without min_side the image is enlarged to the frame first (x 2.56): larger objects
    big = L.ArraySource([img], [lab], canvas=64, frame=512)
    assert max(int(m.sum()) for _ in range(10) for m in big.sample(rng).masks) > 1600


def test_training_a_high_resolution_skip_added_to_trained_weights(tmp_path):
    """A skip added to existing weights starts at zero and is trained by the loop."""
    first = _cfg(tmp_path, steps=4, max_rounds=0)
    L.train(first)
    cfg = _cfg(
        tmp_path,
        out_dir=str(tmp_path / "hq"),
        model={**TINY, "hires_chans": 2},
        init=str(tmp_path / "run" / "last.pt"),
        steps=4,
        max_rounds=0,
    )
    start = L.build_model(cfg)
    assert float(start.mask_decoder.hires_proj[2].weight.detach().abs().sum()) == 0.0
    model, _ = L.train(cfg)
    assert float(model.mask_decoder.hires_proj[2].weight.detach().abs().sum()) > 0.0
    assert not torch.equal(start.image_encoder.hires.weight, model.image_encoder.hires.weight)


def test_train_only_updates_just_the_named_parameters(tmp_path):
    """train_only re-learns one part (here the IoU head) and leaves every other weight as is."""
    L.train(_cfg(tmp_path, steps=2, max_rounds=0))
    head = "mask_decoder.iou_prediction_head"
    cfg = _cfg(
        tmp_path,
        out_dir=str(tmp_path / "head"),
        init=str(tmp_path / "run" / "last.pt"),
        steps=3,
        train_only=(head,),
    )
    start = {k: v.clone() for k, v in L.build_model(cfg).state_dict().items()}
    model, _ = L.train(cfg)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
    assert changed and all(k.startswith(head) for k in changed), sorted(changed)
    # BatchNorm statistics of the frozen encoder do not drift either
    assert not any("image_encoder" in k for k in changed)
    with pytest.raises(ValueError, match="matches no parameter"):
        L.train(_cfg(tmp_path, out_dir=str(tmp_path / "x"), steps=1, train_only=("nope",)))


def test_weight_average_follows_the_raw_weights_and_resumes(tmp_path):
    """ema_decay d: after every step ema = d * ema + (1 - d) * weights (checked against the
    raw weights seen after each step); the average is what training returns and what an
    interrupted run restores."""
    d = 0.6
    cfg = _cfg(tmp_path / "a", steps=4, ema_decay=d)
    model = L.build_model(cfg)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def follow(ev):
        if ev["kind"] == "step":
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    expected[k] = d * expected[k] + (1 - d) * v
                else:
                    expected[k] = v.clone()

    trained, _ = L.train(cfg, callback=follow, model=model)
    state = _state(tmp_path / "a" / "run" / "last.pt")
    moved = 0
    for k, v in trained.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state["ema"][k], expected[k], rtol=1e-5, atol=1e-6)
        if v.is_floating_point():
            moved += int(not torch.allclose(state["model"][k], v))
    assert moved > 0  # the average differs from the raw weights
    # interrupted after 2 steps and resumed: the same average
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    L.train(_cfg(tmp_path / "s", steps=4, ema_decay=d))
    straight = _state(tmp_path / "s" / "run" / "last.pt")
    cfg_b = _cfg(tmp_path / "b", steps=4, ema_decay=d)
    L.train(cfg_b, should_stop=stop_after_two)
    assert _state(tmp_path / "b" / "run" / "last.pt")["step"] == 2
    L.train(cfg_b)
    resumed = _state(tmp_path / "b" / "run" / "last.pt")
    for k in straight["ema"]:
        assert torch.equal(resumed["ema"][k], straight["ema"][k]), k
    with pytest.raises(ValueError, match="ema_decay"):
        L.train(_cfg(tmp_path / "c", steps=1, ema_decay=1.0))


def test_aux_targets_mark_interiors_and_the_boundary_between_touching_objects():
    lab = np.zeros((8, 8), np.int32)
    lab[1:6, 1:4] = 1
    lab[1:6, 4:7] = 2  # touches object 1 along a column
    s = L.Sample(np.zeros((3, 8, 8), np.float32), [lab == 1, lab == 2], labels=lab)
    b, i = 2, 1
    expected = np.zeros((8, 8), np.int64)
    expected[1:6, 1:7] = b
    expected[2:5, 2] = i  # only pixels whose 4 neighbours are all in the same object
    expected[2:5, 5] = i
    np.testing.assert_array_equal(L.aux_targets(s, 8), expected)
    # pooled by 2 x 2 blocks, boundary first (max), computed here with loops
    pooled = L.aux_targets(s, 4)
    for y in range(4):
        for x in range(4):
            assert pooled[y, x] == expected[2 * y : 2 * y + 2, 2 * x : 2 * x + 2].max()
    # without stored labels the masks give the same classes
    s2 = L.Sample(s.image, s.masks)
    np.testing.assert_array_equal(L.aux_targets(s2, 8), expected)
    with pytest.raises(ValueError, match="blocks"):
        L.aux_targets(s, 3)


def _aux_ce(model, head, samples):
    model.eval()
    with torch.no_grad():
        emb = model.image_encoder(torch.from_numpy(np.stack([s.image for s in samples])))
        return float(L.aux_loss(head, emb, samples, torch))


def test_dense_aux_loss_trains_the_encoder_and_resumes(tmp_path):
    """aux_weight: the head (kept in last.pt, not in the model) learns the held-out
    classes, its gradient reaches the image encoder, and an interrupted run resumes to the
    same state."""
    cfg = _cfg(tmp_path / "a", steps=40, aux_weight=4.0, max_rounds=0)
    held_out = L.eval_set(cfg, 4)
    model, _ = L.train(cfg)
    state = _state(tmp_path / "a" / "run" / "last.pt")
    assert not any(k.startswith("aux") for k in model.state_dict())
    head = L.make_aux_head(L.build_model(cfg), cfg.canvas)
    start = _aux_ce(L.build_model(cfg), head, held_out)
    head.load_state_dict(state["aux"])
    after = _aux_ce(model, head, held_out)
    # measured: 1.18 -> 0.88
    assert after < 0.85 * start, (start, after)

    # one step with and without the loss, same data: only the encoder's update differs
    # (without gradient clipping, which scales every gradient by the total norm)
    one = [
        L.train(_cfg(tmp_path / n, steps=1, aux_weight=w, grad_clip=0))[0]
        for n, w in (("w", 2.0), ("o", 0))
    ]
    diff = {
        k for k, v in one[0].state_dict().items() if not torch.equal(v, one[1].state_dict()[k])
    }
    assert diff and all(k.startswith("image_encoder") for k in diff), sorted(
        k for k in diff if not k.startswith("image_encoder")
    )

    L.train(_cfg(tmp_path / "s", steps=4, aux_weight=1.0))
    straight = _state(tmp_path / "s" / "run" / "last.pt")
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    cfg_b = _cfg(tmp_path / "b", steps=4, aux_weight=1.0)
    L.train(cfg_b, should_stop=stop_after_two)
    assert _state(tmp_path / "b" / "run" / "last.pt")["step"] == 2
    L.train(cfg_b)
    resumed = _state(tmp_path / "b" / "run" / "last.pt")
    for part in ("model", "aux"):
        for k in straight[part]:
            assert torch.equal(resumed[part][k], straight[part][k]), (part, k)
    with pytest.raises(ValueError, match="train_encoder"):
        L.train(_cfg(tmp_path / "c", steps=1, aux_weight=1.0, train_encoder=False))
    L.train(_cfg(tmp_path / "d", steps=2))
    with pytest.raises(ValueError, match="without aux_weight"):
        L.train(_cfg(tmp_path / "d", steps=4, aux_weight=1.0))


def test_clicked_parts_scores_the_masks_the_plugin_shows(tmp_path):
    """clicked_parts: the IoU head's targets and the evaluation use the masks after
    keep_clicked_parts; the mask loss is unchanged."""
    from napari_sam._masks import keep_clicked_parts
    from napari_sam.train.losses import mask_iou, sam_loss

    # a target object and a stray blob: only the clicked part is scored
    logits = torch.full((1, 1, 16, 16), -4.0)
    logits[..., 2:6, 2:6] = 4.0
    logits[..., 10:14, 10:14] = 4.0
    target = torch.zeros((1, 1, 16, 16))
    target[..., 2:6, 2:6] = 1.0
    shown = keep_clicked_parts(logits, np.array([[7.0, 7.0]]), (32, 32), (32, 32), 32)
    iou = torch.zeros((1, 1))
    raw, kept = sam_loss(logits, iou, target), sam_loss(logits, iou, target, iou_logits=shown)
    assert float(raw.actual_iou) == pytest.approx(0.5) and float(kept.actual_iou) == 1.0
    assert torch.equal(raw.mask, kept.mask)
    assert float(mask_iou(shown, target)) == 1.0

    # evaluation: the bundled model's clicks on nuclei scenes (it adds stray parts there)
    from napari_sam import load_model
    from napari_sam.model.small_encoder import set_canvas

    model = load_model()
    set_canvas(model, 256)
    held_out = L.eval_set(_cfg(tmp_path, canvas=256, kind="nuclei", eval_images=3))
    a = L.evaluate(model, held_out, n_clicks=2)
    b = L.evaluate(model, held_out, n_clicks=2, clicked_parts=True)
    assert a["box"] == b["box"] and a["objects"] == b["objects"]
    # measured: point 0.561 -> 0.584, 2 clicks 0.650 -> 0.699
    assert b["point"] > a["point"] and b["click2"] > a["click2"], (a, b)
    # the training step runs with it
    L.train(_cfg(tmp_path, steps=2, clicked_parts=True, max_rounds=1, box_prob=0.0))

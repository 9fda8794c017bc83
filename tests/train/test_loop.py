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

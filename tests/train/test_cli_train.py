"""``napari-sam train`` end to end on a tiny model (a few steps)."""

import json

import numpy as np
import pytest
import torch

from napari_sam.cli import main
from napari_sam.train.synthetic import make_image

TINY = (
    '{"img_size": 64, "widths": [8, 8, 16, 16, 16], "depths": [0, 0, 1, 0, 0], '
    '"embed_dim": 32, "mask_in_chans": 8, "decoder_depth": 1, "decoder_num_heads": 2, '
    '"decoder_mlp_dim": 32, "iou_head_hidden_dim": 16}'
)
COMMON = ["--canvas", "64", "--model-config", TINY, "--threads", "1", "--quiet"]


def test_train_synthetic_export(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "3", "--eval-every", "3"]
    rc = main([*args, "--eval-images", "2", "--export", str(tmp_path / "w.pt"), *COMMON])
    assert rc == 0
    assert (out / "last.pt").exists() and (out / "best.pt").exists()
    info = json.loads((tmp_path / "w.json").read_text())
    assert info["model_type"] == "nsam_s" and info["dtype"] == "float16"
    assert set(info["metrics"]) >= {"box", "point", "click1"}
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert "exported w.pt" in capsys.readouterr().out
    # resuming a finished run is a no-op that still succeeds
    assert main([*args, "--eval-images", "2", *COMMON]) == 0


def test_train_on_own_annotations_frozen_encoder(tmp_path):
    imgs, labs = [], []
    for i in range(2):
        img, lab = make_image(i, (80, 64), "nuclei", bit_depth=16, scale=0.5)
        imgs.append(str(tmp_path / f"im{i}.npy"))
        labs.append(str(tmp_path / f"lab{i}.npy"))
        np.save(imgs[-1], img)
        np.save(labs[-1], lab)
    out = tmp_path / "ft"
    rc = main(
        [
            "train",
            "--out",
            str(out),
            "--steps",
            "2",
            "--eval-every",
            "0",
            "--frozen-encoder",
            "--images",
            *imgs,
            "--labels",
            *labs,
            *COMMON,
        ]
    )
    assert rc == 0
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["step"] == 2 and ck["config"]["train_encoder"] is False


def test_bad_arguments(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--images", "a.tif"]) == 2
    assert "--labels must be given together" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--init", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--model-config", "{bad"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train"])  # --out is required


def test_multi_phase_recipe_chains_weights(tmp_path, monkeypatch):
    from napari_sam.train import recipes

    phase = {"steps": 2, "eval_every": 2, "eval_images": 2, "images_per_step": 1}
    monkeypatch.setitem(recipes.RECIPES, "tiny2", [dict(phase), {**phase, "lr": 0.0}])
    out = tmp_path / "r"
    assert main(["train", "--recipe", "tiny2", "--out", str(out), *COMMON]) == 0
    p0 = torch.load(out / "phase0" / "best.pt", weights_only=True)
    p1 = torch.load(out / "phase1" / "last.pt", weights_only=True)
    assert p1["config"]["init"] == str(out / "phase0" / "best.pt")
    # phase 1 ran with lr 0 from phase 0's best weights: its parameters did not move
    # (BatchNorm running statistics do, so compare the trainable weights only)
    for k, v in p0["model"].items():
        if "running_" not in k and "num_batches" not in k:
            assert torch.equal(v, p1["model"][k]), k
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.recipe("nope")


def test_recipe_from_a_later_phase(tmp_path, monkeypatch, capsys):
    from napari_sam.train import recipes

    phase = {"steps": 2, "eval_every": 2, "eval_images": 2, "images_per_step": 1}
    monkeypatch.setitem(recipes.RECIPES, "tiny3", [dict(phase), dict(phase), {**phase, "lr": 0.0}])
    out = tmp_path / "r"
    # phase 1 needs phase 0's weights: missing -> a clear error, nothing trained
    assert (
        main(["train", "--recipe", "tiny3", "--out", str(out), "--from-phase", "1", *COMMON]) == 2
    )
    assert "phase 0's weights" in capsys.readouterr().err and not out.exists()
    assert (
        main(["train", "--recipe", "tiny3", "--out", str(out), "--from-phase", "3", *COMMON]) == 2
    )
    assert "phases 0 to 2" in capsys.readouterr().err
    # from phase 2 with --init: phases 0 and 1 are skipped; lr 0 keeps the init weights
    init = tmp_path / "init.pt"
    assert main(["train", "--out", str(tmp_path / "a"), "--steps", "1", "--eval-every", "0",
                 "--export", str(init), *COMMON]) == 0  # fmt: skip
    args = ["train", "--recipe", "tiny3", "--out", str(out), "--from-phase", "2"]
    assert main([*args, "--init", str(init), *COMMON]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["phase2"]
    p2 = torch.load(out / "phase2" / "last.pt", weights_only=True)
    assert p2["config"]["init"] == str(init)
    start = torch.load(init, weights_only=True)
    w = "mask_decoder.iou_prediction_head.layers.0.weight"
    torch.testing.assert_close(p2["model"][w], start[w].float())


def test_every_recipe_phase_is_a_valid_training_config(tmp_path):
    from napari_sam.train import recipes
    from napari_sam.train.loop import TrainConfig

    for name in recipes.RECIPES:
        for i, phase in enumerate(recipes.recipe(name)):
            cfg = TrainConfig(out_dir=str(tmp_path / name / str(i)), **phase)
            assert cfg.steps >= 1 and (cfg.stop_at is None or cfg.stop_at <= cfg.steps)
    # the default model's last phase only re-learns the IoU head
    last = TrainConfig(**recipes.recipe("nsam_s5")[-1])
    assert not last.train_encoder and list(last.train_only) == ["mask_decoder.iou_prediction_head"]

"""The user model list (models/user_models.json in the cache)."""

import json

import pytest

from napari_sam.model.user_models import (
    add_user_model,
    list_user_models,
    remove_user_model,
    user_models_file,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _ckpt(path):
    path.write_bytes(b"weights")
    return path


def test_add_list_remove(cache, tmp_path):
    assert list_user_models() == []
    a = add_user_model(_ckpt(tmp_path / "a.pt"), "mine", base_model="nsam_s", metrics={"x": 1})
    add_user_model(_ckpt(tmp_path / "b.pt"))
    assert user_models_file() == cache / "models" / "user_models.json"
    got = list_user_models()
    assert [m.name for m in got] == ["mine", "b"]
    assert got[0].path == str((tmp_path / "a.pt").resolve()) and got[0].metrics == {"x": 1}
    assert got[0].base_model == "nsam_s" and got[0].created
    doc = json.loads(user_models_file().read_text())
    assert doc["format_version"] == 1 and len(doc["models"]) == 2
    # the same name for another file gets a suffix; the same file replaces its entry
    c = add_user_model(_ckpt(tmp_path / "c.pt"), "mine")
    assert c.name == "mine-2"
    again = add_user_model(tmp_path / "a.pt", "renamed")
    assert [m.name for m in list_user_models()] == ["b", "mine-2", "renamed"]
    assert again.path == a.path
    assert remove_user_model("b") and remove_user_model(tmp_path / "c.pt")
    assert not remove_user_model("nothing")
    assert [m.name for m in list_user_models()] == ["renamed"]


def test_missing_files_are_hidden_and_unreadable_lists_survive(cache, tmp_path):
    add_user_model(_ckpt(tmp_path / "gone.pt"))
    (tmp_path / "gone.pt").unlink()
    assert list_user_models() == []
    assert [m.name for m in list_user_models(existing_only=False)] == ["gone"]
    user_models_file().write_text("{not json")
    with pytest.warns(UserWarning, match="ignoring the user model list"):
        assert list_user_models() == []
    with pytest.warns(UserWarning, match="started a new list"):
        add_user_model(_ckpt(tmp_path / "new.pt"))
    assert [m.name for m in list_user_models()] == ["new"]
    assert len(list((cache / "models").glob("user_models.json.unreadable-*"))) == 1


def test_adding_a_missing_file_is_refused(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        add_user_model(tmp_path / "nope.pt")


def test_user_models_appear_in_the_gui_model_list(cache, tmp_path):
    import torch

    from napari_sam.model.build import build_sam
    from napari_sam.model_choices import default_choices

    torch.manual_seed(0)
    model = build_sam("test_vit")
    torch.save(model.state_dict(), tmp_path / "tuned.pt")
    add_user_model(tmp_path / "tuned.pt", "my tuned")
    (choice,) = [c for c in default_choices() if c.key.startswith("user:")]
    assert choice.label == "my tuned (your model)" and choice.trained
    loaded = choice.load("cpu")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

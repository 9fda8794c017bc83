"""The model list offered by the annotator: the bundled default model is there, works
offline and is picked when no trained model is cached."""

from napari_sam.model_choices import default_choices, preferred_index


def test_bundled_default_is_offered_and_preferred_without_cached_models(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path))  # empty cache: nothing downloaded
    choices = default_choices()
    keys = [c.key for c in choices]
    assert "default" in keys
    chosen = choices[preferred_index(choices)]
    assert chosen.key == "default" and chosen.trained and not chosen.needs_download
    model = chosen.load("cpu")
    assert type(model.image_encoder).__name__ == "SmallEncoder"

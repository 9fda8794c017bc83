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


def test_a_downloaded_official_model_comes_first(tmp_path, monkeypatch):
    from napari_sam.model import registry

    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path))
    path = registry.cached_path("vit_b")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"placeholder: only its presence is listed, nothing is loaded")
    choices = default_choices()
    keys = [c.key for c in choices]
    assert keys.index("vit_b") < keys.index("default")
    chosen = choices[preferred_index(choices)]
    assert chosen.key == "vit_b" and not chosen.needs_download
    assert "cached" in chosen.label
    # the others still need a download and come after the bundled model
    assert keys.index("default") < keys.index("vit_h")

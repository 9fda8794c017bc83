"""EmbeddingStore: zarr store with signature, resume, LRU, precompute with priority."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_sam.embeddings import (
    EmbeddingMismatchError,
    EmbeddingStore,
    default_store_path,
    hash_weights,
)
from volume_helpers import (  # noqa: F401 (torch_one_thread: autouse fixture)
    EncoderCounter,
    ellipsoid_volume,
    tiny_predictor,
    torch_one_thread,
)


@pytest.fixture(scope="module")
def predictor():
    return tiny_predictor(seed=0)


@pytest.fixture
def counter(predictor):
    c = EncoderCounter(predictor.model)
    yield c
    c.remove()


@pytest.fixture(scope="module")
def stack():
    return ellipsoid_volume(shape=(12, 48, 40))[0]


class SliceOnly:
    """A stack that refuses any read but a single slice along axis 0 (and counts reads)."""

    def __init__(self, data):
        self.data, self.shape, self.dtype, self.reads = data, data.shape, data.dtype, []

    def __getitem__(self, index):
        if not (isinstance(index, tuple) and isinstance(index[0], int)):
            raise AssertionError(f"read of more than one slice: {index!r}")
        self.reads.append(index[0])
        return self.data[index]


def _direct(predictor, image):
    predictor.set_image(image)
    return predictor.get_embedding().features.clone()


def test_get_matches_predictor_and_reopen_runs_no_encoder(tmp_path, predictor, stack, counter):
    store = EmbeddingStore(stack, predictor, tmp_path / "e.zarr", dtype="float32")
    emb = store.get(5)
    assert counter.count == 1
    ref = _direct(predictor, stack[5])
    assert torch.equal(emb.features, ref)
    assert tuple(emb.original_size) == stack.shape[1:]
    assert store.precompute() == stack.shape[0] - 1

    counter.count = 0
    again = EmbeddingStore(stack, predictor, tmp_path / "e.zarr", dtype="float32")
    assert again.missing() == []
    for z in range(stack.shape[0]):
        again.get(z)
    assert counter.count == 0
    assert torch.equal(again.get(5).features, ref)
    assert tuple(again.get(5).input_size) == tuple(emb.input_size)


def test_float16_store_is_half_size_and_close(tmp_path, predictor, stack):
    s16 = EmbeddingStore(stack, predictor, tmp_path / "a.zarr")
    s32 = EmbeddingStore(stack, predictor, tmp_path / "b.zarr", dtype="float32")
    f16, f32 = s16.get(3).features, s32.get(3).features
    assert s16._group["features"].dtype == np.float16
    rel = (f16 - f32).abs().max() / f32.abs().max()
    assert 0 < rel < 1e-3
    # Same prompts against both embeddings: the masks agree.
    box = np.array([8, 10, 30, 40])
    out = []
    for s in (s16, s32):
        predictor.set_embedding(s.get(3))
        out.append(predictor.predict(box=box, multimask_output=True))
    (m16, iou16, lr16), (m32, iou32, lr32) = out
    assert np.abs(lr16 - lr32).max() < 1e-2 * np.abs(lr32).max()
    agree = (m16 == m32).mean()
    assert agree > 0.999, agree


@pytest.mark.parametrize(
    "change, what",
    [
        ("weights", "model weights"),
        ("preprocess", "preprocessing"),
        ("dtype", "stored dtype"),
        ("axis", "slice axis"),
        ("shape", "stack shape"),
    ],
)
def test_signature_mismatch_is_refused(tmp_path, predictor, stack, change, what):
    path = tmp_path / "e.zarr"
    EmbeddingStore(stack, predictor, path).get(0)
    kwargs = {}
    data = stack
    pred = predictor
    if change == "weights":
        pred = tiny_predictor(seed=1)
    elif change == "preprocess":
        kwargs["preprocess_key"] = "window(-1000, 400)"
    elif change == "dtype":
        kwargs["dtype"] = "float32"
    elif change == "axis":
        kwargs["axis"] = 1
    elif change == "shape":
        data = stack[:-1]
    with pytest.raises(EmbeddingMismatchError, match=what) as info:
        EmbeddingStore(data, pred, path, **kwargs)
    assert "overwrite=True" in str(info.value) and "new path" in str(info.value)
    # overwrite=True replaces it.
    fresh = EmbeddingStore(data, pred, path, overwrite=True, **kwargs)
    assert fresh.missing() == list(range(fresh.n_slices))


def test_changed_image_content_is_refused_naming_slices(tmp_path, predictor, stack, counter):
    path = tmp_path / "e.zarr"
    EmbeddingStore(stack, predictor, path).precompute([2, 4, 6])
    edited = stack.copy()
    edited[4, 10, 10] += 1.0
    with pytest.raises(EmbeddingMismatchError, match=r"different image data.*z = 4"):
        EmbeddingStore(edited, predictor, path)
    # A change on a slice that was never encoded is no conflict.
    edited = stack.copy()
    edited[5] = 0
    EmbeddingStore(edited, predictor, path)
    # verify="lazy": the open is accepted, reading the changed slice is refused.
    edited = stack.copy()
    edited[6] += 1.0
    lazy = EmbeddingStore(edited, predictor, path, verify="lazy")
    lazy.get(2)
    with pytest.raises(EmbeddingMismatchError, match="z = 6"):
        lazy.get(6)


def test_non_store_directory_is_refused(tmp_path, predictor, stack):
    import zarr

    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs["x"] = 1
    with pytest.raises(EmbeddingMismatchError, match="not a napari-sam embedding store"):
        EmbeddingStore(stack, predictor, tmp_path / "other.zarr")
    # overwrite=True never deletes what is not an embedding store.
    with pytest.raises(FileExistsError, match="refusing to delete"):
        EmbeddingStore(stack, predictor, tmp_path / "other.zarr", overwrite=True)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cells.tif").write_bytes(b"data")
    with pytest.raises(FileExistsError, match="refusing to delete"):
        EmbeddingStore(stack, predictor, tmp_path / "images")
    assert (tmp_path / "images" / "cells.tif").exists()
    assert (tmp_path / "other.zarr" / "zarr.json").exists()


def test_resume_after_interruption_computes_only_missing(tmp_path, predictor, stack, counter):
    path = tmp_path / "e.zarr"

    class Crash(Exception):
        pass

    class CrashingStack(SliceOnly):
        def __getitem__(self, index):
            if len(self.reads) == 5:
                raise Crash("disk unplugged")
            return super().__getitem__(index)

    crashing = CrashingStack(stack)
    with pytest.raises(Crash):
        EmbeddingStore(crashing, predictor, path).precompute()
    assert counter.count == 5

    counter.count = 0
    store = EmbeddingStore(stack, predictor, path)
    assert store.missing() == list(range(5, stack.shape[0]))
    events = list(store.iter_precompute())
    assert counter.count == stack.shape[0] - 5 == store.encoder_runs
    assert [e.z for e in events] == list(range(5, stack.shape[0]))
    assert events[-1].done == events[-1].total == stack.shape[0] - 5
    # The resumed store holds the same embeddings as an uninterrupted run.
    ref = EmbeddingStore(stack, predictor, tmp_path / "ref.zarr")
    for z in (0, 4, 5, 11):
        assert torch.equal(store.get(z).features, ref.get(z).features)


def test_cancel_keeps_finished_slices(tmp_path, predictor, stack, counter):
    path = tmp_path / "e.zarr"
    store = EmbeddingStore(stack, predictor, path)
    seen = []
    runs = store.precompute(progress=seen.append, should_cancel=lambda: len(seen) >= 3)
    assert runs == 3 == counter.count
    assert EmbeddingStore(stack, predictor, path).missing() == list(range(3, stack.shape[0]))


def test_priority_jumps_the_queue(tmp_path, predictor, stack):
    store = EmbeddingStore(stack, predictor, tmp_path / "e.zarr")
    order = []
    for event in store.iter_precompute(slices=range(8)):
        order.append(event.z)
        if event.z == 1:
            store.priority(6)
            store.priority(10)  # outside the requested slices: still computed, first
    assert order == [0, 1, 10, 6, 2, 3, 4, 5, 7]


def test_never_reads_more_than_one_slice(tmp_path, predictor, stack):
    guarded = SliceOnly(stack)
    store = EmbeddingStore(guarded, predictor, tmp_path / "e.zarr")
    store.precompute()
    assert sorted(guarded.reads) == list(range(stack.shape[0]))
    guarded.reads.clear()
    EmbeddingStore(guarded, predictor, tmp_path / "e.zarr")  # verify on open: one pass
    assert sorted(guarded.reads) == list(range(stack.shape[0]))


def test_dask_and_zarr_stacks(tmp_path, predictor, stack):
    import dask.array as da
    import zarr

    z = zarr.create_array(tmp_path / "img.zarr", shape=stack.shape, chunks=(1, 48, 40),
                          dtype=stack.dtype)  # fmt: skip
    z[:] = stack
    ref = EmbeddingStore(stack, predictor)
    for data in (z, da.from_zarr(z)):
        store = EmbeddingStore(data, predictor, tmp_path / f"{type(data).__name__}.e.zarr")
        assert torch.equal(store.get(7).features, ref.get(7).features)


def test_other_axis(predictor, stack):
    store = EmbeddingStore(stack, predictor, axis=2, dtype="float32")
    assert store.n_slices == stack.shape[2] and store.slice_shape == stack.shape[:2]
    assert torch.equal(store.get(9).features, _direct(predictor, stack[:, :, 9]))


def test_memory_lru_budget(predictor, stack, counter):
    one = EmbeddingStore(stack, predictor).get(0).features.numel() * 2  # float16 bytes
    store = EmbeddingStore(stack, predictor, cache_bytes=3 * one)
    for z in range(6):
        store.get(z)
        assert store.cache_nbytes <= 3 * one
    assert counter.count == 7
    store.get(5)  # recent: cached
    assert counter.count == 7
    store.get(0)  # evicted: memory-only store recomputes
    assert counter.count == 8


def test_bad_input(predictor, stack):
    with pytest.raises(ValueError, match="3D"):
        EmbeddingStore(stack[0], predictor)
    with pytest.raises(TypeError, match="set_image"):
        EmbeddingStore(stack, object())
    store = EmbeddingStore(stack, predictor)
    with pytest.raises(IndexError, match="outside the stack"):
        store.get(stack.shape[0])
    with pytest.raises(ValueError, match="float16"):
        EmbeddingStore(stack, predictor, dtype="int8")


def test_weights_hash_and_paths(tmp_path, predictor, monkeypatch):
    assert hash_weights(predictor.model) == hash_weights(predictor.model)
    assert hash_weights(predictor.model) != hash_weights(tiny_predictor(seed=1).model)
    p = default_store_path(tmp_path / "cells.tif", key="vit_b/p1-99")
    assert p == tmp_path / "cells.tif.napari-sam" / "vit_b_p1-99.zarr"
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "cache"))
    assert default_store_path(key="vit_b").parent == tmp_path / "cache" / "embeddings"


def test_works_with_the_official_predictor_behind_the_contract(tmp_path, stack):
    official = tiny_predictor(kind="official")
    store = EmbeddingStore(stack, official, tmp_path / "o.zarr", dtype="float32")
    emb = store.get(2)
    assert torch.equal(emb.features, _direct(official, stack[2]))
    assert EmbeddingStore(stack, official, tmp_path / "o.zarr", dtype="float32").is_done(2)


def test_repair_recomputes_only_changed_slices(tmp_path, predictor, stack, counter):
    path = tmp_path / "e.zarr"
    EmbeddingStore(stack, predictor, path, dtype="float32").precompute([2, 6])
    edited = stack.copy()
    edited[6] += 1.0
    store = EmbeddingStore(edited, predictor, path, dtype="float32", verify="repair")
    runs = counter.count
    assert torch.equal(store.get(2).features, _direct(predictor, stack[2]))  # unchanged: read
    assert counter.count - runs == 1  # (the direct reference above)
    emb = store.get(6)  # changed: encoded again from the edited image, never the old one
    assert torch.equal(emb.features, _direct(predictor, edited[6]))
    assert store.stale_slices == [6] and store.encoder_runs == 1
    # the repaired slice is on disk: a strict reopen on the edited image accepts it
    again = EmbeddingStore(edited, predictor, path, dtype="float32")
    assert again.is_done(6) and again.encoder_runs == 0


def test_open_cached_store(tmp_path, predictor, stack, monkeypatch):
    from napari_sam.embeddings import cache_root, model_weights_hash, open_cached_store

    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", str(tmp_path / "emb"))
    assert cache_root() == tmp_path / "emb"
    assert model_weights_hash(predictor.model) == hash_weights(predictor.model)
    store, note = open_cached_store(stack, predictor, axis=0, model_name="tiny")
    assert note == "" and store.path.parent == tmp_path / "emb"
    store.precompute([1, 3])
    same, note = open_cached_store(stack.copy(), predictor, axis=0, model_name="tiny")
    assert same.path == store.path and note == "" and same.missing([1, 3]) == []
    # other model, axis or image: another store
    other = tiny_predictor(seed=1)
    assert open_cached_store(stack, other, axis=0, model_name="tiny")[0].path != store.path
    assert open_cached_store(stack, predictor, axis=1, model_name="tiny")[0].path != store.path
    assert open_cached_store(stack + 1, predictor, axis=0, model_name="tiny")[0].path != store.path
    # same path, other signature (e.g. written by another napari-sam version): recomputed
    monkeypatch.setattr("napari_sam.__version__", "0.0.0-other")
    fresh, note = open_cached_store(stack, predictor, axis=0, model_name="tiny")
    assert fresh.path == store.path and fresh.missing([1, 3]) == [1, 3]
    assert "computing them again" in note and "napari-sam version" in note
    # memory only, and an unusable folder (a file where the folder should be)
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", "memory")
    assert cache_root() is None
    assert open_cached_store(stack, predictor, axis=0, model_name="tiny")[0].path is None
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", str(blocker))
    mem, note = open_cached_store(stack, predictor, axis=0, model_name="tiny")
    assert mem.path is None and "memory only" in note and "NAPARI_SAM_EMBEDDINGS" in note
    assert mem.get(0).features.shape[0] == 1


def test_test_time_views_are_stored_and_restored(tmp_path, predictor, stack):
    """A predictor with flipped views (tta=4) stores all views of each slice; reading them
    back gives the same embedding and predictions as encoding, and a store written
    without views is not reused for it."""
    from napari_sam.predictor import SamPredictor

    aug = SamPredictor(predictor.model, cache_bytes=0, tta=4)
    path = tmp_path / "e.zarr"
    store = EmbeddingStore(stack, aug, path, dtype="float32")
    emb = store.get(4)
    ref = _direct(aug, stack[4])
    assert ref.shape[0] == 4 and torch.equal(emb.features, ref)
    again = EmbeddingStore(stack, aug, path, dtype="float32")
    assert torch.equal(again.get(4).features, ref)
    box = np.array([8.0, 8.0, 30.0, 34.0])
    twin = SamPredictor(predictor.model, cache_bytes=0, tta=4)
    again.set_predictor_slice(twin, 4)
    direct = aug.predict(box=box)
    for u, v in zip(twin.predict(box=box), direct, strict=True):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(EmbeddingMismatchError, match="preprocessing"):
        EmbeddingStore(stack, predictor, path, dtype="float32")

"""The annotation session without any GUI: prompts, candidates, commit, undo, slices."""

import threading

import numpy as np
import pytest

from napari_sam.annotator import Annotator
from tiny_sam import EncoderCounter, blob_image, make_predictor, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


@pytest.fixture
def predictor(model):
    return make_predictor(model)


def direct(predictor, plane, **kw):
    """A direct predictor call in SAM's frame, the reference for the annotator."""
    predictor.set_image(plane)
    return predictor.predict(multimask_output=True, **kw)


def test_candidates_are_the_predictors_masks_for_points_and_box(predictor, model):
    img = blob_image((64, 96))
    ann = Annotator(predictor, img)
    ann.set_prompts([[20, 30], [40, 70]], [1, 0], box=[10, 12, 50, 60])
    cands = ann.update()
    ref = make_predictor(model)
    masks, ious, logits = direct(
        ref,
        img,
        point_coords=np.array([[30.0, 20.0], [70.0, 40.0]]),  # (x, y)
        point_labels=np.array([1, 0]),
        box=np.array([12.0, 10.0, 60.0, 50.0]),  # XYXY
    )
    assert cands.masks.shape == (3, 64, 96) and cands.masks.dtype == bool
    np.testing.assert_array_equal(cands.masks, masks)
    np.testing.assert_allclose(cands.ious, ious, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cands.logits, logits, rtol=1e-4, atol=1e-4)
    assert ann.selected == int(np.argmax(ious))


def test_selection_default_pick_and_reset(predictor):
    ann = Annotator(predictor, blob_image((48, 48), centers=((24, 24, 10),)))
    assert ann.selected is None
    ann.add_point((24, 24))
    ann.update()
    best = int(np.argmax(ann.candidates.ious))
    assert ann.selected == best
    other = (best + 1) % 3
    ann.select(other)
    ann.add_point((10, 10), positive=False)
    ann.update()
    assert ann.selected == other  # a user pick sticks across prompt changes
    ann.commit()
    ann.add_point((30, 30))
    ann.update()
    assert ann.selected == int(np.argmax(ann.candidates.ious))
    with pytest.raises(ValueError, match="0, 1 or 2"):
        ann.select(3)


def test_added_point_refines_with_previous_logits(predictor, model):
    img = blob_image((64, 64), centers=((30, 30, 12),))
    ann = Annotator(predictor, img)
    ann.add_point((30, 30))
    first = ann.update()
    ann.select(1)
    ann.add_point((5, 5), positive=False)
    req = ann.prediction_request()
    np.testing.assert_array_equal(req.mask_input, first.logits[1][None])
    ann.apply(ann.run(req))
    ref = make_predictor(model)
    masks, _, _ = direct(
        ref,
        img,
        point_coords=np.array([[30.0, 30.0], [5.0, 5.0]]),
        point_labels=np.array([1, 0]),
        mask_input=first.logits[1][None],
    )
    np.testing.assert_array_equal(ann.candidates.masks, masks)
    # moving a point (not an addition) predicts from the prompts alone
    ann.set_prompts([[31, 30], [5, 5]], [1, 0])
    assert ann.prediction_request().mask_input is None
    # ... and so does a session with refinement off
    plain = Annotator(predictor, img, refine=False)
    plain.add_point((30, 30))
    plain.update()
    plain.add_point((5, 5), positive=False)
    assert plain.prediction_request().mask_input is None


def commit_blob(ann, rc, **kw):
    ann.add_point(rc)
    ann.update()
    return ann.commit(**kw)


def test_commit_ids_overlap_rules_and_chosen_id(predictor):
    img = blob_image((64, 96))
    ann = Annotator(predictor, img)
    r1 = commit_blob(ann, (40, 50))
    first = ann.labels == 1
    assert r1.label_id == 1 and first.sum() == r1.n_pixels > 0
    assert ann.prompts.is_empty and ann.candidates is None

    ann.add_point((40, 52))
    ann.update()
    mask = ann.candidates.masks[ann.selected]
    r2 = ann.commit()  # "keep": object 1 keeps its pixels
    assert r2.label_id == 2
    np.testing.assert_array_equal(ann.labels == 1, first)
    np.testing.assert_array_equal(ann.labels == 2, mask & ~first)

    ann.undo()
    ann.update()
    r2 = ann.commit(overlap="overwrite")
    np.testing.assert_array_equal(ann.labels == 2, mask)
    np.testing.assert_array_equal(ann.labels == 1, first & ~mask)
    assert r2.overlap == "overwrite"

    r9 = commit_blob(ann, (10, 10), label_id=9, overlap="overwrite")
    assert r9.label_id == 9 and ann.next_id == 10
    assert (ann.labels == 9).any()


def test_commit_errors_are_messages(predictor):
    ann = Annotator(predictor, blob_image((48, 48)), labels=np.zeros((48, 48), np.uint8))
    with pytest.raises(ValueError, match="nothing to commit"):
        ann.commit()
    ann.add_point((20, 20))
    ann.update()
    with pytest.raises(ValueError, match="out of range for labels of dtype uint8"):
        ann.commit(label_id=300)
    with pytest.raises(ValueError, match="overlap must be one of"):
        ann.commit(overlap="merge")
    with pytest.raises(TypeError, match="integer"):
        ann.commit(label_id=2.5)


def test_undo_redo_commits_and_prompts(predictor):
    img = blob_image((64, 96))
    ann = Annotator(predictor, img)
    commit_blob(ann, (40, 50))
    after_first = ann.labels.copy()
    ann.add_point((60, 95))
    ann.select(2)
    ann.update()
    prompts = ann.prompts
    rec = ann.commit()
    after_second = ann.labels.copy()
    assert rec.candidate == 2 and len(ann.records) == 2

    assert ann.undo() == "commit object 2"
    np.testing.assert_array_equal(ann.labels, after_first)
    assert ann.prompts is prompts and ann.user_choice == 2  # prompts and pick come back
    assert ann.next_id == 2 and len(ann.records) == 1
    assert ann.redo() == "commit object 2"
    np.testing.assert_array_equal(ann.labels, after_second)
    assert ann.prompts.is_empty and ann.next_id == 3

    ann.undo()
    assert ann.undo() == "add point"  # prompt edits are in the same history
    assert ann.prompts.is_empty
    ann.redo()
    np.testing.assert_array_equal(ann.prompts.points, [[60, 95]])
    ann.clear()
    assert ann.prompts.is_empty and ann.can_redo is False  # a new edit clears redo
    ann.undo()
    assert len(ann.prompts.points) == 1
    while ann.undo():
        pass
    assert not ann.labels.any() and ann.next_id == 1


def test_commit_stores_only_changed_pixels(predictor):
    ann = Annotator(predictor, blob_image((64, 96)))
    rec = commit_blob(ann, (40, 50))
    action = ann._undo[-1]
    assert len(action.rows) == rec.n_pixels == (ann.labels == 1).sum()


def test_replay_reproduces_a_refined_object(predictor):
    img = blob_image((64, 96))
    ann = Annotator(predictor, img)
    ann.add_point((40, 50))
    ann.update()
    ann.select(0)
    ann.add_point((60, 95), positive=False)
    ann.update()
    ann.add_point((45, 45))
    ann.update()
    rec = ann.commit(overlap="overwrite")
    assert [s.uses_previous for s in rec.steps] == [False, True, True]
    assert rec.steps[0].candidate == 0
    fresh = Annotator(make_predictor(predictor.model), img)
    np.testing.assert_array_equal(fresh.replay(rec), ann.labels == rec.label_id)


def test_stack_slices_cache_embeddings_and_commit_on_the_plane(model):
    counter = EncoderCounter(model)
    vol = blob_image((5, 48, 64))
    ann = Annotator(make_predictor(model), vol)
    ann.set_slice((2, None, None))
    ann.add_point((24, 30))
    c2 = ann.update()
    ref, _, _ = direct(
        make_predictor(model),
        vol[2],
        point_coords=np.array([[30.0, 24.0]]),
        point_labels=np.array([1]),
    )
    np.testing.assert_array_equal(c2.masks, ref)
    counter.count = 0
    ann.set_slice((3, None, None))
    assert ann.prompts.is_empty and ann.candidates is None
    ann.add_point((20, 20))
    ann.update()
    assert counter.count == 1
    ann.set_slice((2, None, None))  # back: prompts of slice 2 are still there
    assert len(ann.prompts.points) == 1
    ann.update()
    assert counter.count == 1  # no new encoder run
    ann.commit()
    assert ann.labels[2].any() and not ann.labels[[0, 1, 3, 4]].any()
    assert ann.records[-1].slice_key == (2, None, None)
    assert set(ann.all_prompts()) == {(3, None, None)}

    side = (None, 10, None)  # the (z, x) plane at y = 10
    ann.set_slice(side)
    assert ann.plane_shape == (5, 64)
    ann.add_point((2, 30))
    assert ann.update().masks.shape == (3, 5, 64)


def _capped_vs_uncapped(model, image, key, steps, cap):
    """Run the same prompt steps in a session capped at ``cap`` and an uncapped one."""
    out = []
    for max_side in (cap, None):
        ann = Annotator(make_predictor(model), image, display_max_side=max_side)
        ann.set_slice(key)
        history = []
        for step in steps:
            kind, *args = step
            if kind == "point":
                ann.add_point(args[0], positive=args[1])
            elif kind == "box":
                ann.set_box(args[0])
            elif kind == "select":
                ann.select(args[0])
                continue
            elif kind == "commit":
                history.append(("commit", ann.commit()))
                continue
            ann.compute_embedding()
            req = ann.prediction_request()
            ann.apply(ann.run(req))
            history.append(("cands", req, ann.candidates))
        out.append((ann, history))
    return out


@pytest.mark.parametrize(
    "shape, key, cap",
    [
        ((96, 128), (None, None), 32),  # 4 x 4 blocks
        ((97, 61), (None, None), 30),  # odd sizes: 24 x 15 masks, 4.04 x 4.07 blocks
        ((6, 70, 45), (None, 20, None), 16),  # a (z, x) plane of a stack, 6 x 45 -> 2 x 15
    ],
)
def test_capped_session_commits_exactly_the_uncapped_labels(model, shape, key, cap):
    img = blob_image(shape, centers=((30, 30, 14), (60, 40, 10)))
    plane = tuple(n for n, k in zip(shape, key, strict=True) if k is None)
    r, c = plane[0] // 2, plane[1] // 2
    steps = [
        ("point", (r, c), True),
        ("select", 0),
        ("point", (plane[0] - 3, plane[1] - 2), False),  # refines with candidate 0's logits
        ("point", (r + 1, c - 1), True),
        ("commit",),
        ("box", (1, 2, plane[0] - 2, plane[1] // 2)),
        ("select", 2),
        ("commit",),
    ]
    (capped, ch), (full, fh) = _capped_vs_uncapped(model, img, key, steps, cap)
    small = capped.display_size()
    assert max(small) <= cap and small != plane and full.display_size() == plane
    for a, b in zip(ch, fh, strict=True):
        if a[0] == "commit":
            ra, rb = a[1], b[1]
            assert (ra.label_id, ra.candidate, ra.n_pixels) == (
                rb.label_id,
                rb.candidate,
                rb.n_pixels,
            )
            assert ra.predicted_iou == rb.predicted_iou
            assert [st.uses_previous for st in ra.steps] == [st.uses_previous for st in rb.steps]
            continue
        (_, req_a, ca), (_, req_b, cb) = a, b
        # the same decoder call (refinement logits included), masks at another size
        assert req_a.mask_size == small and req_b.mask_size is None
        if req_b.mask_input is None:
            assert req_a.mask_input is None
        else:
            np.testing.assert_array_equal(req_a.mask_input, req_b.mask_input)
        np.testing.assert_array_equal(ca.logits, cb.logits)
        np.testing.assert_array_equal(ca.ious, cb.ious)
        assert ca.masks.shape == (3, *small) and cb.masks.shape == (3, *plane)
        assert ca.reduced and not cb.reduced
        assert ca.scale == (plane[0] / small[0], plane[1] / small[1])
        # the reduced masks are the predictor's at that size
        ref = make_predictor(model)
        ref.set_embedding(capped.compute_embedding(key))
        np.testing.assert_array_equal(ca.masks, ref.masks_from_logits(ca.logits, small))
    assert any(h[0] == "cands" and h[1].mask_input is not None for h in ch)  # refined
    assert capped.labels.any()
    np.testing.assert_array_equal(capped.labels, full.labels)
    # records replay at full resolution, as before
    rec = capped.records[0]
    np.testing.assert_array_equal(full.replay(rec), capped.replay(rec))
    assert capped.replay(rec).shape == plane


def test_full_mask_job_commits_reduced_candidates_computed_elsewhere(model):
    """full_mask_job gives the work for a worker thread; commit(mask=, token=) writes the
    same labels as a plain commit, and refuses a mask whose candidate is no longer the
    selected one."""
    img = blob_image((96, 128), centers=((30, 30, 14), (60, 40, 10)))
    out = []
    for use_job in (True, False):
        ann = Annotator(make_predictor(model), img, display_max_side=32)
        ann.add_point((30, 30))
        ann.update()
        assert ann.candidates.reduced
        if use_job:
            token, work = ann.full_mask_job()
            mask = work()
            assert mask.shape == (96, 128) and mask.dtype == bool
            ann.select((ann.selected + 1) % 3)  # the selection changes meanwhile
            with pytest.raises(ValueError, match="changed while the mask was computed"):
                ann.commit(mask=mask, token=token)
            assert not ann.labels.any() and ann.candidates is not None
            token, work = ann.full_mask_job()
            with pytest.raises(ValueError, match="plane is"):
                ann.commit(mask=work()[:-1], token=token)
            rec = ann.commit(mask=work(), token=token)
        else:
            ann.select((ann.selected + 1) % 3)
            rec = ann.commit()
        out.append((rec.candidate, rec.n_pixels, ann.labels.copy()))
    assert out[0][:2] == out[1][:2] and out[0][1] > 0
    np.testing.assert_array_equal(out[0][2], out[1][2])
    # nothing to do off the UI thread at full resolution
    full = Annotator(make_predictor(model), img)
    full.add_point((30, 30))
    full.update()
    assert full.full_mask_job() is None


def test_display_size_default_and_settings(model):
    img = blob_image((2000, 100), centers=((1000, 50, 30),))
    ann = Annotator(make_predictor(model), img)  # default display_max_side
    assert ann.display_max_side == 1024 and ann.display_size() == (1000, 50)
    ann.add_point((1000, 50))
    cands = ann.update()
    assert cands.masks.shape == (3, 1000, 50) and cands.scale == (2.0, 2.0)
    full = ann.candidate_mask()
    assert full.shape == (2000, 100)
    rec = ann.commit()
    np.testing.assert_array_equal(ann.labels == rec.label_id, full)
    assert Annotator(make_predictor(model), img, display_max_side=0).display_size() == (2000, 100)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="display_max_side"):
            Annotator(make_predictor(model), img, display_max_side=bad)


@pytest.mark.parametrize("channels", [3, 4])
def test_rgb_images(predictor, channels):
    img = blob_image((40, 50), rgb=True)
    if channels == 4:
        img = np.concatenate([img, np.full(img.shape[:2] + (1,), 7, img.dtype)], axis=-1)
    ann = Annotator(predictor, img, rgb=True)
    assert ann.shape == (40, 50) and ann.labels.shape == (40, 50)
    ann.add_point((20, 25))
    masks = ann.update().masks
    ref, _, _ = direct(
        make_predictor(predictor.model),
        img[..., :3],
        point_coords=np.array([[25.0, 20.0]]),
        point_labels=np.array([1]),
    )
    np.testing.assert_array_equal(masks, ref)


def test_bad_prompts_and_images(predictor):
    ann = Annotator(predictor, blob_image((40, 50)))
    with pytest.raises(ValueError, match="outside the image plane"):
        ann.add_point((45, 10))
    with pytest.raises(ValueError, match="zero area"):
        ann.set_box([10, 10, 10, 30])
    with pytest.raises(ValueError, match="outside the image plane"):
        ann.set_box([100, 100, 120, 130])
    ann.set_box([-20, 10, 30, 80])  # partly outside: clipped
    np.testing.assert_array_equal(ann.prompts.box, [-0.5, 10, 30, 49.5])
    with pytest.raises(ValueError, match="labels"):
        ann.set_prompts([[1, 1]], [1, 1])
    with pytest.raises(ValueError, match="4D images are not supported"):
        Annotator(predictor, np.zeros((2, 3, 20, 20)))
    with pytest.raises(ValueError, match="labels shape"):
        Annotator(predictor, np.zeros((20, 20)), labels=np.zeros((20, 21), np.uint16))
    with pytest.raises(TypeError, match="integer dtype"):
        Annotator(predictor, np.zeros((20, 20)), labels=np.zeros((20, 20)))


def test_worker_thread_encoding_with_a_separate_decoder(model):
    """Encode slice 1 in a thread while the decoder works on slice 0."""
    vol = blob_image((2, 48, 64))
    ann = Annotator(make_predictor(model), vol, encoder=make_predictor(model))
    ann.add_point((24, 30))
    ann.update()
    before = ann.candidates.masks.copy()
    t = threading.Thread(target=ann.compute_embedding, args=((1, None, None),))
    t.start()
    for _ in range(3):
        ann.add_point((24, 31 + _))
        req = ann.prediction_request()
        assert ann.apply(ann.run(req))
    t.join()
    assert ann.has_embedding((1, None, None)) and ann.encoder_runs == 2
    ann.set_prompts([[24, 30]])
    ann.update()
    np.testing.assert_array_equal(ann.candidates.masks, before)


def test_stale_results_are_dropped(predictor):
    vol = blob_image((2, 48, 64))
    ann = Annotator(predictor, vol)
    ann.add_point((24, 30))
    ann.compute_embedding()
    req_old = ann.prediction_request()
    ann.add_point((10, 10))
    req_new = ann.prediction_request()
    assert ann.apply(ann.run(req_new))
    assert not ann.apply(ann.run(req_old))  # older than what is shown
    assert ann.up_to_date
    req = ann.prediction_request() or ann.prediction_request()
    assert req is None
    ann.add_point((12, 12))
    req = ann.prediction_request()
    ann.set_slice((1, None, None))
    assert not ann.apply(ann.run(req))  # another slice now


def test_cache_is_lru_by_bytes(model):
    vol = blob_image((4, 32, 32))
    ann = Annotator(make_predictor(model), vol, cache_bytes=1)
    for z in range(3):
        ann.compute_embedding((z, None, None))
    assert ann.cached_slices() == [(2, None, None)]  # always keeps the newest
    one = ann._cache[(2, None, None)][1]
    h, w = model.prompt_encoder.image_embedding_size
    assert one >= 256 * h * w * 4  # the features tensor at least
    ann.cache_bytes = 2 * one
    ann.compute_embedding((0, None, None))
    ann.compute_embedding((2, None, None))  # touch: most recent
    ann.compute_embedding((3, None, None))
    assert ann.cached_slices() == [(2, None, None), (3, None, None)]


def test_records_replay_through_the_session_format(model):
    """A session built from the annotator's records replays to the committed labels."""
    from napari_sam.annotator import to_session_object
    from napari_sam.io.session import SessionRecord, replay

    vol = blob_image((3, 48, 64))
    ann = Annotator(make_predictor(model), vol, overlap="overwrite")
    ann.set_slice((1, None, None))
    ann.add_point((24, 30))
    ann.update()
    ann.select(0)
    ann.add_point((5, 5), positive=False)  # refinement step
    ann.update()
    ann.commit()
    ann.set_slice((2, None, None))
    ann.set_prompts([[20, 20]], box=[10, 10, 40, 50])
    ann.update()
    ann.commit()
    session = SessionRecord(
        objects=[to_session_object(r) for r in ann.records],
        image_shape=ann.shape,
        paint="overwrite",
    )
    assert [p.use_previous_mask for p in session.objects[0].prompts] == [False, True]
    labels = replay(session, make_predictor(model), vol)
    np.testing.assert_array_equal(labels, ann.labels)


def test_attached_store_shares_embeddings_both_ways(model):
    from napari_sam.embeddings import EmbeddingStore

    vol = blob_image((5, 48, 64))
    counter = EncoderCounter(model)
    ann = Annotator(make_predictor(model), vol, encoder=make_predictor(model))
    store = EmbeddingStore(vol, ann.encoder, axis=0, dtype="float32", weights_hash="x")
    ann.attach_store(store)
    store.precompute([1, 2])  # e.g. propagation or "Precompute stack"
    runs = counter.count
    ann.set_slice((2, None, None))
    assert ann.has_embedding()
    ann.add_point((24, 30))
    cands = ann.update()
    assert counter.count == runs  # embedded by the store: no encoder run here
    ref = make_predictor(model)
    masks, _, _ = direct(ref, vol[2], point_coords=np.array([[30.0, 24.0]]),
                         point_labels=np.array([1]))  # fmt: skip
    np.testing.assert_array_equal(cands.masks, masks)  # float32 store: same candidates
    runs = counter.count  # (after the reference's own encoder run)
    ann.set_slice((4, None, None))
    ann.compute_embedding()
    assert store.is_done(4) and ann.encoder_runs == 1 and counter.count == runs + 1
    ann.set_slice((None, 10, None))  # another axis: the session's own cache
    ann.compute_embedding()
    assert ann.cached_slices() == [(None, 10, None)] and store.missing() == [0, 3]
    with pytest.raises(ValueError, match="2D"):
        Annotator(make_predictor(model), vol[0]).attach_store(store)


def test_external_edits_share_the_undo_history(predictor):
    ann = Annotator(predictor, blob_image((3, 48, 48), centers=((24, 24, 10),)))
    ann.set_slice((1, None, None))
    ann.add_point((24, 24))
    ann.update()
    rec = ann.commit()
    assert ann.last_commit_on() is rec and ann.last_commit_on((0, None, None)) is None
    assert ann.committed_slices(rec.label_id, 0) == [1]
    assert ann.committed_slices(rec.label_id, 1) == []
    log = []
    ann.push_edit(lambda: log.append("undo"), lambda: log.append("redo"), "propagate")
    assert ann.undo() == "propagate" and log == ["undo"]
    assert ann.labels[1].any()  # the commit is still there
    assert ann.redo() == "propagate" and log == ["undo", "redo"]
    ann.undo()
    ann.undo()  # now the commit
    assert not ann.labels.any() and ann.committed_slices(rec.label_id, 0) == []
    assert ann.last_commit_on() is None

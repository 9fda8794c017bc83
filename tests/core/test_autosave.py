"""Autosave of an annotation session: every commit / undo / redo reaches the recovery
store, and a restore rebuilds the labels and the object records exactly."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from napari_sam.annotator import Annotator, autosave_change, from_session_object
from napari_sam.io.recovery import Autosave, AutosaveError, RecoveryStore
from tiny_sam import blob_image, make_predictor, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def commit_at(ann, key, rc, **kw):
    """Commit the largest candidate for a point (an untrained model: any non-empty mask)."""
    ann.set_slice(key)
    ann.add_point(rc)
    cands = ann.update()
    ann.select(int(np.argmax(cands.masks.reshape(3, -1).sum(1))))
    return ann.commit(**kw)


def record_fields(r):
    return (
        r.label_id,
        tuple(r.slice_key),
        r.points.tolist(),
        r.point_labels.tolist(),
        None if r.box is None else r.box.tolist(),
        r.candidate,
        r.overlap,
        r.n_pixels,
        r.uid,
        [(s.points.tolist(), s.labels.tolist(), s.candidate, s.uses_previous) for s in r.steps],
    )


def check_restores(ann, root):
    state = RecoveryStore(next(p.name for p in root.iterdir()), root=root).restore()
    np.testing.assert_array_equal(state.labels, ann.labels)
    assert state.damaged == []
    restored = [from_session_object(o, ann.shape) for o in state.session.objects]
    assert [record_fields(r) for r in restored] == [record_fields(r) for r in ann.records]
    return state, restored


@pytest.mark.parametrize("threaded", [False, True])
def test_commits_undo_redo_are_restored_exactly(model, tmp_path, threaded):
    vol = blob_image((4, 48, 64))
    ann = Annotator(make_predictor(model), vol)
    pool = ThreadPoolExecutor(1) if threaded else None
    saver = Autosave(vol, ann.shape, name="stack", root=tmp_path, executor=pool)
    found = saver.lookup(ann.labels).result()
    assert not found.offer and found.state is None and not saver.needs_snapshot
    assert not (tmp_path / found.key).exists()  # nothing written before the first commit

    futures = []

    def step(fn, *args, **kw):
        out = fn(*args, **kw)
        futures.append(autosave_change(saver, ann))
        return out

    step(commit_at, ann, (1, None, None), (24, 30))
    step(commit_at, ann, (1, None, None), (20, 20), overlap="overwrite")  # takes 1's pixels
    step(commit_at, ann, (2, None, None), (24, 30), label_id=1)  # object 1 grows onto z=2
    step(ann.undo)
    step(ann.redo)
    step(ann.undo)
    step(commit_at, ann, (3, None, None), (30, 40))
    ann.add_point((5, 5))
    step(ann.undo)  # a prompt edit: nothing to write
    assert futures[-1] is None
    paths = [f.result() for f in futures if f is not None]
    assert len(paths) == 7 and all(p.name.endswith(".npz") and "-patch-" in p.name for p in paths)
    # each record holds one plane's box, never the volume
    for p in paths:
        with np.load(p) as z:
            assert z["values"].shape[0] == 1 and z["values"].size <= 48 * 64
    assert [r.label_id for r in ann.records] == [1, 2, 3]
    state, restored = check_restores(ann, tmp_path)
    assert state.object_ids == [1, 2, 3]
    # the restored records replay to the committed masks (same model)
    for rec, orig in zip(restored, ann.records, strict=True):
        np.testing.assert_array_equal(ann.replay(rec), ann.replay(orig))
    # a new session on the same image with the same labels: nothing to offer
    again = Autosave(vol, ann.shape, root=tmp_path, executor=pool)
    found = again.lookup(ann.labels.copy()).result()
    assert found.same and not found.offer and not again.needs_snapshot
    if pool is not None:
        pool.shutdown()


def test_restart_offers_restore_then_accept_or_discard(model, tmp_path):
    img = blob_image((64, 96))
    ann = Annotator(make_predictor(model), img)
    saver = Autosave(img, ann.shape, root=tmp_path)
    saver.lookup(ann.labels).result()
    for rc in ((40, 50), (60, 95)):
        commit_at(ann, (None, None), rc)
        autosave_change(saver, ann).result()

    # "restart": a new annotator on the same image (a copy of its data)
    new = Annotator(make_predictor(model), img.copy())
    saver2 = Autosave(img.copy(), new.shape, root=tmp_path)
    found = saver2.lookup(new.labels).result()
    assert found.offer and found.state.object_ids == [1, 2] and found.key == saver.key
    records = [from_session_object(o, new.shape) for o in found.state.session.objects]
    new.restore_objects(found.state.labels, records)
    saver2.accept().result()
    np.testing.assert_array_equal(new.labels, ann.labels)
    assert new.next_id == 3 and [r.uid for r in new.records] == [r.uid for r in ann.records]
    # work goes on in the same store: a commit, its undo
    commit_at(new, (None, None), (10, 10), overlap="overwrite")
    autosave_change(saver2, new).result()
    check_restores(new, tmp_path)
    new.undo()
    assert new.last_change.kind == "undo"
    autosave_change(saver2, new).result()
    check_restores(new, tmp_path)

    # another restart, this time discarded: the folder goes
    saver3 = Autosave(img, new.shape, root=tmp_path)
    assert saver3.lookup(np.zeros(new.shape, np.uint32)).result().offer
    saver3.discard().result()
    assert list(tmp_path.iterdir()) == []


def test_existing_labels_are_saved_whole_first(model, tmp_path):
    img = blob_image((64, 96))
    loaded = np.zeros((64, 96), np.uint32)
    loaded[5:15, 5:25] = 7  # e.g. labels opened from a file
    ann = Annotator(make_predictor(model), img, labels=loaded)
    saver = Autosave(img, ann.shape, root=tmp_path)
    saver.lookup(ann.labels).result()
    assert saver.needs_snapshot
    commit_at(ann, (None, None), (40, 50))
    path = autosave_change(saver, ann).result()
    assert "-snapshot-" in path.name and not saver.needs_snapshot
    commit_at(ann, (None, None), (60, 95))
    assert "-patch-" in autosave_change(saver, ann).result().name
    state = RecoveryStore(saver.key, root=tmp_path).restore()
    np.testing.assert_array_equal(state.labels, ann.labels)
    assert state.object_ids == [7, 8, 9]


def test_failed_write_is_reported_and_the_next_one_writes_everything(model, tmp_path):
    img = blob_image((64, 96))
    ann = Annotator(make_predictor(model), img)
    root = tmp_path / "recovery"
    root.write_text("a file where the recovery folder should be")
    pool = ThreadPoolExecutor(1)
    saver = Autosave(img, ann.shape, root=root, executor=pool)
    saver.lookup(ann.labels).result()
    commit_at(ann, (None, None), (40, 50))
    first = autosave_change(saver, ann)
    with pytest.raises(AutosaveError, match="could not write the recovery folder") as e:
        first.result()
    assert str(root) in str(e.value) and saver.needs_snapshot
    root.unlink()  # the user fixes the folder
    commit_at(ann, (None, None), (60, 95))
    path = autosave_change(saver, ann).result()
    assert "-snapshot-" in path.name
    state = RecoveryStore(saver.key, root=root).restore()
    np.testing.assert_array_equal(state.labels, ann.labels)
    assert [o.extra["uid"] for o in state.session.objects] == [r.uid for r in ann.records]
    pool.shutdown()


CHILD = """
import hashlib, sys
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
from napari_sam.annotator import Annotator, autosave_change
from napari_sam.io.recovery import Autosave
from tiny_sam import blob_image, make_predictor, tiny_model

vol = blob_image((6, 48, 64))
ann = Annotator(make_predictor(tiny_model(0)), vol, overlap="overwrite")
# the widget's code path: Autosave on a single-thread executor, autosave_change per commit
saver = Autosave(vol, ann.shape, name="stack", root=sys.argv[1], executor=ThreadPoolExecutor(1))
saver.lookup(ann.labels).result()
rng = np.random.default_rng(0)
n = 0
while True:
    ann.set_slice((int(rng.integers(0, 6)), None, None))
    ann.add_point((int(rng.integers(4, 44)), int(rng.integers(4, 60))))
    cands = ann.update()
    ann.select(int(np.argmax(cands.masks.reshape(3, -1).sum(1))))
    try:
        ann.commit()
    except ValueError:
        ann.clear()
        continue
    autosave_change(saver, ann).result()  # on disk: only now does the commit count as done
    n += 1
    digest = hashlib.sha1(ann.labels.astype(np.uint32).tobytes()).hexdigest()
    print("COMMITTED", n, digest, flush=True)
"""


@pytest.mark.parametrize("kill_after", [2, 6])
def test_annotator_killed_mid_session_restores_every_commit(tmp_path, kill_after):
    """A process annotates through Annotator + Autosave (the widget's code path), is
    SIGKILLed while it goes on committing, and a restart restores every commit whose
    autosave had returned (at most the one in flight may be there too), exactly."""
    import hashlib
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": str(Path(tests).parent / "src"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), tests],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    digests = {}
    try:
        while len(digests) < kill_after + 1:  # read one line more: it is busy with the next
            line = child.stdout.readline()
            if not line:
                break
            if line.startswith("COMMITTED"):
                _, n, digest = line.split()
                digests[int(n)] = digest
        os.kill(child.pid, signal.SIGKILL)
        committed = max(digests)
        for line in child.stdout:  # commits that returned before the kill landed
            if line.startswith("COMMITTED"):
                _, n, digest = line.split()
                digests[int(n)] = digest
                committed = int(n)
    finally:
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL and committed >= kill_after + 1
    # the restart, in this process: a new session on the same image
    vol = blob_image((6, 48, 64))
    saver = Autosave(vol, (6, 48, 64), root=tmp_path)
    found = saver.lookup(np.zeros((6, 48, 64), np.uint32)).result()
    assert found.offer and found.state.damaged == []
    got = hashlib.sha1(found.state.labels.astype(np.uint32).tobytes()).hexdigest()
    n_objects = len(found.state.session.objects)
    assert n_objects in (committed, committed + 1)
    if n_objects == committed:
        assert got == digests[committed]
    assert [o.object_id for o in found.state.session.objects] == list(range(1, n_objects + 1))

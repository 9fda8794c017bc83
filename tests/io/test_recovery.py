"""Recovery store: commit/delete/restore semantics and a real SIGKILL crash test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pytest

from napari_sam.io.recovery import RecoveryStore, image_key, list_recoverable, recovery_root
from napari_sam.io.session import ObjectRecord, PromptRecord, SessionRecord

SRC = str(Path(__file__).parents[2] / "src")


def _disk(shape, center, radius):
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, center, strict=True)) <= radius**2


def test_commit_delete_restore(tmp_path):
    store = RecoveryStore(
        "img1",
        shape=(30, 40),
        root=tmp_path,
        image_name="cells",
        session=SessionRecord(model="vit_t"),
    )
    a, b = _disk((30, 40), (10, 10), 6), _disk((30, 40), (14, 16), 6)
    rec = ObjectRecord(1, [PromptRecord(points=[(10, 10)], point_labels=[1])], model="vit_t")
    store.commit(1, a, record=rec)
    store.commit(2, b)  # overwrites 1 where they overlap
    expected = np.zeros((30, 40), np.uint8)
    expected[a] = 1
    expected[b] = 2
    state = RecoveryStore("img1", root=tmp_path).restore()
    np.testing.assert_array_equal(state.labels, expected)
    assert [o.object_id for o in state.session.objects] == [1, 2]
    assert state.session.objects[0] == rec and state.session.model == "vit_t"
    assert state.session.image_name == "cells" and state.session.image_shape == (30, 40)
    # re-commit of object 1 with a smaller mask replaces it entirely
    small = _disk((30, 40), (5, 5), 2)
    store.commit(1, small[2:9, 1:9], offset=(2, 1))
    store.delete(2)
    store.commit(700, _disk((30, 40), (25, 30), 3))
    state = store.restore()
    expected = np.zeros((30, 40), np.uint16)
    expected[small] = 1
    expected[_disk((30, 40), (25, 30), 3)] = 700
    np.testing.assert_array_equal(state.labels, expected)
    assert state.labels.dtype == np.uint16
    assert [o.object_id for o in state.session.objects] == [1, 700]
    info = list_recoverable(tmp_path)
    assert [(i.key, i.image_name, i.shape, i.n_commits) for i in info] == [
        ("img1", "cells", (30, 40), 4)
    ]
    store.clear()
    assert list_recoverable(tmp_path) == [] and not (tmp_path / "img1").exists()


def test_bad_commits(tmp_path):
    store = RecoveryStore("k", shape=(10, 10), root=tmp_path)
    with pytest.raises(ValueError, match="differs from the labels shape"):
        store.commit(1, np.ones((9, 10), bool))
    with pytest.raises(ValueError, match="does not fit"):
        store.commit(1, np.ones((5, 5), bool), offset=(7, 0))
    with pytest.raises(ValueError, match="0 is background"):
        store.commit(0, np.ones((10, 10), bool))
    with pytest.raises(ValueError, match="must be boolean"):
        store.commit(1, np.full((10, 10), 3))
    with pytest.raises(ValueError, match="another image"):
        RecoveryStore("k", shape=(10, 11), root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no recovery store"):
        RecoveryStore("missing", root=tmp_path)
    with pytest.raises(ValueError, match="recovery key"):
        RecoveryStore("../escape", shape=(2, 2), root=tmp_path)
    assert len(store) == 0


def test_damaged_record_is_skipped_and_reported(tmp_path):
    store = RecoveryStore("k", shape=(10, 10), root=tmp_path)
    m = np.zeros((10, 10), bool)
    m[2:4, 2:4] = True
    store.commit(1, m)
    (store.path / "0000000002-1-commit-2.npz").write_bytes(b"PK\x03\x04 truncated")
    state = store.restore()
    assert state.labels.sum() == 4 and len(state.damaged) == 1
    assert "0000000002-1-commit-2.npz" in state.damaged[0]


def test_image_key():
    a = np.arange(2 * 30 * 40, dtype=np.uint16).reshape(2, 30, 40)
    k = image_key(a)
    assert k == image_key(a.copy()) == image_key(da.from_array(a, chunks=(1, 10, 40)))
    b = a.copy()
    b[1, 29, 39] += 1
    assert image_key(b) != k and image_key(a.astype(np.int32)) != k and image_key(a, "x") != k


def test_recovery_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path))
    assert recovery_root() == tmp_path / "recovery"


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from napari_sam.io.recovery import RecoveryStore, image_key
    from napari_sam.io.session import ObjectRecord, PromptRecord, SessionRecord

    root, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (8, 96, 128)).astype(np.uint16)
    store = RecoveryStore(image_key(image), shape=(8, 96, 128), root=root,
                          image_name="stack", session=SessionRecord(model="vit_t"))
    print("KEY", store.key, flush=True)
    for oid in range(1, n + 1):
        # a real (noisy, poorly compressible) object: threshold of a random field in a box
        z, r, c = oid % 8, rng.integers(0, 70), rng.integers(0, 100)
        mask = np.zeros((8, 96, 128), bool)
        mask[z, r:r + 26, c:c + 28] = rng.random((26, 28))[: 96 - r, : 128 - c] > 0.3
        rec = ObjectRecord(oid, [PromptRecord(points=[(r + 5, c + 5)], point_labels=[1],
                                              slice_index=int(z))], model="vit_t")
        store.commit(oid, mask, record=rec)
        print("COMMITTED", oid, flush=True)
    print("DONE", flush=True)
    """
)


def _expected(n):
    """The labels after objects 1..n, computed here independently of the child."""
    rng = np.random.default_rng(0)
    rng.integers(0, 4000, (8, 96, 128))
    labels = np.zeros((8, 96, 128), np.uint16)
    for oid in range(1, n + 1):
        z, r, c = oid % 8, rng.integers(0, 70), rng.integers(0, 100)
        m = rng.random((26, 28))[: 96 - r, : 128 - c] > 0.3
        region = labels[z, r : r + 26, c : c + 28]
        region[region == oid] = 0
        region[m] = oid
    return labels


@pytest.mark.parametrize("kill_after", [3, 11])
def test_sigkill_mid_session_loses_no_committed_object(tmp_path, kill_after):
    """A child annotates through the core API and is SIGKILLed while still committing;
    a new process restores every object whose commit had returned, exactly."""
    env = {**os.environ, "PYTHONPATH": SRC}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), "100000"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    committed = 0
    key = None
    deadline = time.monotonic() + 60
    try:
        while committed < kill_after and time.monotonic() < deadline:
            line = child.stdout.readline()
            if line.startswith("KEY"):
                key = line.split()[1]
            elif line.startswith("COMMITTED"):
                committed = int(line.split()[1])
        os.kill(child.pid, signal.SIGKILL)  # mid-session: it is busy writing the next ones
    finally:
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL and committed == kill_after
    # "next start": a fresh process lists and restores
    code = textwrap.dedent(
        f"""
        import json, numpy as np
        from napari_sam.io.recovery import RecoveryStore, list_recoverable
        infos = list_recoverable({str(tmp_path)!r})
        state = RecoveryStore(infos[0].key, root={str(tmp_path)!r}).restore()
        np.save({str(tmp_path / "restored.npy")!r}, state.labels)
        print(json.dumps({{"keys": [i.key for i in infos], "ids": [o.object_id for o in
              state.session.objects], "damaged": state.damaged,
              "model": state.session.objects[0].model}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    import json

    result = json.loads(out.stdout)
    assert result["keys"] == [key] and result["damaged"] == [] and result["model"] == "vit_t"
    ids = result["ids"]
    # every commit that returned before the kill is there; at most the one being written
    # when the kill came may also be there (its rename had happened), never half of one
    assert ids[:committed] == list(range(1, committed + 1))
    assert len(ids) in (committed, committed + 1)
    restored = np.load(tmp_path / "restored.npy")
    np.testing.assert_array_equal(restored, _expected(len(ids)))

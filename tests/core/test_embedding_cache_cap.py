"""The GUI's embedding cache: size cap, LRU pruning, stores in use, usage and `napari-sam cache`."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from napari_sam.cli import main as cli
from napari_sam.embedding_cache import (
    ENV_MAX_GB,
    LEASE_DIR,
    acquire_lease,
    cache_usage,
    max_cache_bytes,
    prune_cache,
)
from napari_sam.embeddings import EmbeddingStore, default_store_path, open_cached_store
from volume_helpers import (  # noqa: F401 (torch_one_thread: autouse fixture)
    ellipsoid_volume,
    tiny_predictor,
    torch_one_thread,
)

SRC = str(Path(__file__).parents[2] / "src")
GIB = 2**30


@pytest.fixture(scope="module")
def predictor():
    return tiny_predictor(seed=0)


@pytest.fixture(scope="module")
def base():
    return ellipsoid_volume(shape=(6, 32, 32))[0]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_MAX_GB, raising=False)
    return tmp_path / "embeddings"


def _open(root, predictor, base, i, max_bytes=None):
    """The cached store of stack ``base + i`` with slices 0 and 1 embedded (held open)."""
    store, note = open_cached_store(
        base + i, predictor, axis=0, model_name="tiny", root=root, max_bytes=max_bytes
    )
    store.precompute([0, 1])
    return store


def _closed(root, predictor, base, i, used_at):
    """Like :func:`_open`, then released, last used at ``used_at`` (epoch seconds)."""
    path = _open(root, predictor, base, i).path
    gc.collect()  # the store object is gone: no longer in use
    os.utime(path, (used_at, used_at))
    return path


def _names(root):
    return sorted(s.path.name for s in cache_usage(root))


@pytest.mark.parametrize("how", ["argument", "env"])
def test_least_recently_used_stores_go_first(root, predictor, base, monkeypatch, how):
    now = time.time()
    ages = {0: 400, 1: 100, 2: 500, 3: 200}  # seconds since each store was used
    paths = {i: _closed(root, predictor, base, i, now - age) for i, age in ages.items()}
    usage = cache_usage(root)
    assert [s.path for s in usage] == [paths[2], paths[0], paths[3], paths[1]]
    assert not any(s.in_use for s in usage)
    assert all(s.info["model_name"] == "tiny" for s in usage)
    size = {s.path: s.nbytes for s in usage}
    assert min(size.values()) > 2 * 4 * 32 * 32  # at least the two slices' features
    # room for the two most recent ones and the new (metadata only) store, not a third
    cap = size[paths[3]] + size[paths[1]] + min(size.values()) // 2
    if how == "env":
        monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", str(root))
        monkeypatch.setenv(ENV_MAX_GB, repr(cap / GIB))
        new, note = open_cached_store(base + 9, predictor, axis=0, model_name="tiny")
    else:
        new, note = open_cached_store(
            base + 9, predictor, axis=0, model_name="tiny", root=root, max_bytes=cap
        )
    assert "removed 2 least recently used store(s)" in note and ENV_MAX_GB in note
    assert not paths[2].exists() and not paths[0].exists()
    assert _names(root) == sorted(p.name for p in (paths[3], paths[1], new.path))
    assert sum(s.nbytes for s in cache_usage(root)) <= cap
    assert new.get(3).features.shape[0] == 1  # the new store works


def test_opening_a_store_marks_it_used(root, predictor, base):
    now = time.time()
    old = _closed(root, predictor, base, 0, now - 300)
    recent = _closed(root, predictor, base, 1, now - 200)
    assert [s.path for s in cache_usage(root)] == [old, recent]
    again = _open(root, predictor, base, 0)
    assert again.path == old and again.encoder_runs == 0  # reused, not recomputed
    del again
    gc.collect()
    assert [s.path for s in cache_usage(root)] == [recent, old]
    assert prune_cache(1, root)[0].path == recent  # the least recently used goes first


def test_stores_in_use_in_this_process_are_never_deleted(root, predictor, base):
    now = time.time()
    held = _open(root, predictor, base, 0)  # from open_cached_store, still referenced
    os.utime(held.path, (now - 900, now - 900))
    direct_path = root / ("b" * 32 + ".zarr")  # opened without open_cached_store
    direct = EmbeddingStore(base + 1, predictor, direct_path, dtype="float32")
    direct.precompute([0])
    os.utime(direct_path, (now - 800, now - 800))
    closed = [_closed(root, predictor, base, i, now - 100 * i) for i in (2, 3)]

    new, note = open_cached_store(
        base + 4, predictor, axis=0, model_name="tiny", root=root, max_bytes=0
    )
    assert "removed 2" in note and not any(p.exists() for p in closed)
    assert _names(root) == sorted(p.name for p in (held.path, direct_path, new.path))
    assert {s.path for s in cache_usage(root) if s.in_use} == {
        held.path,
        direct_path,
        new.path,
    }
    # released stores can go; a second object on the same store keeps it in use
    twin = EmbeddingStore(base + 1, predictor, direct_path, dtype="float32")
    held_path = held.path
    del held, direct
    gc.collect()
    assert [s.path for s in prune_cache(0, root)] == [held_path]
    assert direct_path.exists() and twin.get(0).features.shape[0] == 1
    del twin
    gc.collect()
    assert [s.path for s in prune_cache(0, root)] == [direct_path]
    assert _names(root) == [new.path.name]


def test_a_closed_store_is_no_longer_in_use(root, predictor, base):
    store = _open(root, predictor, base, 0)
    assert cache_usage(root)[0].in_use and len(os.listdir(root / LEASE_DIR)) == 1
    assert store.cache_nbytes == 0  # precompute keeps disk slices out of the LRU
    store.get(0)
    assert store.cache_nbytes > 0
    store.close()
    store.close()  # idempotent
    assert not cache_usage(root)[0].in_use and os.listdir(root / LEASE_DIR) == []
    assert store.cache_nbytes == 0
    assert [s.path for s in prune_cache(0, root)] == [store.path]


def test_nothing_outside_the_cache_stores_is_touched(tmp_path, root, predictor, base):
    import zarr

    now = time.time()
    mine = _closed(root, predictor, base, 0, now - 50)
    beside = default_store_path(tmp_path / "image.tif", key="tiny")  # next to an image
    EmbeddingStore(base + 1, predictor, beside).precompute([0])
    gc.collect()
    os.utime(beside, (now - 9000, now - 9000))
    (root / "notes.txt").write_text("my notes")
    (root / "mine.zarr").mkdir()
    (root / "mine.zarr" / "data").write_text("x")
    foreign = root / ("a" * 32 + ".zarr")  # our kind of name, someone else's zarr group
    zarr.open_group(foreign, mode="w").attrs["owner"] = "someone else"
    nested = root / "sub" / mine.name
    nested.mkdir(parents=True)
    (nested / "zarr.json").write_text((mine / "zarr.json").read_text())

    assert _names(root) == [mine.name]
    assert [s.path for s in prune_cache(0, root)] == [mine]
    assert (root / "notes.txt").read_text() == "my notes"
    assert (root / "mine.zarr" / "data").read_text() == "x"
    assert zarr.open_group(foreign, mode="r").attrs["owner"] == "someone else"
    assert (nested / "zarr.json").exists() and (beside / "zarr.json").exists()
    assert prune_cache(0, beside.parent) == []  # not a cache folder: nothing there is ours
    assert beside.exists()


def test_a_store_leased_by_another_process_is_kept_until_it_dies(root, predictor, base):
    path = _closed(root, predictor, base, 0, time.time() - 1000)
    code = (
        "import sys; from napari_sam.embedding_cache import acquire_lease;"
        "acquire_lease(sys.argv[1]); print('leased', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert proc.stdout.readline().strip() == "leased"
        assert cache_usage(root)[0].in_use
        assert prune_cache(0, root) == [] and path.exists()
    finally:
        proc.kill()  # dies without releasing: its lease is left behind
        proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    assert len(os.listdir(root / LEASE_DIR)) == 1
    assert [s.path for s in prune_cache(0, root)] == [path]
    assert os.listdir(root / LEASE_DIR) == []  # the stale lease went too


def test_a_store_leased_between_scan_and_rename_is_put_back(root, predictor, base):
    from napari_sam.embedding_cache import _discard

    path = _closed(root, predictor, base, 0, time.time() - 1000)
    before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))
    release = acquire_lease(path)  # another user arrives after prune listed the stores
    assert _discard(path) is None
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before
    assert [p.name for p in root.iterdir() if "deleting" in p.name] == []
    release()
    trash = _discard(path)
    assert trash is not None and trash.exists() and not path.exists()


def test_leases_from_another_machine_expire_after_a_day(root, predictor, base):
    path = _closed(root, predictor, base, 0, time.time() - 1000)
    lease = root / LEASE_DIR / f"{path.name}.1.remote"
    lease.parent.mkdir(exist_ok=True)
    lease.write_text(json.dumps({"host": "another-machine", "pid": 1}))
    assert prune_cache(0, root) == [] and path.exists()
    two_days_ago = time.time() - 2 * 86400
    os.utime(lease, (two_days_ago, two_days_ago))
    assert [s.path for s in prune_cache(0, root)] == [path] and not lease.exists()


def test_own_lease_is_released_with_the_store(root, predictor, base):
    store = _open(root, predictor, base, 0)
    assert len(os.listdir(root / LEASE_DIR)) == 1
    release = acquire_lease(store.path)  # a second user of the same store
    del store
    gc.collect()
    assert len(os.listdir(root / LEASE_DIR)) == 1 and cache_usage(root)[0].in_use
    release()
    release()  # idempotent
    assert os.listdir(root / LEASE_DIR) == [] and not cache_usage(root)[0].in_use


def test_interrupted_deletions_and_damaged_stores_are_cleaned_up(root, predictor, base):
    path = _closed(root, predictor, base, 0, time.time())
    trash = root / f"{'c' * 32}.zarr.deleting-0123abcd"  # a deletion cut short
    (trash / "features").mkdir(parents=True)
    (trash / "features" / "chunk").write_bytes(b"\0" * 100)
    assert prune_cache(None, root) == [] and not trash.exists() and path.exists()
    # a store whose metadata vanished (its files were deleted while in use): recreated in
    # place, not a reason to fall back to memory
    (path / "zarr.json").unlink()
    assert _names(root) == [path.name] and cache_usage(root)[0].info == {}
    store, note = open_cached_store(base, predictor, axis=0, model_name="tiny", root=root)
    assert store.path == path and note == ""
    assert store.missing([0, 1]) == [0, 1] and store.get(0).features.shape[0] == 1


@pytest.mark.parametrize(
    "value, expected",
    [
        ("", 20 * GIB),
        ("5", 5 * GIB),
        (" 0.5GB ", GIB // 2),
        ("2 GiB", 2 * GIB),
        ("1g", GIB),
        ("0", None),
        ("off", None),
        ("OFF", None),
        ("unlimited", None),
    ],
)
def test_max_gb_values(value, expected, monkeypatch):
    assert max_cache_bytes(value) == expected
    monkeypatch.setenv(ENV_MAX_GB, value)
    assert max_cache_bytes() == expected


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "20 TB", "1e"])
def test_bad_max_gb_values_name_the_variable(value, monkeypatch):
    monkeypatch.setenv(ENV_MAX_GB, value)
    with pytest.raises(ValueError) as err:
        max_cache_bytes()
    assert ENV_MAX_GB in str(err.value) and repr(value) in str(err.value)
    assert f"e.g. {ENV_MAX_GB}=20" in str(err.value)


def test_bad_max_gb_in_the_gui_path_is_a_note_and_the_default_cap(
    root, predictor, base, monkeypatch
):
    old = _closed(root, predictor, base, 0, time.time() - 100)
    monkeypatch.setenv(ENV_MAX_GB, "lots")
    store, note = open_cached_store(base + 1, predictor, axis=0, model_name="tiny", root=root)
    assert store.path is not None and store.path.parent == root
    assert f"{ENV_MAX_GB}='lots'" in note and "using the default, 20 GB" in note
    assert old.exists()  # far under 20 GB: nothing removed


def test_cli_lists_and_prunes(root, predictor, base, monkeypatch, capsys):
    now = time.time()
    held = _open(root, predictor, base, 0)
    os.utime(held.path, (now - 900, now - 900))  # oldest, but in use
    oldest = _closed(root, predictor, base, 1, now - 500)
    newer = _closed(root, predictor, base, 2, now - 100)
    monkeypatch.setenv("NAPARI_SAM_EMBEDDINGS", str(root))

    assert cli(["cache"]) == 0
    out = capsys.readouterr().out
    lines = {
        ln.split()[0]: ln
        for ln in out.splitlines()
        if ln.split()[:1] != [] and ln.split()[0].endswith(".zarr")
    }
    assert set(lines) == {held.path.name, oldest.name, newer.name}
    assert lines[held.path.name].endswith("in use")
    assert "in use" not in lines[oldest.name] + lines[newer.name]
    assert "tiny" in lines[oldest.name] and "6x32x32 float32 axis 0" in lines[oldest.name]
    assert "3 store(s)" in out and str(root) in out and "(1 in use)" in out
    assert "limit: 20.0 GiB" in out

    sizes = {s.path: s.nbytes for s in cache_usage(root)}
    cap_gb = (sizes[held.path] + sizes[newer] + 100) / GIB
    assert cli(["cache", "--root", str(root), "--max-gb", repr(cap_gb)]) == 0
    out = capsys.readouterr().out
    assert f"removed {oldest.name}" in out and "removed 1 store(s)" in out
    assert _names(root) == sorted([held.path.name, newer.name])

    assert cli(["cache", "--clear"]) == 0
    out = capsys.readouterr().out
    assert f"removed {newer.name}" in out and held.path.name in out and "(1 in use)" in out
    assert _names(root) == [held.path.name]

    monkeypatch.setenv(ENV_MAX_GB, "huge")
    assert cli(["cache"]) == 0
    captured = capsys.readouterr()
    assert f"{ENV_MAX_GB}='huge'" in captured.err and held.path.name in captured.out

    assert cli(["cache", "--max-gb", "-1"]) == 2
    assert "--max-gb must be a size in GB >= 0, e.g. --max-gb 10" in capsys.readouterr().err
    empty = root.parent / "none"
    assert cli(["cache", "--root", str(empty)]) == 0
    assert f"no stored embeddings in {empty}" in capsys.readouterr().out


def test_cli_cache_imports_no_torch_or_zarr(root, predictor, base):
    _closed(root, predictor, base, 0, time.time())
    code = (
        "import sys; from napari_sam.cli import main; main(['cache', '--root', sys.argv[1]]);"
        "print(','.join(m for m in ('torch', 'zarr', 'qtpy', 'napari') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(root)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert "1 store(s)" in out.stdout and out.stdout.splitlines()[-1] == ""

"""Atomic writes: all-or-nothing, no silent overwrite, clear errors for bad destinations."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _io_fs import full_dir, leftovers, read_only_dir

from napari_sam.io.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_write_and_refuse_existing(tmp_path):
    dest = tmp_path / "a.txt"
    atomic_write_text(dest, "one")
    assert dest.read_text() == "one"
    with pytest.raises(FileExistsError) as info:
        atomic_write_text(dest, "two")
    msg = str(info.value)
    assert str(dest) in msg and "overwrite=True" in msg
    assert dest.read_text() == "one"
    atomic_write_text(dest, "two", overwrite=True)
    assert dest.read_text() == "two"
    assert leftovers(tmp_path) == ["a.txt"]


def test_failure_in_the_middle_leaves_nothing(tmp_path):
    dest = tmp_path / "b.bin"
    with pytest.raises(ZeroDivisionError), atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(b"x" * 10000)
        f.flush()
        1 / 0  # noqa: B018 - a real error half-way through the write
    assert leftovers(tmp_path) == []


def test_failure_keeps_old_version(tmp_path):
    dest = tmp_path / "c.txt"
    atomic_write_text(dest, "old")
    with pytest.raises(RuntimeError), atomic_path(dest, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer crashed")
    assert dest.read_text() == "old"
    assert leftovers(tmp_path) == ["c.txt"]


def test_directory_replace_is_complete(tmp_path):
    dest = tmp_path / "store.zarr"
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "old_only").write_text("1")
    with atomic_path(dest, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert leftovers(tmp_path) == ["store.zarr"]
    # failure while writing the replacement: the old folder is untouched
    with pytest.raises(ValueError), atomic_path(dest, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "partial").write_text("3")
        raise ValueError("boom")
    assert sorted(p.name for p in dest.iterdir()) == ["new"]
    assert leftovers(tmp_path) == ["store.zarr"]


def test_missing_parent_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "x")


def test_read_only_destination(tmp_path):
    with read_only_dir(tmp_path) as ro:
        with pytest.raises(PermissionError) as info:
            atomic_write_bytes(ro / "x.bin", b"data")
        msg = str(info.value)
        assert "read-only" in msg and str(ro / "x.bin") in msg
        assert leftovers(ro) == []


def test_full_destination(tmp_path):
    with full_dir(tmp_path, size_kb=64) as full:
        with pytest.raises(OSError) as info:
            atomic_write_bytes(full / "big.bin", b"\1" * (1 << 20))
        assert info.value.errno == errno.ENOSPC
        assert "full" in str(info.value) and "nothing was written" in str(info.value)
        assert leftovers(full) == []


def test_file_size_limit_is_reported_like_a_full_disk(tmp_path):
    """A real EFBIG from the kernel (RLIMIT_FSIZE) in a child process: clear message,
    no partial file. Runs without root."""
    code = textwrap.dedent(
        f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        from napari_sam.io.atomic import atomic_write_bytes
        try:
            atomic_write_bytes({str(tmp_path / "big.bin")!r}, b"x" * 100000)
        except OSError as e:
            print("ERR", e.errno, e)
        """
    )
    src = str(Path(__file__).parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": src, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert out.stdout.startswith(f"ERR {errno.EFBIG}"), out.stdout + out.stderr
    assert "full or over its size" in out.stdout
    assert leftovers(tmp_path) == []

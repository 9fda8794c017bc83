"""Real read-only and full file systems for the IO tests (small tmpfs mounts).

Running as root makes ``chmod`` ineffective (root writes anyway), so a read-only
destination is made with a read-only tmpfs mount when we are root, and with chmod
otherwise. A full disk is a tiny tmpfs. Tests skip when the mount is not permitted.
"""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
from pathlib import Path

import pytest


def _mount(target: Path, options: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0


def _umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def full_dir(base: Path, size_kb: int = 64):
    """A folder on a file system with only ``size_kb`` KiB of space."""
    target = base / "full"
    target.mkdir()
    if not _mount(target, f"size={size_kb}k"):
        pytest.skip("cannot mount a small tmpfs here (needs root) to simulate a full disk")
    try:
        yield target
    finally:
        _umount(target)


@contextlib.contextmanager
def read_only_dir(base: Path):
    """A folder nobody (not even root) can write to."""
    target = base / "ro"
    target.mkdir()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # chmod does not stop root: use a read-only mount instead
        if not _mount(target, "ro,size=64k"):
            pytest.skip("running as root and cannot mount a read-only tmpfs")
        try:
            yield target
        finally:
            _umount(target)
    else:
        target.chmod(stat.S_IRUSR | stat.S_IXUSR)
        try:
            yield target
        finally:
            target.chmod(stat.S_IRWXU)


def leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` (temporaries included): must be empty after a failed write."""
    return sorted(p.name for p in Path(folder).iterdir())

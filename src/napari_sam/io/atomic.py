"""Atomic file and directory writes with clear errors.

Every writer in :mod:`napari_sam.io` goes through :func:`atomic_path`: the content is
written to a hidden temporary sibling of the destination (same folder, hence same file
system), flushed and fsynced, and only then moved into place with ``os.replace`` (a
file) or ``os.rename`` (a directory). A failure at any point removes the temporary, so a
destination is either absent, the old complete version, or the new complete version -
never a partial file.

An existing destination is refused unless ``overwrite=True``. Replacing a directory
cannot be done in one system call: the old directory is first renamed aside to a hidden
sibling, the new one renamed into place, then the old one deleted; if the second rename
fails the old directory is put back.

Operating-system errors that users meet (a read-only folder, a full disk, a missing
parent folder) are re-raised as the same exception type with a message that names the
path and the fix; the original error is chained.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "TEMP_PREFIX",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_destination",
    "explain_os_error",
    "fsync_tree",
]

# Temporaries are hidden siblings named ".<name>.napari-sam-tmp-<hex>" so that a crash
# leaves something recognisable (and ignorable) rather than a half-written "<name>".
TEMP_PREFIX = ".napari-sam-tmp-"

_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def explain_os_error(err: OSError, path: str | os.PathLike) -> OSError:
    """Return an exception of the same family as ``err`` with a message naming ``path``.

    ``PermissionError`` for read-only / forbidden destinations, ``OSError`` with the
    original errno for a full disk or quota (ENOSPC, EDQUOT, EFBIG); other errors are
    returned unchanged.
    """
    path = Path(path)
    if isinstance(err, PermissionError) or err.errno in _READ_ONLY:
        new: OSError = PermissionError(
            err.errno or errno.EACCES,
            f"cannot write {str(path)!r}: the destination folder is read-only or you do "
            f"not have permission to write there ({os.strerror(err.errno or errno.EACCES)}). "
            "Choose a folder you can write to.",
        )
    elif err.errno in _FULL:
        new = OSError(
            err.errno,
            f"cannot write {str(path)!r}: the destination is full or over its size/quota "
            f"limit ({os.strerror(err.errno)}). Free some space or choose another "
            "destination; nothing was written.",
        )
    else:
        return err
    new.filename = str(path)
    return new


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate a destination before any work is done; return it as an absolute Path.

    Raises
    ------
    FileExistsError
        if ``path`` exists and ``overwrite`` is false.
    FileNotFoundError
        if the parent folder does not exist.
    IsADirectoryError / NotADirectoryError
        never raised here: replacing a file by a directory or the reverse is allowed with
        ``overwrite=True`` (the old entry is removed only after the new one is complete).
    """
    path = Path(path).expanduser().absolute()
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise FileExistsError(
            errno.EEXIST,
            f"{str(path)!r} already exists; refusing to overwrite it. Pass "
            "overwrite=True (or --overwrite on the command line) to replace it, or "
            "choose another name.",
            str(path),
        )
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot write {str(path)!r}: the folder {str(parent)!r} does not exist. "
            "Create it first or choose another destination.",
            str(parent),
        )
    return path


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_PREFIX}{uuid.uuid4().hex[:12]}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames durable on POSIX; not supported on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync a file, or every file and folder below a directory (and the directory)."""
    path = Path(path)
    if path.is_dir():
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
            _fsync_dir(Path(root))
    elif path.exists():
        _fsync_file(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _move_into_place(tmp: Path, dest: Path, overwrite: bool) -> None:
    if not (dest.exists() or dest.is_symlink()):
        os.rename(tmp, dest)
        return
    if not overwrite:  # appeared while we were writing
        raise FileExistsError(
            errno.EEXIST,
            f"{str(dest)!r} was created by someone else while writing; refusing to "
            "overwrite it. Pass overwrite=True to replace it.",
            str(dest),
        )
    if tmp.is_file() and dest.is_file() and not dest.is_symlink():
        os.replace(tmp, dest)  # one atomic step for files
        return
    # Directories (or a change of kind): move the old one aside, then swap.
    old = dest.with_name(f".{dest.name}{TEMP_PREFIX}old-{uuid.uuid4().hex[:12]}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Context manager yielding a temporary path to write instead of ``path``.

    Write a file or a directory at the yielded path. On normal exit it is fsynced and
    moved to ``path``; on any exception (including ``KeyboardInterrupt``) it is deleted
    and the exception propagates, read-only / full-disk errors re-raised with a clear
    message. ``path`` is checked before the body runs (see :func:`check_destination`).

    >>> with atomic_path("out.txt") as tmp:       # doctest: +SKIP
    ...     tmp.write_text("hello")
    """
    dest = check_destination(path, overwrite)
    tmp = _temp_sibling(dest)
    try:
        try:
            yield tmp
            if not (tmp.exists() or tmp.is_symlink()):
                raise RuntimeError(
                    f"internal error: nothing was written for {str(dest)!r} (the writer "
                    "created no file or folder at the temporary path)"
                )
            fsync_tree(tmp)
            _move_into_place(tmp, dest, overwrite)
            _fsync_dir(dest.parent)
        except OSError as e:
            # Only errors about the destination are rephrased (not e.g. an unreadable
            # source file that the body was reading).
            name = str(e.filename or "")
            if not name or name.startswith((str(tmp), str(dest))) or Path(name) == dest.parent:
                raise explain_os_error(e, dest) from e
            raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the absolute path written."""
    with atomic_path(path, overwrite=overwrite) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(path).expanduser().absolute()


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the absolute path written."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)

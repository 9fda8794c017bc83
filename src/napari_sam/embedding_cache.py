"""The GUI's on-disk embedding cache: where it is, what it holds, how big it may grow.

The widget keeps each stack's embeddings in ``<root>/<key>.zarr`` (``root``:
:func:`cache_root`; ``key``: 32 hex digits from ``embeddings.cached_store_path``). Only
folders named like that, directly in the root, are treated as cache stores; stores a user
keeps elsewhere (e.g. next to an image) are never listed, measured or deleted here.

**Size cap.** ``$NAPARI_SAM_EMBEDDINGS_MAX_GB`` (default 20, in GB of 2^30 bytes; ``0`` or
``off``: no cap) bounds the stores of the root. ``embeddings.open_cached_store`` calls
:func:`prune_cache` after opening a store: least recently used stores are deleted until
the total is under the cap. A store is never deleted while it is *in use*:

- open in this process (every on-disk ``EmbeddingStore`` registers itself until it is
  garbage collected: :func:`register_open`), or
- leased by any process (``open_cached_store`` writes ``<root>/.in-use/<store>.<pid>.<id>``
  before opening a store and removes it when the store object goes away). A lease of a
  process on this machine that is no longer running is stale and removed; a lease from
  another machine (a shared cache folder) counts for a day, and so does every lease on
  Windows, where process ids are not checked.

*Last used* is the store folder's modification time: set when a store is opened and when
it is released (and by zarr writing its metadata).

**Deleting** a store renames it to ``<name>.deleting-...`` first (atomic; a store that
cannot be renamed, e.g. open on Windows, is skipped), checks again that nobody leased it
meanwhile (then it is renamed back), and only then removes the files; errors are ignored
and a half-deleted ``.deleting`` folder is finished by the next prune.

Nothing here imports numpy, zarr or torch (the ``napari-sam cache`` command stays light).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "CachedStore",
    "DEFAULT_MAX_GB",
    "ENV_EMBEDDINGS",
    "ENV_MAX_GB",
    "acquire_lease",
    "cache_root",
    "cache_usage",
    "default_root",
    "format_bytes",
    "is_in_use",
    "max_cache_bytes",
    "prune_cache",
    "register_open",
]

#: environment variable: a folder for the GUI's stores, or "memory" (no disk)
ENV_EMBEDDINGS = "NAPARI_SAM_EMBEDDINGS"
#: environment variable: size cap of the GUI's stores in GB (2^30 bytes); 0 or "off": none
ENV_MAX_GB = "NAPARI_SAM_EMBEDDINGS_MAX_GB"
DEFAULT_MAX_GB = 20
GIB = 2**30

_ATTR_KEY = "napari_sam_embeddings"
_STORE_NAME = re.compile(r"^[0-9a-f]{32}\.zarr$")
_TRASH_NAME = re.compile(r"^[0-9a-f]{32}\.zarr\.deleting-[0-9a-f]+$")
LEASE_DIR = ".in-use"
#: a lease that cannot be checked by process id (other machine, Windows) counts this long
_UNCHECKED_LEASE_S = 24 * 3600
_HOST = socket.gethostname()


class CachedStore(NamedTuple):
    """One store of the cache: ``path``, ``nbytes`` (sum of its file sizes), ``last_used``
    (seconds since the epoch), ``in_use`` (see the module notes) and ``info`` (the store's
    signature: ``model_name``, ``stack_shape``, ``stack_dtype``, ``axis``, ...; ``{}`` for
    a store whose metadata is not written yet)."""

    path: Path
    nbytes: int
    last_used: float
    in_use: bool
    info: dict


# ---------------------------------------------------------------- locations and cap
def _cache_dir() -> Path:
    try:
        from napari_sam.model.registry import cache_dir

        return Path(cache_dir())
    except ImportError:
        env = os.environ.get("NAPARI_SAM_CACHE", "").strip()
        if env:
            return Path(env).expanduser()
        import platformdirs

        return Path(platformdirs.user_cache_dir("napari-sam"))


def cache_root() -> Path | None:
    """Folder of the GUI's embedding stores: ``$NAPARI_SAM_EMBEDDINGS`` if it names a
    folder, None if it is ``memory`` (embeddings in memory only, nothing written), else
    ``<cache dir>/embeddings`` (cache dir: ``$NAPARI_SAM_CACHE`` or the user cache)."""
    env = os.environ.get(ENV_EMBEDDINGS, "").strip()
    if env.lower() in ("memory", "off", "none", "0"):
        return None
    if env:
        return Path(env).expanduser()
    return _cache_dir() / "embeddings"


def default_root() -> Path:
    """:func:`cache_root`, or ``<cache dir>/embeddings`` when that is "memory"."""
    return cache_root() or _cache_dir() / "embeddings"


def max_cache_bytes(value: str | None = None) -> int | None:
    """The cache's size cap in bytes from ``value`` (default: ``$NAPARI_SAM_EMBEDDINGS_MAX_GB``).

    Unset or empty: 20 GB; ``0``, ``off``, ``none``, ``unlimited``: None (no cap); else a
    number of GB (2^30 bytes), fractions allowed, an optional ``GB``/``GiB``/``G`` suffix.
    Anything else raises ValueError naming the variable and an example value.
    """
    if value is None:
        value = os.environ.get(ENV_MAX_GB, "")
    text = value.strip().lower()
    if not text:
        return DEFAULT_MAX_GB * GIB
    if text in ("off", "none", "no", "unlimited"):
        return None
    number = re.sub(r"\s*(gib|gb|g)$", "", text)
    try:
        gb = float(number)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0:
        raise ValueError(
            f"{ENV_MAX_GB}={value!r} is not a size: set it to a number of GB (2^30 bytes), "
            f"e.g. {ENV_MAX_GB}=20, or to 0 or off for no limit"
        )
    return None if gb == 0 else max(1, int(gb * GIB))


def format_bytes(n: float) -> str:
    """``5 * 2**30 -> '5.0 GiB'`` (binary units, like the cap)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# ------------------------------------------------------------ stores open here
_OPEN: dict[str, int] = {}  # realpath of a store -> number of live EmbeddingStores on it
_OPEN_LOCK = threading.Lock()


def _key(path: str | os.PathLike) -> str:
    return os.path.normcase(os.path.realpath(path))


def _touch(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def register_open(owner: object, path: str | os.PathLike) -> weakref.finalize:
    """Record that ``owner`` (an ``EmbeddingStore``) uses the store at ``path`` until it is
    garbage collected (or the returned finalizer is called); marks the store used now and
    again when released. Stores registered here are never deleted by :func:`prune_cache`
    of this process."""
    key = _key(path)
    with _OPEN_LOCK:
        _OPEN[key] = _OPEN.get(key, 0) + 1
    _touch(path)
    return weakref.finalize(owner, _unregister, key, str(path))


def _unregister(key: str, path: str) -> None:
    with _OPEN_LOCK:
        n = _OPEN.get(key, 0) - 1
        if n > 0:
            _OPEN[key] = n
        else:
            _OPEN.pop(key, None)
    _touch(path)


def _open_here(path: Path) -> bool:
    with _OPEN_LOCK:
        return _key(path) in _OPEN


# ------------------------------------------------------------------- leases
def acquire_lease(store_path: str | os.PathLike) -> Callable[[], None]:
    """Tell other processes that this one uses the store at ``store_path``: writes a lease
    file in ``<root>/.in-use/``. Returns ``release()`` (idempotent; also marks the store
    used). Raises OSError when the root cannot be written."""
    store_path = Path(store_path)
    folder = store_path.parent / LEASE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    lease = folder / f"{store_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    lease.write_text(json.dumps({"host": _HOST, "pid": os.getpid(), "time": time.time()}))
    done = threading.Event()

    def release() -> None:
        if done.is_set():
            return
        done.set()
        with contextlib.suppress(OSError):
            lease.unlink()
        _touch(store_path)

    return release


def _pid_alive(pid: int) -> bool | None:
    """True/False for a process of this machine; None where it cannot be told (Windows)."""
    if pid == os.getpid():
        return True
    if sys.platform == "win32":  # os.kill(pid, 0) would stop the process there
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def _lease_live(lease: Path) -> bool:
    """Whether a lease file still protects its store; removes it when stale."""
    try:
        age = time.time() - lease.stat().st_mtime
        data = json.loads(lease.read_text())
        host, pid = str(data["host"]), int(data["pid"])
    except FileNotFoundError:  # released meanwhile
        return False
    except OSError:  # cannot be read: keep the store, to be safe
        return True
    except (ValueError, KeyError, TypeError):  # being written this instant, or damaged
        host, pid = None, None
    if pid is None:
        alive = age < 60
    elif host == _HOST:
        alive = _pid_alive(pid)
    else:
        alive = None
    if alive is None:
        alive = age < _UNCHECKED_LEASE_S
    if not alive:
        with contextlib.suppress(OSError):
            lease.unlink()
    return alive


def is_in_use(path: str | os.PathLike) -> bool:
    """True if the store at ``path`` is open in this process or leased by a live one."""
    path = Path(path)
    if _open_here(path):
        return True
    folder = path.parent / LEASE_DIR
    try:
        leases = [folder / n for n in os.listdir(folder) if n.startswith(path.name + ".")]
    except OSError:
        return False
    live = [_lease_live(lease) for lease in leases]  # all of them: stale ones are removed
    return any(live)


# -------------------------------------------------------------------- usage
def _dir_size(path: Path) -> int:
    total, stack = 0, [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for e in entries:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        else:
                            total += e.stat(follow_symlinks=False).st_size
                    except OSError:
                        pass
        except OSError:
            pass
    return total


def _store_info(path: Path) -> dict | None:
    """The signature in ``zarr.json``; ``{}`` if there is none yet; None if it is some
    other zarr group (not ours)."""
    try:
        meta = json.loads((path / "zarr.json").read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # half-written metadata: still one of ours by its name
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    info = attrs.get(_ATTR_KEY) if isinstance(attrs, dict) else None
    return dict(info) if isinstance(info, dict) else None


def cache_usage(root: str | os.PathLike | None = None) -> list[CachedStore]:
    """The stores of the cache folder ``root`` (default :func:`default_root`), least
    recently used first. O(files in the stores) ``stat`` calls; no store is opened."""
    root = default_root() if root is None else Path(root)
    try:
        entries = list(os.scandir(root))
    except OSError:  # no cache yet (or not a folder)
        return []
    stores = []
    for e in entries:
        try:
            if not _STORE_NAME.match(e.name) or not e.is_dir(follow_symlinks=False):
                continue
            mtime = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        path = Path(e.path)
        info = _store_info(path)
        if info is None:
            continue
        stores.append(CachedStore(path, _dir_size(path), mtime, is_in_use(path), info))
    stores.sort(key=lambda s: (s.last_used, s.path.name))
    return stores


# -------------------------------------------------------------------- pruning
def _rmtree(paths: list[Path], background: bool) -> None:
    def work():
        for p in paths:
            shutil.rmtree(p, ignore_errors=True)

    if not paths:
        return
    if background:
        threading.Thread(target=work, name="napari-sam cache cleanup", daemon=True).start()
    else:
        work()


def _discard(path: Path) -> Path | None:
    """Rename the store at ``path`` out of the way; its new name (to delete), or None if
    it could not be moved or was opened meanwhile (then it is left, or put back)."""
    trash = path.with_name(f"{path.name}.deleting-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(path, trash)
    except OSError:  # gone already (another prune), or open on Windows
        return None
    if is_in_use(path):  # leased between the check and the rename: put it back
        try:
            os.rename(trash, path)
            return None
        except OSError:  # a new store took the name meanwhile: the old one goes
            pass
    return trash


def prune_cache(
    max_bytes: int | None,
    root: str | os.PathLike | None = None,
    *,
    keep: Iterable[str | os.PathLike] = (),
    background: bool = False,
) -> list[CachedStore]:
    """Delete least recently used stores of ``root`` (default :func:`default_root`) until
    their total is at most ``max_bytes`` (None: no cap, only leftovers are cleaned; 0:
    every store that can go). Stores in use (see the module notes) and those in ``keep``
    are never deleted, so the total can stay above the cap. Also finishes deletions that
    were interrupted (``*.deleting-*`` folders). ``background=True`` removes the files in
    a daemon thread (the stores are renamed away before this returns). Returns the
    deleted stores, oldest first. Errors are ignored: a store that cannot go is kept."""
    root = default_root() if root is None else Path(root)
    try:
        leftovers = [root / n for n in os.listdir(root) if _TRASH_NAME.match(n)]
    except OSError:
        return []
    stores = cache_usage(root)
    kept = {_key(p) for p in keep}
    total = sum(s.nbytes for s in stores)
    removed, trash = [], []
    for s in stores:
        if max_bytes is None or total <= max_bytes:
            break
        if s.in_use or _key(s.path) in kept:
            continue
        moved = _discard(s.path)
        if moved is not None:
            trash.append(moved)
            removed.append(s)
            total -= s.nbytes
    _rmtree(leftovers + trash, background)
    return removed

"""Autosave recovery store: every committed object survives a crash.

One folder per image (keyed by :func:`image_key`) under :func:`recovery_root`:
``$NAPARI_SAM_RECOVERY/<key>/`` if that variable is set, else ``<cache>/recovery/<key>/``
(``<cache>`` = ``$NAPARI_SAM_CACHE`` or the platformdirs user cache folder). Each commit is one small compressed ``.npz`` file holding the object's
mask cropped to its bounding box, its offset and its :class:`ObjectRecord` as JSON,
written atomically (temporary sibling, fsync, rename, fsync of the folder). A process
killed at any instant therefore leaves every earlier commit complete on disk and at most
one hidden temporary, which restore ignores and :meth:`RecoveryStore.clear` removes.
One process writes to a store at a time (records are ordered by a sequence number).

A new process calls :func:`list_recoverable` (or :meth:`Autosave.lookup` for one image)
to offer a restore, then :meth:`RecoveryStore.restore` to rebuild the labels and the
session. Stores are never cleared automatically (saving through napari does not reach
the widget): :meth:`RecoveryStore.clear` / :meth:`Autosave.discard` run when the user
chooses to discard.

Record kinds (restore replays them in order, so the restored labels equal the labels at
the last record):

- ``commit(object_id, mask)``: "after this commit, exactly the pixels of ``mask`` carry
  ``object_id``" (pass the mask as it was painted); it overwrites other ids there.
  ``delete(object_id)`` removes an object.
- ``patch(offset, values)``: "the labels inside this box are exactly ``values`` now", plus
  the session objects it adds and the ones (by ``extra["uid"]``) it removes. This is what
  the annotator writes for a commit and for an undo/redo of one: the box around the
  changed pixels of one plane, never the whole volume.
- ``snapshot(labels, objects)``: the whole labels and object list (replaces everything
  before it); written once when autosave starts on labels that are not empty, and after
  a failed write so that the store is complete again.

:class:`Autosave` runs these writes for the GUI (and for scripts) in order on one
background thread.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from napari_sam.io.atomic import TEMP_PREFIX, atomic_write_bytes, atomic_write_text
from napari_sam.io.session import ObjectRecord, SessionRecord

__all__ = [
    "Autosave",
    "AutosaveError",
    "Lookup",
    "RecoveredState",
    "RecoveryInfo",
    "RecoveryStore",
    "image_key",
    "list_recoverable",
    "recovery_root",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_ENTRY = re.compile(r"^(\d{10})-(\d+)-(commit|delete|patch|snapshot)-(\d+)\.npz$")
_FULL_HASH_BYTES = 1 << 30


def recovery_root() -> Path:
    """``$NAPARI_SAM_RECOVERY``, else ``$NAPARI_SAM_CACHE/recovery``, else the platformdirs
    user cache ``.../recovery``."""
    own = os.environ.get("NAPARI_SAM_RECOVERY")
    if own:
        return Path(own).expanduser()
    env = os.environ.get("NAPARI_SAM_CACHE")
    if env:
        base = Path(env).expanduser()
    else:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("napari-sam"))
    return base / "recovery"


def image_key(image: Any, name: str = "") -> str:
    """A content signature of an image (numpy, dask or zarr), 32 hex characters.

    Hashes shape, dtype and every value (region by region, no full copy) for images up to
    1 GiB; larger images hash every k-th plane along the first axis (k chosen to read
    about 1 GiB), so two large images differing only between sampled planes would share
    a key (the stored shape and name still tell them apart in the list).
    """
    from napari_sam.io._arrays import default_chunks, iter_input_regions, read_block

    shape = tuple(int(s) for s in image.shape)
    dtype = np.dtype(image.dtype)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((shape, dtype.str, name)).encode())
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes <= _FULL_HASH_BYTES or len(shape) < 3:
        for region in iter_input_regions(image, default_chunks(shape)):
            h.update(np.ascontiguousarray(read_block(image, region)).tobytes())
    else:
        step = int(np.ceil(nbytes / _FULL_HASH_BYTES))
        for i in range(0, shape[0], step):
            h.update(np.ascontiguousarray(read_block(image, (slice(i, i + 1),))).tobytes())
    return h.hexdigest()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class RecoveryInfo:
    """One recoverable annotation session, as listed at start-up."""

    key: str
    path: Path
    image_name: str
    shape: tuple[int, ...]
    n_commits: int
    modified: float  # POSIX time of the newest record
    source: str = ""


@dataclass
class RecoveredState:
    """What :meth:`RecoveryStore.restore` rebuilt. ``damaged``: unreadable records skipped."""

    labels: np.ndarray
    session: SessionRecord
    n_records: int
    damaged: list[str] = field(default_factory=list)

    @property
    def object_ids(self) -> list[int]:
        """The ids present in the restored labels (what the user sees as objects)."""
        ids = np.unique(self.labels)
        return [int(i) for i in ids if i != 0]


class RecoveryStore:
    """Crash-safe log of committed objects for one image.

    Parameters
    ----------
    key : image identity, normally :func:`image_key` of the image.
    shape : labels shape (required to create a new store; checked against an existing one).
    image_name, source : shown when offering a restore.
    session : optional session-wide settings (model, contrast, ...) to restore with.
    root : folder holding the stores (default :func:`recovery_root`).
    """

    def __init__(
        self,
        key: str,
        *,
        shape: tuple[int, ...] | None = None,
        image_name: str = "",
        source: str = "",
        session: SessionRecord | None = None,
        root: str | os.PathLike | None = None,
    ):
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", key or ""):
            raise ValueError(
                f"recovery key must be 1-128 letters, digits, '_', '-', '.'; got {key!r}"
            )
        self.key = key
        self.path = Path(root) / key if root is not None else recovery_root() / key
        manifest = self.path / MANIFEST
        if manifest.exists():
            self.manifest = self._read_manifest()
            stored = tuple(self.manifest["shape"])
            if shape is not None and tuple(int(s) for s in shape) != stored:
                raise ValueError(
                    f"the recovery store {str(self.path)!r} belongs to an image of shape "
                    f"{stored}, not {tuple(shape)}: it was made for another image"
                )
        else:
            if shape is None:
                raise FileNotFoundError(
                    f"no recovery store for key {key!r} in {str(self.path.parent)!r}"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "kind": "napari-sam-recovery",
                "format_version": FORMAT_VERSION,
                "key": key,
                "shape": [int(s) for s in shape],
                "image_name": image_name,
                "source": str(source),
                "created": _now(),
                "session": session.to_dict() if session is not None else None,
            }
            atomic_write_text(manifest, json.dumps(self.manifest, indent=1), overwrite=True)
        self.shape = tuple(int(s) for s in self.manifest["shape"])
        self._seq = max((e[0] for e in self._entries()), default=0)

    # -- reading the log
    def _read_manifest(self) -> dict[str, Any]:
        try:
            m = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"recovery store {str(self.path)!r} is damaged ({e})") from e
        if m.get("kind") != "napari-sam-recovery" or "shape" not in m:
            raise ValueError(f"{str(self.path)!r} is not a napari-sam recovery store")
        if int(m.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(
                f"recovery store {str(self.path)!r} was written by a newer napari-sam; upgrade"
            )
        return m

    def _entries(self) -> list[tuple[int, int, str, int, Path]]:
        out = []
        if not self.path.is_dir():
            return out
        for f in self.path.iterdir():
            m = _ENTRY.match(f.name)
            if m:
                out.append((int(m[1]), int(m[2]), m[3], int(m[4]), f))
        out.sort(key=lambda e: (e[0], e[1]))
        return out

    def __len__(self) -> int:
        return len(self._entries())

    def stale_temporaries(self) -> list[Path]:
        """Hidden temporaries left by a process killed while writing (safe to delete)."""
        return (
            [f for f in self.path.iterdir() if TEMP_PREFIX in f.name] if self.path.is_dir() else []
        )

    # -- writing
    def _write(self, kind: str, object_id: int, arrays: dict[str, np.ndarray]) -> Path:
        self._seq += 1
        name = f"{self._seq:010d}-{os.getpid()}-{kind}-{object_id}.npz"
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return atomic_write_bytes(self.path / name, buf.getvalue())

    def commit(
        self,
        object_id: int,
        mask: Any,
        *,
        offset: tuple[int, ...] | None = None,
        record: ObjectRecord | None = None,
    ) -> Path:
        """Record that exactly the pixels of ``mask`` carry ``object_id`` now.

        ``mask``: bool array of the labels' shape, or a crop of it placed at ``offset``
        (index of its first element). Returns the record file (durable on return).
        """
        object_id = _check_id(object_id)
        mask = np.asarray(mask)
        if mask.dtype != bool:
            if mask.dtype.kind not in "biu" or (mask.size and mask.max() > 1):
                raise ValueError(
                    f"mask must be boolean (or 0/1), got dtype {mask.dtype}; pass labels == id"
                )
            mask = mask.astype(bool)
        if offset is None:
            if mask.shape != self.shape:
                raise ValueError(
                    f"mask shape {mask.shape} differs from the labels shape {self.shape}; "
                    "pass the full-size mask or a crop with offset="
                )
            offset = (0,) * len(self.shape)
        offset = tuple(int(o) for o in offset)
        if (
            len(offset) != len(self.shape)
            or mask.ndim != len(self.shape)
            or any(
                o < 0 or o + s > n for o, s, n in zip(offset, mask.shape, self.shape, strict=True)
            )
        ):
            raise ValueError(
                f"mask of shape {mask.shape} at offset {offset} does not fit in the labels "
                f"shape {self.shape}"
            )
        nz = np.nonzero(mask)
        if nz[0].size:
            lo = [int(a.min()) for a in nz]
            hi = [int(a.max()) + 1 for a in nz]
            crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
            offset = tuple(o + a for o, a in zip(offset, lo, strict=True))
        else:
            crop = np.zeros((0,) * len(self.shape), dtype=bool)
        if record is not None and not isinstance(record, ObjectRecord):
            raise TypeError(f"record must be an ObjectRecord, got {type(record).__name__}")
        rec_json = json.dumps(_asdict(record) if record is not None else None)
        return self._write(
            "commit",
            object_id,
            {
                "mask": np.packbits(crop.ravel()),
                "shape": np.asarray(crop.shape, dtype=np.int64),
                "offset": np.asarray(offset, dtype=np.int64),
                "record": np.asarray(rec_json),
            },
        )

    def delete(self, object_id: int) -> Path:
        """Record that ``object_id`` was removed."""
        object_id = _check_id(object_id)
        return self._write("delete", object_id, {"object_id": np.asarray(object_id)})

    def patch(
        self,
        offset: tuple[int, ...],
        values: Any,
        *,
        add: list[ObjectRecord] = (),
        remove: list[str] = (),
    ) -> Path:
        """Record that the labels in the box at ``offset`` are exactly ``values`` now.

        ``values``: integer array (ids, 0 = background) placed at ``offset`` (index of its
        first element); ``add``: session objects made by this change (each identified by
        ``extra["uid"]``); ``remove``: uids of objects this change took away (an undo).
        Returns the record file (durable on return).
        """
        values, offset = self._check_box(values, offset)
        return self._write("patch", 0, self._box_arrays(values, offset, add, remove))

    def snapshot(self, labels: Any, objects: list[ObjectRecord] = ()) -> Path:
        """Record the whole labels and object list (everything earlier is superseded)."""
        values, offset = self._check_box(labels, (0,) * len(self.shape))
        if values.shape != self.shape:
            raise ValueError(f"snapshot of shape {values.shape}, the labels have {self.shape}")
        return self._write("snapshot", 0, self._box_arrays(values, offset, objects, ()))

    def _check_box(self, values, offset):
        values = np.asarray(values)
        if values.dtype.kind not in "biu" or (values.size and values.min() < 0):
            raise ValueError(f"label values must be integer ids >= 0, got dtype {values.dtype}")
        offset = tuple(int(o) for o in offset)
        if (
            len(offset) != len(self.shape)
            or values.ndim != len(self.shape)
            or any(
                o < 0 or o + s > n
                for o, s, n in zip(offset, values.shape, self.shape, strict=True)
            )
        ):
            raise ValueError(
                f"values of shape {values.shape} at offset {offset} do not fit in the labels "
                f"shape {self.shape}"
            )
        return values, offset

    @staticmethod
    def _box_arrays(values, offset, add, remove):
        for o in add:
            if not isinstance(o, ObjectRecord):
                raise TypeError(f"objects must be ObjectRecords, got {type(o).__name__}")
        return {
            "values": values,
            "offset": np.asarray(offset, dtype=np.int64),
            "add": np.asarray(json.dumps([_asdict(o) for o in add])),
            "remove": np.asarray(json.dumps([str(u) for u in remove])),
        }

    # -- restoring
    @staticmethod
    def _load(f: Path, kind: str):
        with np.load(f, allow_pickle=False) as z:
            if kind == "commit":
                shape = tuple(int(s) for s in z["shape"])
                n = int(np.prod(shape))
                mask = np.unpackbits(z["mask"], count=n).astype(bool).reshape(shape)
                offset = tuple(int(o) for o in z["offset"])
                return mask, offset, json.loads(str(z["record"]))
            if kind in ("patch", "snapshot"):
                values = z["values"]
                offset = tuple(int(o) for o in z["offset"])
                return values, offset, (json.loads(str(z["add"])), json.loads(str(z["remove"])))
            return None, None, None

    def restore(self) -> RecoveredState:
        """Replay the log: labels (smallest dtype for the largest id) and the session.

        ``session.objects`` lists the objects in the order they were made (one entry per
        annotator commit, so an id extended by a later commit appears twice).
        """
        damaged: list[str] = []
        loaded = []
        for seq, _pid, kind, oid, f in self._entries():
            try:
                loaded.append((seq, kind, oid, *self._load(f, kind)))
            except Exception as e:  # a damaged file must not stop the rest
                damaged.append(f"{f.name}: {type(e).__name__}: {e}")
        from napari_sam.io._arrays import smallest_uint

        max_id = 0
        for _seq, kind, oid, data, *_ in loaded:
            if kind == "commit":
                max_id = max(max_id, oid)
            elif kind in ("patch", "snapshot") and data.size:
                max_id = max(max_id, int(data.max()))
        labels = np.zeros(self.shape, dtype=smallest_uint(max_id))
        boxes: dict[int, tuple[slice, ...]] = {}  # a box holding every pixel of each id
        # (needed only by commit/delete records; the annotator's patches replace boxes)
        track = any(e[1] in ("commit", "delete") for e in loaded)
        records: dict[str, ObjectRecord | None] = {}
        for seq, kind, oid, data, offset, extra in loaded:
            if kind in ("commit", "delete"):
                if oid in boxes:  # clear the object's previous pixels
                    region = labels[boxes.pop(oid)]
                    region[region == oid] = 0
                for k in [k for k, r in records.items() if _is_of(k, r, oid)]:
                    del records[k]
                if kind == "delete":
                    continue
                if data.size:
                    box = tuple(slice(o, o + s) for o, s in zip(offset, data.shape, strict=True))
                    labels[box][data] = oid
                    boxes[oid] = box
                records[f"#{oid}"] = _object_from(extra, oid)
                continue
            add, remove = extra
            if kind == "snapshot":
                labels[...] = 0
                boxes.clear()
                records.clear()
            box = tuple(slice(o, o + s) for o, s in zip(offset, data.shape, strict=True))
            labels[box] = data
            for v in np.unique(data) if track else ():
                if v:
                    boxes[int(v)] = _union(boxes.get(int(v)), box)
            for uid in remove:
                records.pop(f"uid:{uid}", None)
            for i, d in enumerate(add):
                obj = _object_from(d, int(d["object_id"]))
                uid = obj.extra.get("uid") or f"{seq}.{i}"
                records[f"uid:{uid}"] = obj
        base = self.manifest.get("session")
        session = SessionRecord.from_dict(base) if base else SessionRecord()
        session.objects = []
        for k, rec in records.items():
            session.objects.append(rec if rec is not None else ObjectRecord(object_id=int(k[1:])))
        session.image_shape = self.shape
        session.image_key = self.key
        session.image_name = session.image_name or self.manifest.get("image_name", "")
        return RecoveredState(
            labels=labels, session=session, n_records=len(loaded), damaged=damaged
        )

    def clear(self) -> None:
        """Delete the store (the user chose to discard it)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def info(self) -> RecoveryInfo:
        entries = self._entries()
        mtime = max(
            (e[4].stat().st_mtime for e in entries), default=(self.path / MANIFEST).stat().st_mtime
        )
        return RecoveryInfo(
            key=self.key,
            path=self.path,
            image_name=self.manifest.get("image_name", ""),
            shape=self.shape,
            n_commits=sum(e[2] in ("commit", "patch", "snapshot") for e in entries),
            modified=mtime,
            source=self.manifest.get("source", ""),
        )


def _check_id(object_id: Any) -> int:
    if isinstance(object_id, bool) or int(object_id) != object_id or int(object_id) < 1:
        raise ValueError(f"object_id must be an integer >= 1 (0 is background), got {object_id!r}")
    return int(object_id)


def _is_of(key: str, rec: ObjectRecord | None, oid: int) -> bool:
    return key == f"#{oid}" or (rec is not None and rec.object_id == oid)


def _union(a: tuple[slice, ...] | None, b: tuple[slice, ...]) -> tuple[slice, ...]:
    if a is None:
        return b
    return tuple(
        slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True)
    )


def _asdict(record: ObjectRecord) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(record)


def _object_from(rec: dict[str, Any] | None, oid: int) -> ObjectRecord | None:
    if rec is None:
        return None
    from napari_sam.io.session import _object_from_dict

    return _object_from_dict({**rec, "object_id": oid})


def list_recoverable(root: str | os.PathLike | None = None) -> list[RecoveryInfo]:
    """Every recovery store with at least one record, newest first (offer these at start)."""
    base = Path(root) if root is not None else recovery_root()
    out = []
    if not base.is_dir():
        return out
    for d in base.iterdir():
        if not (d / MANIFEST).exists():
            continue
        try:
            store = RecoveryStore(d.name, root=base)
        except (ValueError, OSError):
            continue
        if len(store):
            out.append(store.info())
    out.sort(key=lambda i: i.modified, reverse=True)
    return out


@dataclass
class Lookup:
    """What :meth:`Autosave.lookup` found for an image at start-up.

    ``state``: what an earlier session left (None: no records); ``same``: the store
    already holds exactly the current labels (e.g. the same session after a model change).
    """

    key: str
    path: Path
    state: RecoveredState | None = None
    same: bool = False

    @property
    def offer(self) -> bool:
        """An earlier session left objects that are not on screen: offer a restore."""
        return self.state is not None and not self.same and bool(self.state.object_ids)


class AutosaveError(RuntimeError):
    """A write to the recovery store failed (the message names the folder)."""


class Autosave:
    """Writes every change of one image's labels to its :class:`RecoveryStore`, in order.

    All work (hashing the image, reading an earlier store, writing records) runs on
    ``executor`` (a single-thread ``concurrent.futures`` executor, so writes keep their
    order; None: inline on the calling thread). Each method returns a ``Future``; a write
    has reached the disk (fsynced) when its future is done without an exception.

    Protocol: :meth:`lookup` first (:class:`Lookup`: offer a restore or not); when it
    offers one, :meth:`accept` (the restored labels are on screen now) or :meth:`discard`
    (delete the earlier records); then one :meth:`patch` per change, or a
    :meth:`snapshot` while :attr:`needs_snapshot` (the labels on screen are not in the
    store yet, or a write failed). The folder is created by the first write, so an image
    that is never annotated leaves none.
    """

    def __init__(
        self,
        image: Any,
        shape: tuple[int, ...],
        *,
        name: str = "",
        source: str = "",
        session: SessionRecord | None = None,
        root: str | os.PathLike | None = None,
        executor=None,
    ):
        self.image = image
        self.shape = tuple(int(s) for s in shape)
        self.name = name
        self.source = source
        self.session = session
        self.root = Path(root) if root is not None else recovery_root()
        self.executor = executor
        self.key: str | None = None
        self.store: RecoveryStore | None = None
        #: the next write must be a snapshot (labels not in the store, or a write failed)
        self.needs_snapshot = False
        self._broken = False
        self._lock = threading.Lock()

    @property
    def path(self) -> Path | None:
        """The store folder (known once :meth:`lookup` has run)."""
        return self.root / self.key if self.key else None

    def _submit(self, fn, *args) -> Future:
        if self.executor is not None:
            return self.executor.submit(fn, *args)
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the caller via the future
            fut.set_exception(e)
        return fut

    # -- start-up
    def lookup(self, labels: Any) -> Future:
        """Hash the image and read an earlier store of it; the result is a :class:`Lookup`.

        ``labels``: the labels on screen now (compared with the store's content; not
        changed meanwhile by the caller).
        """
        return self._submit(self._lookup, labels)

    def _lookup(self, labels) -> Lookup:
        self.key = image_key(self.image)
        found = Lookup(self.key, self.root / self.key)
        nonempty = bool(np.any(labels))
        if not (found.path / MANIFEST).exists():
            self.needs_snapshot = nonempty
            return found
        store = RecoveryStore(self.key, shape=self.shape, root=self.root)
        found.state = store.restore() if len(store) else None
        if found.state is not None:
            found.same = found.state.labels.shape == np.shape(labels) and bool(
                np.array_equal(found.state.labels, labels)
            )
        if not found.offer:
            self.store = store
            self.needs_snapshot = nonempty and not found.same
        return found

    def accept(self) -> Future:
        """Keep the earlier records: the labels on screen now equal the restored ones."""
        self.needs_snapshot = False

        def run():
            with self._lock:
                self.store = RecoveryStore(self.key, shape=self.shape, root=self.root)

        return self._submit(run)

    def discard(self, labels_nonempty: bool = False) -> Future:
        """Delete the earlier records (after the user chose to); later writes start anew.

        ``labels_nonempty``: the labels on screen hold objects (the next write saves them).
        """
        self.needs_snapshot = labels_nonempty

        def run():
            with self._lock:
                path = self.root / self.key
                shutil.rmtree(path, ignore_errors=True)
                self.store = None
                if path.exists():
                    raise AutosaveError(
                        f"could not delete the recovery folder {str(path)!r}; delete it by hand"
                    )

        return self._submit(run)

    # -- writing
    def patch(self, offset, values, add=(), remove=()) -> Future:
        """Queue a :meth:`RecoveryStore.patch` (``values`` must be a copy: written later)."""
        return self._submit(self._write, "patch", offset, values, list(add), list(remove))

    def snapshot(self, labels, objects=()) -> Future:
        """Queue a :meth:`RecoveryStore.snapshot` (``labels`` must be a copy)."""
        self.needs_snapshot = False
        return self._submit(self._write, "snapshot", None, labels, list(objects), [])

    def _write(self, kind, offset, values, add, remove):
        with self._lock:
            if kind == "patch" and self._broken:
                # an earlier record is missing: patches alone would restore wrong labels
                self.needs_snapshot = True
                raise AutosaveError(
                    "not written: an earlier autosave failed; the next commit writes all "
                    "objects again"
                )
            try:
                if self.store is None or not (self.store.path / MANIFEST).exists():
                    self.store = RecoveryStore(
                        self.key,
                        shape=self.shape,
                        image_name=self.name,
                        source=self.source,
                        session=self.session,
                        root=self.root,
                    )
                if kind == "snapshot":
                    path = self.store.snapshot(values, add)
                else:
                    path = self.store.patch(offset, values, add=add, remove=remove)
            except Exception as e:
                self._broken = True
                self.needs_snapshot = True
                raise AutosaveError(
                    f"could not write the recovery folder {str(self.root / str(self.key))!r} "
                    f"({type(e).__name__}: {e})"
                ) from e
            self._broken = False
            return path

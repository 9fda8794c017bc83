"""Whole-stack SAM embeddings: computed slice by slice, kept on disk in zarr, cached in memory.

An :class:`EmbeddingStore` serves the image embedding of any slice of a stack. A slice's
embedding is looked up in this order:

1. an in-memory LRU cache bounded in bytes (``cache_bytes``);
2. the on-disk zarr v3 store (when ``path`` is given), one chunk per slice;
3. the image encoder (through the predictor), after which it is written to both.

The stack may be a numpy array, a dask array or a zarr array (anything indexable that
returns numpy for one slice); only one slice is read at a time, never the whole volume.

On-disk layout (a zarr v3 group, ``zarr.storage.LocalStore``)::

    <path>/
      zarr.json        group attributes: {"napari_sam_embeddings": signature}
      features         (Z, C, h, w) float16 (default) or float32, chunks (1, C, h, w);
                       with V test-time views (``SamPredictor(tta=V)``) (Z, V*C, h, w)
      slice_hash       (Z, 16) uint8, chunks (1, 16): blake2b-128 of each encoded slice
      done             (Z,) uint8, chunks (1,): 1 once features and hash of z are written

The *signature* records what the embeddings depend on: the stack's shape, dtype and slice
axis, the model name and a hash of its weights, the preprocessing (contrast) key, the
encoder input size, the feature shape and storage dtype, and the package version. The
content of the image is checked slice-wise: each encoded slice stores the hash of the
image data it was computed from. Opening a store whose signature differs, or whose done
slices no longer hash to the stored values, raises :class:`EmbeddingMismatchError`
naming what differs; it is never silently reused. Use a new path or ``overwrite=True``.
With ``verify="repair"`` a done slice is checked when it is first read from disk and, if
its image changed, encoded again and overwritten (listed in ``stale_slices``) instead.

The napari widget keeps one store per (image, model, preprocessing, slice axis) in the
user cache (:func:`cache_root`, :func:`open_cached_store`): ``$NAPARI_SAM_EMBEDDINGS``
names another folder, or ``memory`` to keep embeddings in memory only. That folder is
capped at ``$NAPARI_SAM_EMBEDDINGS_MAX_GB`` (default 20 GB): opening a store deletes the
least recently used stores not in use (:mod:`napari_sam.embedding_cache`).

Writes are ordered ``features[z]`` -> ``slice_hash[z]`` -> ``done[z]`` and each chunk is
written atomically by zarr's LocalStore, so an interrupted run leaves only complete
slices marked done; reopening the store resumes with the missing slices.

Thread safety: :meth:`EmbeddingStore.get` and :meth:`EmbeddingStore.precompute` may be
called from several threads (e.g. a precompute worker and the UI thread). The encoder
runs under one lock, so the predictor given to the store must not be used for decoding
by another thread at the same time; give the store its own predictor sharing the model
(``SamPredictor(model, cache_bytes=0)`` is cheap; ``cache_bytes=0`` because the store
caches already) when decoding should overlap encoding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from napari_sam import embedding_cache as _cache
from napari_sam.embedding_cache import (  # noqa: F401 (re-exported)
    ENV_EMBEDDINGS,
    ENV_MAX_GB,
    _cache_dir,
    cache_root,
    cache_usage,
    prune_cache,
)

__all__ = [
    "EmbeddingMismatchError",
    "EmbeddingStore",
    "PrecomputeEvent",
    "StoredEmbedding",
    "cache_root",
    "cache_usage",
    "cached_store_path",
    "default_store_path",
    "hash_slice",
    "hash_weights",
    "model_weights_hash",
    "open_cached_store",
    "prune_cache",
    "stack_fingerprint",
]

_ATTR_KEY = "napari_sam_embeddings"
_FORMAT = 1


class EmbeddingMismatchError(ValueError):
    """An existing embedding store was made for other data, model or settings."""


@dataclass
class StoredEmbedding:
    """One slice's image embedding in the predictor's frame.

    features: ``(1, C, h, w)`` float32 torch tensor (C=256, h=w=64 for official SAM).
    input_size: ``(rows, cols)`` of the slice after resizing the longest side to the
        encoder size (before padding). original_size: ``(rows, cols)`` of the slice.
    Used only when ``napari_sam.predictor.Embedding`` is not available.
    """

    features: Any
    input_size: tuple[int, int]
    original_size: tuple[int, int]


@dataclass(frozen=True)
class PrecomputeEvent:
    """Progress of :meth:`EmbeddingStore.iter_precompute`, one per handled slice.

    z: slice index; done/total: slices handled so far / to handle in this run;
    computed: True if the encoder ran for it (False: it was already stored);
    seconds: time spent on this slice.
    """

    z: int
    done: int
    total: int
    computed: bool
    seconds: float


def _make_embedding(features, input_size, original_size):
    """Build the predictor's ``Embedding`` (falls back to :class:`StoredEmbedding`)."""
    try:
        from napari_sam.predictor import Embedding
    except ImportError:  # predictor not available (development / reference tests)
        Embedding = StoredEmbedding
    return Embedding(
        features=features, input_size=tuple(input_size), original_size=tuple(original_size)
    )


def hash_slice(image: np.ndarray) -> bytes:
    """blake2b-128 of a slice's shape, dtype and bytes (16 bytes)."""
    image = np.ascontiguousarray(image)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((image.shape, image.dtype.str)).encode())
    h.update(memoryview(image).cast("B"))
    return h.digest()


def hash_weights(model) -> str:
    """blake2b-128 hex digest of a torch module's state_dict (names, dtypes, shapes, values)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        if t.numel():
            h.update(t.view(-1).view(_byte_dtype()).numpy())  # a view, no copy
    return h.hexdigest()


_WEIGHTS_HASHES: Any = None  # WeakKeyDictionary model -> (version token, hash)
_WEIGHTS_LOCK = threading.Lock()


def model_weights_hash(model) -> str:
    """:func:`hash_weights` of a model, remembered while its parameters are unchanged.

    O(model size) on the first call (about 0.5 s for SAM vit_b on one CPU core); call it
    off the GUI thread. Any in-place change or replacement of a parameter or buffer (e.g.
    fine-tuning) gives a new hash.
    """
    import weakref

    from napari_sam.predictor import _weights_token

    global _WEIGHTS_HASHES
    token = _weights_token(model)
    with _WEIGHTS_LOCK:
        if _WEIGHTS_HASHES is None:
            _WEIGHTS_HASHES = weakref.WeakKeyDictionary()
        known = _WEIGHTS_HASHES.get(model)
    if known is not None and known[0] == token:
        return known[1]
    digest = hash_weights(model)
    with _WEIGHTS_LOCK:
        _WEIGHTS_HASHES[model] = (token, digest)
    return digest


def _preprocess_key(predictor) -> str:
    """What the predictor's preprocessing contributes to the signature (contrast key and
    encoder dtype)."""
    contrast = getattr(predictor, "contrast", None)
    key = getattr(contrast, "key", None)
    preprocess_key = key() if callable(key) else repr(contrast)
    encoder_dtype = getattr(predictor, "encoder_dtype", None)
    if encoder_dtype is not None:  # a bfloat16 encoder gives other features
        preprocess_key += f"|encoder {encoder_dtype}"
    tta = getattr(predictor, "tta", 1)
    if tta != 1:  # flipped views stored with each slice
        preprocess_key += f"|tta {tta}"
    min_side = getattr(getattr(predictor, "transform", None), "min_side", None)
    if min_side is not None:  # small slices not enlarged to the input size: other features
        preprocess_key += f"|min side {min_side}"
    return preprocess_key


def _byte_dtype():
    import torch

    return torch.uint8


def default_store_path(
    image_path: str | os.PathLike | None = None, *, key: str, in_cache: bool = False
) -> Path:
    """Where to keep a stack's embeddings.

    Next to the image (``<image>.napari-sam/<key>.zarr``) when ``image_path`` is given and
    ``in_cache`` is False, otherwise ``<cache dir>/embeddings/<key>.zarr`` (cache dir:
    ``$NAPARI_SAM_CACHE`` or the platform user cache). ``key`` should name the model and
    preprocessing (e.g. ``"vit_b-p1-99"``) so that different settings use different stores.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    if not safe:
        raise ValueError("key must contain at least one letter or digit, e.g. 'vit_b'")
    if image_path is not None and not in_cache:
        p = Path(image_path)
        return p.with_name(p.name + ".napari-sam") / f"{safe}.zarr"
    return _cache_dir() / "embeddings" / f"{safe}.zarr"


def stack_fingerprint(stack, planes: int = 8) -> str:
    """A cheap content key of a stack: shape, dtype and the bytes of up to ``planes``
    evenly spaced planes along axis 0 (blake2b-128 hex; reads at most ``planes`` planes).

    Two stacks that differ only between the sampled planes share a fingerprint; stores
    opened with ``verify="repair"`` still never serve such a slice (its own hash is
    checked when it is first read).
    """
    shape = tuple(int(s) for s in stack.shape)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((shape, np.dtype(stack.dtype).str)).encode())
    n = shape[0] if shape else 0
    for i in sorted({int(round(x)) for x in np.linspace(0, n - 1, min(n, planes))}):
        plane = stack[i]
        if hasattr(plane, "compute"):  # dask
            plane = plane.compute()
        h.update(hash_slice(np.asarray(plane)))
    return h.hexdigest()


def cached_store_path(
    stack,
    *,
    axis: int,
    model_name: str,
    weights_hash: str,
    preprocess_key: str,
    dtype: str = "float32",
    root: str | os.PathLike | None = None,
) -> Path:
    """``<root>/<key>.zarr`` for a stack's embeddings along ``axis`` with one model and
    preprocessing; ``key`` hashes :func:`stack_fingerprint`, the axis, the model name and
    weights hash, the preprocessing key and the stored dtype, so the same image with the
    same model finds its store again and anything else gets another one. ``root``:
    default :func:`cache_root` (or ``<cache dir>/embeddings`` when that is "memory")."""
    if root is None:
        root = _cache.default_root()
    parts = (stack_fingerprint(stack), f"axis {axis % 3}", model_name, weights_hash,
             preprocess_key, np.dtype(dtype).name)  # fmt: skip
    key = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).hexdigest()
    return Path(root) / f"{key}.zarr"


def open_cached_store(
    stack,
    predictor,
    *,
    axis: int,
    model_name: str,
    weights_hash: str | None = None,
    root: str | os.PathLike | None = None,
    dtype: Literal["float16", "float32"] = "float32",
    cache_bytes: int = 512 * 2**20,
    max_bytes: int | None | Literal["env"] = "env",
) -> tuple[EmbeddingStore, str]:
    """The GUI's store of a stack: on disk under ``root`` (default :func:`cache_root`),
    reopened when it exists. Returns ``(store, note)``; ``note`` is "" or says what
    happened instead, for the status line:

    - a store at that path made with other settings (another package version, a damaged
      store, ...) is deleted and computed again (never reused);
    - ``root`` "memory" (``NAPARI_SAM_EMBEDDINGS=memory``: note "") or not writable: an
      in-memory store;
    - the folder's stores exceed ``max_bytes`` (default "env":
      ``$NAPARI_SAM_EMBEDDINGS_MAX_GB``, 20 GB; None: no cap): the least recently used
      stores not in use are deleted (:func:`~napari_sam.embedding_cache.prune_cache`;
      never this one) and the note says how much was freed. A bad value of the variable
      is named in the note and the default cap applies.

    The store is leased (``<root>/.in-use/``) while the returned object lives, so no
    process deletes it meanwhile. O(model size) for the weights hash on the first call per
    model, O(8 planes) for the fingerprint and O(files in the folder) ``stat`` calls for
    the cap; done slices are checked one by one when read (``verify="repair"``). Call it
    off the GUI thread. Never raises for an unusable folder.
    """
    if weights_hash is None:
        weights_hash = model_weights_hash(predictor.model)
    kw = {
        "axis": axis,
        "dtype": dtype,
        "cache_bytes": cache_bytes,
        "model_name": model_name,
        "weights_hash": weights_hash,
    }
    if root is None and cache_root() is None:
        return EmbeddingStore(stack, predictor, **kw), ""
    path = cached_store_path(
        stack,
        axis=axis,
        model_name=model_name,
        weights_hash=weights_hash,
        preprocess_key=_preprocess_key(predictor),
        dtype=dtype,
        root=root,
    )
    release = None
    try:
        _discard_partial(path)
        release = _cache.acquire_lease(path)
        try:
            store, note = EmbeddingStore(stack, predictor, path, verify="repair", **kw), ""
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - other settings or a damaged store
            store = EmbeddingStore(stack, predictor, path, overwrite=True, **kw)
            note = (
                f"the stored embeddings of this stack ({path}) do not fit "
                f"({_mismatch_summary(e)}): computing them again"
            )
    except OSError as e:  # unwritable / full / not a folder; FileExistsError too
        if release is not None:
            release()
        store = EmbeddingStore(stack, predictor, **kw)
        return store, (
            f"embeddings are kept in memory only: cannot use the embedding cache {path.parent} "
            f"({type(e).__name__}: {e}). Set {ENV_EMBEDDINGS} to a folder you can write to."
        )
    store._claims.append(weakref.finalize(store, release))
    cap_note = _enforce_cap(path, max_bytes)
    return store, "; ".join(n for n in (note, cap_note) if n)


def _discard_partial(path: Path) -> None:
    """Delete a cache store folder without metadata (its files were removed while a
    process used it); it would otherwise block the store's path."""
    try:
        partial = path.is_dir() and not (path / "zarr.json").exists() and any(path.iterdir())
    except OSError:
        return
    if partial and not _cache.is_in_use(path):
        trash = _cache._discard(path)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _enforce_cap(path: Path, max_bytes: int | None | str) -> str:
    """Prune the folder of ``path`` to ``max_bytes`` (keeping ``path``); a note or ""."""
    warning = ""
    if max_bytes == "env":
        try:
            max_bytes = _cache.max_cache_bytes()
        except ValueError as e:
            max_bytes = _cache.DEFAULT_MAX_GB * _cache.GIB
            warning = f"{e} (using the default, {_cache.DEFAULT_MAX_GB} GB)"
    try:
        removed = prune_cache(max_bytes, path.parent, keep=[path], background=True)
    except OSError:  # never fail an open over housekeeping
        removed = []
    if removed:
        freed = _cache.format_bytes(sum(s.nbytes for s in removed))
        removal = (
            f"embedding cache over {_cache.format_bytes(max_bytes)} ({ENV_MAX_GB}): removed "
            f"{len(removed)} least recently used store(s), {freed} freed"
        )
        return "; ".join(n for n in (warning, removal) if n)
    return warning


def _mismatch_summary(exc: Exception) -> str:
    lines = [x.strip() for x in str(exc).splitlines() if x.startswith("  ")]
    return "; ".join(lines) if lines else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"


class _ByteLRU:
    """Thread-safe LRU of numpy arrays bounded by their total ``nbytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: int) -> bool:
        return key in self._items

    def get(self, key: int) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: int, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[key] = value
            self._bytes += value.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _normalize_stack(stack, axis: int) -> tuple[tuple[int, ...], np.dtype, int]:
    shape = tuple(int(s) for s in getattr(stack, "shape", ()))
    if not shape:
        raise TypeError(
            f"stack must be an array with a shape (numpy, dask or zarr), got {type(stack).__name__}"
        )
    rgb = len(shape) == 4 and shape[-1] in (3, 4)
    if len(shape) != 3 and not rgb:
        raise ValueError(
            f"stack must be 3D (Z, Y, X) or RGB (Z, Y, X, 3), got shape {shape}; "
            "select a single channel/time point first"
        )
    if not -3 <= axis < 3:
        raise ValueError(f"axis must be one of the 3 spatial axes (0, 1, 2), got {axis}")
    axis = axis % 3
    dtype = np.dtype(getattr(stack, "dtype", np.float32))
    return shape, dtype, axis


class EmbeddingStore:
    """Embeddings of the slices of one stack along one axis, for one model and preprocessing.

    Parameters
    ----------
    stack : array ``(Z, Y, X)`` or ``(Z, Y, X, 3)`` (numpy, dask, zarr). Slices are taken
        along ``axis`` (0, 1 or 2; the RGB axis, if any, stays last).
    predictor : object with ``set_image(image)`` and ``get_embedding()`` (and ``.model``),
        used to encode slices (see module notes on threads).
    path : directory of the zarr store, or None for memory only.
    dtype : ``"float16"`` (default, half the size) or ``"float32"`` for the stored features.
    compressors : zarr v3 compressors for the features (default None: embeddings compress
        poorly and decompression costs time; e.g. ``zarr.codecs.ZstdCodec(level=1)``).
    cache_bytes : budget of the in-memory LRU (bytes of stored-dtype features).
    model_name, weights_hash, preprocess_key : signature fields; derived from the predictor
        when None (its ``model_key`` or the model type, blake2b of the state_dict,
        ``contrast.key()`` plus the encoder dtype).
    overwrite : delete an existing store at ``path`` and start a new one.
    verify : ``"open"`` hashes every done slice of ``stack`` on open and refuses
        mismatches (O(volume) work in the constructor); ``"lazy"`` checks each slice when
        its embedding is first read from disk and refuses a mismatch then; ``"repair"``
        checks like ``"lazy"`` but encodes a changed slice again and overwrites it
        (``stale_slices`` lists them; :meth:`is_done` trusts the store until the slice is
        read); ``"none"`` trusts the store (only the non-content signature is checked).
    """

    def __init__(
        self,
        stack,
        predictor,
        path: str | os.PathLike | None = None,
        *,
        axis: int = 0,
        dtype: Literal["float16", "float32"] = "float16",
        compressors: Any = None,
        cache_bytes: int = 512 * 2**20,
        model_name: str | None = None,
        weights_hash: str | None = None,
        preprocess_key: str | None = None,
        overwrite: bool = False,
        verify: Literal["open", "lazy", "repair", "none"] = "open",
    ):
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if verify not in ("open", "lazy", "repair", "none"):
            raise ValueError(f"verify must be 'open', 'lazy', 'repair' or 'none', got {verify!r}")
        for attr in ("set_image", "get_embedding"):
            if not callable(getattr(predictor, attr, None)):
                raise TypeError(
                    f"predictor must have set_image() and get_embedding() (a "
                    f"napari_sam.SamPredictor); {type(predictor).__name__} lacks {attr}()"
                )
        self.stack = stack
        self.predictor = predictor
        self.shape, self.image_dtype, self.axis = _normalize_stack(stack, axis)
        self.n_slices = self.shape[self.axis]
        self.dtype = np.dtype(dtype)
        self.path = None if path is None else Path(path)
        self.verify = verify
        self._compressors_arg = compressors
        self.encoder_runs = 0
        self._cache = _ByteLRU(cache_bytes)
        self._encode_lock = threading.RLock()
        self._meta_lock = threading.Lock()
        self._priority: deque[int] = deque()
        self._verified: set[int] = set()
        #: slices found changed on disk and encoded again (``verify="repair"``)
        self.stale_slices: list[int] = []
        self._geometry: tuple[tuple[int, int], tuple[int, int]] | None = None
        self._done_mem: np.ndarray = np.zeros(self.n_slices, dtype=bool)

        model = getattr(predictor, "model", None)
        encoder = getattr(model, "image_encoder", None)
        img_size = getattr(encoder, "img_size", None)
        if model_name is None:
            model_name = (
                getattr(predictor, "model_key", None)
                or getattr(model, "model_type", None)
                or getattr(model, "name", None)
                or type(encoder).__name__
            )
        if weights_hash is None:
            if model is None or not hasattr(model, "state_dict"):
                raise TypeError("predictor.model is missing: pass weights_hash= explicitly")
            weights_hash = hash_weights(model)
        if preprocess_key is None:
            preprocess_key = _preprocess_key(predictor)
        from napari_sam import __version__

        self.signature: dict[str, Any] = {
            "format": _FORMAT,
            "stack_shape": list(self.shape),
            "stack_dtype": self.image_dtype.str,
            "axis": self.axis,
            "model_name": str(model_name),
            "weights_hash": str(weights_hash),
            "preprocess": str(preprocess_key),
            "encoder_input_size": None if img_size is None else int(img_size),
            "store_dtype": self.dtype.name,
            "package_version": __version__,
        }
        self._group = None
        self._claims: list[weakref.finalize] = []  # released by close() or on collection
        if self.path is not None:
            self._open_disk(overwrite)

    # ------------------------------------------------------------------ disk
    def _open_disk(self, overwrite: bool) -> None:
        import zarr

        store = zarr.storage.LocalStore(self.path)
        exists = (self.path / "zarr.json").exists()
        if exists and not overwrite:
            group = zarr.open_group(store=store, mode="r+")
            stored = dict(group.attrs.get(_ATTR_KEY) or {})
            if not stored:
                raise EmbeddingMismatchError(
                    f"{self.path} is a zarr group but not a napari-sam embedding store; "
                    "choose another path or pass overwrite=True to replace it"
                )
            self._check_signature(stored)
            self._group = group
            self._done_mem = np.asarray(group["done"][:], dtype=bool)
            geom = stored.get("geometry")
            if geom:
                self._geometry = (tuple(geom["input_size"]), tuple(geom["original_size"]))
            self.signature["feature_shape"] = stored.get("feature_shape")
            if self.verify == "open":
                self._verify_slices(np.flatnonzero(self._done_mem))
        else:
            if exists or (self.path.exists() and any(self.path.iterdir())):
                self._remove_existing()
            self.path.mkdir(parents=True, exist_ok=True)
            self._group = zarr.open_group(store=store, mode="w")
            self._group.attrs[_ATTR_KEY] = {**self.signature, "feature_shape": None}
            self._group.create_array(
                "done", shape=(self.n_slices,), chunks=(1,), dtype="uint8", fill_value=0,
                compressors=None,
            )  # fmt: skip
            self._group.create_array(
                "slice_hash", shape=(self.n_slices, 16), chunks=(1, 16), dtype="uint8",
                fill_value=0, compressors=None,
            )  # fmt: skip
        # in use until closed or garbage collected: never pruned from the cache meanwhile
        self._claims.append(_cache.register_open(self, self.path))

    def close(self) -> None:
        """Stop claiming the on-disk store and drop the in-memory LRU.

        The store then no longer counts as in use for the embedding cache's size cap
        (:mod:`napari_sam.embedding_cache`): a later prune may delete its files, so do not
        use this object afterwards. Idempotent; also happens when it is garbage collected.
        The widget closes a session's stores when the session ends.
        """
        for claim in self._claims:
            claim()
        self._cache.clear()

    def _remove_existing(self) -> None:
        """Delete the store at ``path`` for overwrite=True, but never anything else."""
        import shutil

        import zarr

        try:
            ours = _ATTR_KEY in zarr.open_group(self.path, mode="r").attrs
        except Exception:  # noqa: BLE001 - not a zarr group at all
            ours = False
        if not ours:
            raise FileExistsError(
                f"{self.path} exists and is not a napari-sam embedding store; refusing to "
                "delete it. Choose another path for the embeddings."
            )
        shutil.rmtree(self.path)

    def _check_signature(self, stored: dict) -> None:
        diffs = []
        labels = {
            "format": "store format",
            "stack_shape": "stack shape",
            "stack_dtype": "stack dtype",
            "axis": "slice axis",
            "model_name": "model",
            "weights_hash": "model weights (hash)",
            "preprocess": "preprocessing/contrast",
            "encoder_input_size": "encoder input size",
            "store_dtype": "stored dtype",
            "package_version": "napari-sam version",
        }
        for key, label in labels.items():
            if stored.get(key) != self.signature[key]:
                diffs.append(f"{label}: stored {stored.get(key)!r}, now {self.signature[key]!r}")
        if diffs:
            raise EmbeddingMismatchError(
                f"the embedding store at {self.path} was computed with different settings:\n  "
                + "\n  ".join(diffs)
                + "\nIts embeddings cannot be reused. Use a new path for these settings, or "
                "pass overwrite=True to delete it and recompute."
            )

    def _verify_slices(self, slices: Iterable[int]) -> None:
        slices = [int(z) for z in slices if int(z) not in self._verified]
        if not slices:
            return
        stored = self._group["slice_hash"]
        bad = []
        for z in slices:
            if hash_slice(self.read_slice(z)) != bytes(np.asarray(stored[z], dtype=np.uint8)):
                bad.append(z)
            else:
                self._verified.add(z)
        if bad:
            shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
            raise EmbeddingMismatchError(
                f"the embedding store at {self.path} was computed from different image data: "
                f"{len(bad)} slice(s) along axis {self.axis} changed (z = {shown}). "
                "Its embeddings cannot be reused. Use a new path for this image, or pass "
                "overwrite=True to delete it and recompute."
            )

    def _ensure_features_array(self, feats: np.ndarray, input_size, original_size):
        """Create the features array on first write (its shape comes from the model)."""
        with self._meta_lock:
            if "features" in self._group:
                return self._group["features"]
            c, h, w = feats.shape
            arr = self._group.create_array(
                "features", shape=(self.n_slices, c, h, w), chunks=(1, c, h, w),
                dtype=self.dtype, fill_value=0, compressors=self._compressors_arg,
            )  # fmt: skip
            attrs = dict(self._group.attrs[_ATTR_KEY])
            attrs["feature_shape"] = [c, h, w]
            attrs["geometry"] = {
                "input_size": list(input_size),
                "original_size": list(original_size),
            }
            self._group.attrs[_ATTR_KEY] = attrs
            self.signature["feature_shape"] = [c, h, w]
            return arr

    # ------------------------------------------------------------------ data
    def read_slice(self, z: int) -> np.ndarray:
        """Slice ``z`` along the store axis as numpy: ``(Y, X)`` or ``(Y, X, 3)``."""
        z = self._check_z(z)
        index = [slice(None)] * len(self.shape)
        index[self.axis] = z
        data = self.stack[tuple(index)]
        if hasattr(data, "compute"):  # dask
            data = data.compute()
        return np.asarray(data)

    def _check_z(self, z) -> int:
        if isinstance(z, bool) or not isinstance(z, int | np.integer):
            raise TypeError(f"slice index must be an int, got {type(z).__name__}")
        z = int(z)
        if not 0 <= z < self.n_slices:
            raise IndexError(
                f"slice {z} is outside the stack: axis {self.axis} has {self.n_slices} slices "
                f"(0..{self.n_slices - 1})"
            )
        return z

    @property
    def slice_shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of one slice (without the RGB axis)."""
        return tuple(s for i, s in enumerate(self.shape[:3]) if i != self.axis)

    def is_done(self, z: int) -> bool:
        """True if slice z's embedding is available without running the encoder."""
        z = self._check_z(z)
        return bool(self._done_mem[z]) or z in self._cache

    def missing(self, slices: Iterable[int] | None = None) -> list[int]:
        """Slices (in the given order) whose embedding would need an encoder run."""
        slices = range(self.n_slices) if slices is None else slices
        return [int(z) for z in slices if not self.is_done(z)]

    @property
    def cache_nbytes(self) -> int:
        """Bytes currently held by the in-memory LRU."""
        return self._cache.nbytes

    def clear_memory(self) -> None:
        """Drop the in-memory LRU (the disk store is kept)."""
        self._cache.clear()

    def get(self, z: int, *, cache: bool = True):
        """Embedding of slice ``z`` (the predictor's ``Embedding``), computing it if needed.

        ``cache=False`` does not insert a newly read/computed embedding into the LRU (used
        by precompute so that a long run does not evict what the user works on).
        """
        feats = self._get_array(z, cache=cache)
        return self._to_embedding(feats)

    def set_predictor_slice(self, predictor, z: int) -> None:
        """``predictor.set_embedding(self.get(z))``: make ``predictor`` ready to decode z."""
        predictor.set_embedding(self.get(z))

    def _to_embedding(self, feats: np.ndarray):
        import torch

        device = getattr(self.predictor, "device", None)
        views = int(getattr(self.predictor, "tta", 1))  # test-time views, stored as channels
        t = torch.from_numpy(np.asarray(feats, dtype=np.float32))
        t = t.reshape(views, -1, *t.shape[-2:])
        if device is not None:
            t = t.to(device)
        input_size, original_size = self._geometry
        return _make_embedding(t, input_size, original_size)

    def _get_array(self, z: int, cache: bool = True) -> np.ndarray:
        z = self._check_z(z)
        feats = self._cache.get(z)
        if feats is not None:
            return feats
        if self._done_mem[z] and self._group is not None:
            feats = self._read_disk(z)  # None: changed slice to repair
        if feats is None:
            with self._encode_lock:
                # Another thread may have produced it while we waited for the lock.
                feats = self._cache.get(z)
                if feats is not None:
                    return feats
                if self._done_mem[z] and self._group is not None:
                    feats = self._read_disk(z)
                if feats is None:
                    feats = self._compute(z)
        if cache:
            self._cache.put(z, feats)
        return feats

    def verify_slice(self, z: int) -> bool:
        """Check now (reads and hashes slice z) that z's stored embedding was computed from
        this image. True if it was, or z is not on disk, or was checked before, or
        ``verify="none"``. A changed slice raises :class:`EmbeddingMismatchError`, except
        with ``verify="repair"``: it becomes missing (encoded on the next :meth:`get`) and
        this returns False."""
        z = self._check_z(z)
        if (
            self._group is None
            or self.verify == "none"
            or not self._done_mem[z]
            or z in self._verified
        ):
            return True
        if self.verify != "repair":
            self._verify_slices([z])
            return True
        stored = bytes(np.asarray(self._group["slice_hash"][z], dtype=np.uint8))
        if hash_slice(self.read_slice(z)) != stored:
            with self._meta_lock:
                if self._done_mem[z]:
                    self._done_mem[z] = False
                    self.stale_slices.append(z)
            return False
        self._verified.add(z)
        return True

    def _read_disk(self, z: int) -> np.ndarray | None:
        """Stored features of z; None if ``verify="repair"`` found its image changed."""
        if self.verify in ("lazy", "repair") and not self.verify_slice(z):
            return None
        return np.asarray(self._group["features"][z])

    def _compute(self, z: int) -> np.ndarray:
        image = self.read_slice(z)
        digest = hash_slice(image) if self._group is not None else None
        self.predictor.set_image(image)
        emb = self.predictor.get_embedding()
        self.encoder_runs += 1
        features = emb.features
        if features.ndim == 4:  # (views, C, h, w): test-time views stored as channels
            features = features.reshape(-1, *features.shape[-2:])
        feats = features.detach().to("cpu", copy=False).float().numpy().astype(self.dtype)
        geometry = (tuple(map(int, emb.input_size)), tuple(map(int, emb.original_size)))
        if self._geometry is None:
            self._geometry = geometry
        elif geometry != self._geometry:
            raise ValueError(
                f"slice {z} gave input/original size {geometry}, other slices {self._geometry}; "
                "all slices of a stack must have the same size"
            )
        if self._group is not None:
            arr = self._ensure_features_array(feats, *geometry)
            if tuple(arr.shape[1:]) != feats.shape:
                raise EmbeddingMismatchError(
                    f"the embedding store at {self.path} holds features of shape "
                    f"{tuple(arr.shape[1:])}, the model gives {feats.shape}; use a new path "
                    "or overwrite=True"
                )
            arr[z] = feats
            self._group["slice_hash"][z] = np.frombuffer(digest, dtype=np.uint8)
            self._group["done"][z] = 1
            self._verified.add(z)
        self._done_mem[z] = self._group is not None
        return feats

    # ------------------------------------------------------------ precompute
    def priority(self, z: int) -> None:
        """Ask a running (or the next) precompute to handle slice ``z`` next.

        Thread-safe; the most recent request goes first. Typically called by the UI when
        the user moves to slice z.
        """
        z = self._check_z(z)
        with self._meta_lock:
            if z in self._priority:
                self._priority.remove(z)
            self._priority.appendleft(z)

    def _next_slice(self, pending: list[int], pending_set: set[int]) -> int | None:
        with self._meta_lock:
            while self._priority:
                z = self._priority.popleft()
                if not self.is_done(z):
                    pending_set.discard(z)
                    return z
        while pending:
            z = pending.pop(0)
            if z in pending_set:
                pending_set.discard(z)
                return z
        return None

    def iter_precompute(
        self,
        slices: Iterable[int] | slice | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> Iterator[PrecomputeEvent]:
        """Compute missing embeddings of ``slices`` (default: all), one event per slice.

        Slices passed to :meth:`priority` while this runs are handled next, even when they
        are not in ``slices``. Stops early (between slices) when ``should_cancel()`` is true;
        what was computed is kept. Computed embeddings go to disk and, for a store without
        a path, to the LRU.
        """
        if slices is None:
            slices = range(self.n_slices)
        elif isinstance(slices, slice):
            slices = range(*slices.indices(self.n_slices))
        order = [self._check_z(z) for z in slices]
        pending = [z for z in dict.fromkeys(order) if not self.is_done(z)]
        pending_set = set(pending)
        total = len(pending)
        done = 0
        in_memory_only = self._group is None
        while True:
            if should_cancel is not None and should_cancel():
                return
            z = self._next_slice(pending, pending_set)
            if z is None:
                return
            t0 = time.perf_counter()
            computed = not self.is_done(z)
            if computed:
                self._get_array(z, cache=in_memory_only)
            done += 1
            total = max(total, done + len(pending_set))
            yield PrecomputeEvent(z, done, total, computed, time.perf_counter() - t0)

    def precompute(
        self,
        slices: Iterable[int] | slice | None = None,
        progress: Callable[[PrecomputeEvent], Any] | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> int:
        """Run :meth:`iter_precompute` to the end; returns the number of encoder runs."""
        runs = 0
        for event in self.iter_precompute(slices, should_cancel=should_cancel):
            runs += event.computed
            if progress is not None:
                progress(event)
        return runs

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "memory"
        n_done = int(self._done_mem.sum()) if self._group is not None else len(self._cache)
        return (
            f"EmbeddingStore({where}, {self.n_slices} slices along axis {self.axis}, "
            f"{n_done} stored, model {self.signature['model_name']!r}, {self.dtype.name})"
        )

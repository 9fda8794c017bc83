"""The user's own models (e.g. fine-tuned checkpoints): a small JSON list in the cache.

The list lives in ``<cache>/models/user_models.json`` (``<cache>`` as in
:func:`napari_sam.model.registry.cache_dir`, so ``$NAPARI_SAM_CACHE`` moves it)::

    {"format_version": 1,
     "models": [{"name": "nuclei-ft", "path": "/data/nuclei_ft.pt", "base_model": "nsam_s",
                 "created": "2026-01-01T12:00:00+00:00", "metrics": {...},
                 "description": "..."}]}

Entries point at checkpoint files anywhere on disk (loadable with
``napari_sam.load_model(path)``); the files themselves are never moved or deleted here.
Writes are atomic. A model picker calls :func:`list_user_models`; the fine-tuning widget
calls :func:`add_user_model` after saving. No torch, Qt or napari.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
FILENAME = "user_models.json"

__all__ = ["UserModel", "add_user_model", "list_user_models", "remove_user_model"]


@dataclass(frozen=True)
class UserModel:
    """One entry of the user model list.

    ``path``: absolute path of the checkpoint; ``metrics``: e.g. ``{"before": {...},
    "after": {...}}`` held-out mean IoUs from :func:`napari_sam.finetune.finetune`.
    """

    name: str
    path: str
    base_model: str = ""
    created: str = ""
    metrics: dict = field(default_factory=dict)
    description: str = ""

    @property
    def exists(self) -> bool:
        return Path(self.path).is_file()


def user_models_file(cache: str | os.PathLike | None = None) -> Path:
    """``<cache>/models/user_models.json`` (default cache: ``registry.cache_dir()``)."""
    from napari_sam.model.registry import cache_dir

    root = Path(cache).expanduser() if cache is not None else cache_dir()
    return root / "models" / FILENAME


def _read(file: Path) -> list[dict]:
    """Entries of ``file``; raises ValueError if it is not a user model list."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not readable JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise ValueError(f"{file} has no 'models' list")
    if doc.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{file} was written by a newer napari-sam (format {doc['format_version']})"
        )
    return [m for m in doc["models"] if isinstance(m, dict) and "name" in m and "path" in m]


def _entry(raw: dict) -> UserModel:
    known = {k: raw[k] for k in UserModel.__dataclass_fields__ if k in raw}
    return UserModel(**known)


def list_user_models(
    cache: str | os.PathLike | None = None, existing_only: bool = True
) -> list[UserModel]:
    """The user's models, oldest first.

    Args:
        cache: cache root (default ``registry.cache_dir()``).
        existing_only: leave out entries whose checkpoint file is gone (moved, deleted).

    A missing list is empty; an unreadable one gives a warning and an empty list (a model
    picker must still open).
    """
    file = user_models_file(cache)
    if not file.is_file():
        return []
    try:
        entries = [_entry(m) for m in _read(file)]
    except ValueError as e:
        warnings.warn(f"ignoring the user model list: {e}", stacklevel=2)
        return []
    return [m for m in entries if m.exists or not existing_only]


def _write(file: Path, entries: list[UserModel]) -> None:
    from napari_sam.io.atomic import atomic_write_text

    file.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format_version": FORMAT_VERSION, "models": [asdict(m) for m in entries]}
    atomic_write_text(file, json.dumps(doc, indent=2) + "\n", overwrite=True)


def _load_for_update(file: Path) -> list[UserModel]:
    if not file.is_file():
        return []
    try:
        return [_entry(m) for m in _read(file)]
    except ValueError as e:
        aside = file.with_name(f"{file.name}.unreadable-{datetime.datetime.now():%Y%m%d%H%M%S}")
        os.replace(file, aside)
        warnings.warn(f"{e}; moved it to {aside} and started a new list", stacklevel=3)
        return []


def add_user_model(
    path: str | os.PathLike,
    name: str | None = None,
    *,
    base_model: str = "",
    metrics: dict | None = None,
    description: str = "",
    cache: str | os.PathLike | None = None,
) -> UserModel:
    """Add (or update) the checkpoint ``path`` in the user model list and return its entry.

    ``name`` defaults to the file's stem; a name already used by another file gets a
    numbered suffix (``name-2``). Adding a path that is already listed replaces its entry.

    Raises:
        FileNotFoundError: ``path`` is not a file.
    """
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise FileNotFoundError(f"cannot add {p} to the user models: no such file")
    file = user_models_file(cache)
    entries = [m for m in _load_for_update(file) if Path(m.path) != p]
    taken = {m.name for m in entries}
    base = (name or p.stem).strip() or p.stem
    unique, n = base, 2
    while unique in taken:
        unique, n = f"{base}-{n}", n + 1
    entry = UserModel(
        name=unique,
        path=str(p),
        base_model=str(base_model or ""),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        metrics=json.loads(json.dumps(metrics or {})),
        description=description,
    )
    _write(file, [*entries, entry])
    return entry


def remove_user_model(name_or_path: str | os.PathLike, cache=None) -> bool:
    """Remove an entry by name or checkpoint path (the file is kept). True if one was removed."""
    file = user_models_file(cache)
    entries = _load_for_update(file)
    target = str(name_or_path)
    resolved = str(Path(target).expanduser().resolve())
    keep = [m for m in entries if m.name != target and m.path != resolved]
    if len(keep) == len(entries):
        return False
    _write(file, keep)
    return True

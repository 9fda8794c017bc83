"""Weights registry: known SAM checkpoints, a relocatable download cache and the loader.

Nothing here touches the network or imports torch at import time. Downloads are lazy,
resumable (HTTP Range), sha256-verified and atomic: a file only appears at its final
path after its checksum matched; until then it lives at ``<file>.part``.

Typical use::

    from napari_sam.model.registry import load_model
    sam = load_model("vit_b")                  # downloads once into the cache
    sam = load_model("/data/sam_vit_b_01ec64.pth")  # or any local checkpoint file
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import ssl
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_sam.model.checkpoint import (  # noqa: F401 (re-exported)
    CheckpointError,
    extract_sam_state_dict,
    load_checkpoint,
)

if TYPE_CHECKING:
    import torch

    from napari_sam.model.sam import Sam

ENV_CACHE = "NAPARI_SAM_CACHE"
Progress = Callable[[int, int], Any]  # (done_bytes, total_bytes); total is 0 when unknown

_CHUNK = 1 << 20
_NETWORK_ERRORS = (
    urllib.error.URLError,
    ConnectionError,
    TimeoutError,
    ssl.SSLError,
    http.client.HTTPException,
)


@dataclass(frozen=True)
class ModelInfo:
    """One downloadable checkpoint.

    ``sha256`` is None where no published value could be found; ``xxh128`` is the
    checksum some publishers (micro-sam) give instead, checked when ``xxhash`` is
    installed. ``filename`` is the name of the file in the cache directory.
    """

    name: str
    model_type: str  # vit_b | vit_l | vit_h | vit_t
    url: str
    filename: str
    sha256: str | None
    size_bytes: int | None
    license: str
    source: str  # where the URL, checksum, size and license come from
    description: str = ""
    xxh128: str | None = None


# Official SAM (https://github.com/facebookresearch/segment-anything, README "Model
# Checkpoints"; weights released under Apache-2.0). sha256 as pinned in micro-sam's registry
# (micro_sam/util.py at commit c2a4e54a09ea7cf05d18d195148b3f271e42e69a) and identical in
# many other projects that verify these files; sizes in bytes as recorded by several
# projects (e.g. Fooocus-derived model lists and download scripts).
_SAM_SOURCE = "github.com/facebookresearch/segment-anything README; sha256 from micro-sam util.py"
# MobileSAM (https://github.com/ChaoningZhang/MobileSAM, Apache-2.0): the weights live in
# the repository at weights/mobile_sam.pt, unchanged since commit a509aac (2023-06-29); the
# URL pins the latest commit. sha256 from micro-sam's registry (its vit_t mirror, added
# 2023-09-04) and the same value pinned for the GitHub file by other projects (e.g. Intel's
# visual-prompting code); size 40728226 from projects that pin size and hash together.
_MOBILESAM_COMMIT = "34bbbfdface3c18e5221aa7de6032d7220c6c6a1"
# micro-sam generalist models ("Segment Anything for Microscopy", Archit et al., Nature
# Methods 2025), hosted by BioImage.IO. URLs and xxh128 from micro-sam's registry
# (micro_sam/util.py at commit 3acdcd72958395d51c86da1414770b603a781173); micro-sam no
# longer publishes sha256 for these files and none was found elsewhere. License CC-BY-4.0
# as set by micro-sam's BioImage.IO export (micro_sam/bioimageio/model_export.py).
# File format: a SAM state_dict, or {"model_state": <SAM state_dict>, "decoder_state":
# <micro-sam instance-segmentation decoder>}; only "model_state" is used here.
_MICROSAM_SOURCE = "github.com/computational-cell-analytics/micro-sam micro_sam/util.py"
_BIOIMAGEIO = "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io"


def _sam(model_type: str, file: str, sha256: str, size: int, what: str) -> ModelInfo:
    return ModelInfo(
        name=model_type,
        model_type=model_type,
        url=f"https://dl.fbaipublicfiles.com/segment_anything/{file}",
        filename=file,
        sha256=sha256,
        size_bytes=size,
        license="Apache-2.0",
        source=_SAM_SOURCE,
        description=f"Segment Anything, {what} image encoder (Meta AI)",
    )


def _microsam(name: str, record: str, file: str, xxh128: str, what: str) -> ModelInfo:
    return ModelInfo(
        name=name,
        model_type=name[:5],
        url=f"{_BIOIMAGEIO}/{record}/files/{file}",
        filename=f"{name}.pt",
        sha256=None,
        size_bytes=None,
        license="CC-BY-4.0",
        source=f"{_MICROSAM_SOURCE} (BioImage.IO {record.split('/')[0]})",
        description=f"micro-sam {what} generalist, {name[:5]} encoder",
        xxh128=xxh128,
    )


MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        _sam(
            "vit_h",
            "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            2564550879,
            "ViT-H",
        ),
        _sam(
            "vit_l",
            "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            1249524607,
            "ViT-L",
        ),
        _sam(
            "vit_b",
            "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            375042383,
            "ViT-B",
        ),
        ModelInfo(
            name="vit_t",
            model_type="vit_t",
            url="https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/"
            f"{_MOBILESAM_COMMIT}/weights/mobile_sam.pt",
            filename="mobile_sam.pt",
            sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
            size_bytes=40728226,
            license="Apache-2.0",
            source="github.com/ChaoningZhang/MobileSAM weights/; sha256 from micro-sam util.py",
            description="MobileSAM, TinyViT image encoder distilled from SAM ViT-H",
        ),
        _microsam(
            "vit_t_lm",
            "faithful-chicken/1.1",
            "vit_t.pt",
            "72ec5074774761a6e5c05a08942f981e",
            "light microscopy",
        ),
        _microsam(
            "vit_b_lm",
            "diplomatic-bug/1.2",
            "vit_b.pt",
            "fe9252a29f3f4ea53c15a06de471e186",
            "light microscopy",
        ),
        _microsam(
            "vit_l_lm",
            "idealistic-rat/1.2",
            "vit_l.pt",
            "017f20677997d628426dec80a8018f9d",
            "light microscopy",
        ),
        _microsam(
            "vit_t_em_organelles",
            "greedy-whale/1",
            "vit_t.pt",
            "253474720c497cce605e57c9b1d18fd9",
            "EM organelles",
        ),
        _microsam(
            "vit_b_em_organelles",
            "noisy-ox/1.2",
            "vit_b.pt",
            "f3bf2ed83d691456bae2c3f9a05fb438",
            "EM organelles",
        ),
        _microsam(
            "vit_l_em_organelles",
            "humorous-crab/1.2",
            "vit_l.pt",
            "810b084b6e51acdbf760a993d8619f2d",
            "EM organelles",
        ),
    )
}


class DownloadError(RuntimeError):
    """A checkpoint could not be downloaded (offline, server error, interrupted)."""


class ChecksumError(DownloadError):
    """A downloaded file does not match its published checksum (it has been deleted)."""


# ----------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """The napari-sam cache root: ``$NAPARI_SAM_CACHE`` if set, else the platform's user
    cache directory (e.g. ``~/.cache/napari-sam`` on Linux). Weights go in ``models/``."""
    env = os.environ.get(ENV_CACHE, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-sam", appauthor=False))


def models_dir(cache: str | os.PathLike | None = None) -> Path:
    """Folder holding the weight files: ``cache`` if given, else ``cache_dir()/models``."""
    return Path(cache).expanduser() if cache is not None else cache_dir() / "models"


def get_info(name_or_info: str | ModelInfo) -> ModelInfo:
    """The registry entry for a name; a ``ModelInfo`` is returned as is."""
    if isinstance(name_or_info, ModelInfo):
        return name_or_info
    try:
        return MODELS[name_or_info]
    except KeyError:
        raise ValueError(
            f"Unknown model name {name_or_info!r}. Known models: {', '.join(MODELS)}; "
            "or pass the path of a checkpoint file."
        ) from None


def cached_path(name_or_info: str | ModelInfo, cache: str | os.PathLike | None = None) -> Path:
    """Where the model's file is (or will be) in the cache; it may not exist yet."""
    return models_dir(cache) / get_info(name_or_info).filename


# -------------------------------------------------------------------------- download


def download(
    name_or_info: str | ModelInfo,
    progress: Progress | None = None,
    cache: str | os.PathLike | None = None,
    verify_existing: bool = False,
) -> Path:
    """Return the path of the model's weight file, downloading it first if needed.

    The transfer goes to ``<file>.part`` and resumes an earlier partial file with an HTTP
    Range request (starting over if the server ignores it). ``progress(done, total)`` is
    called as bytes arrive. The file is renamed into place only after its checksum
    matched. A file already at the final path is trusted (its size is checked when known);
    ``verify_existing=True`` hashes it again.

    Raises:
        ValueError: unknown model name.
        DownloadError: the server could not be reached or the transfer broke off (the
            ``.part`` file is kept so that the next call resumes).
        ChecksumError: the data does not match the published checksum (nothing is kept).
    """
    info = get_info(name_or_info)
    dest = cached_path(info, cache)
    if dest.is_file():
        _check_existing(info, dest, verify_existing)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        _fetch(info, part, progress)
    except _NETWORK_ERRORS as e:  # disk errors (e.g. no space left) pass through as is
        raise DownloadError(_offline_message(info, dest, e)) from e
    _verify(info, part, delete_on_mismatch=True)
    os.replace(part, dest)
    return dest


def _fetch(info: ModelInfo, part: Path, progress: Progress | None) -> None:
    """Stream ``info.url`` into ``part``, resuming what is there."""
    offset = part.stat().st_size if part.exists() else 0
    if info.size_bytes is not None and offset > info.size_bytes:
        part.unlink()
        offset = 0
    if info.size_bytes is not None and offset == info.size_bytes:
        return  # complete from an earlier run; only the verification was missing
    headers = {"User-Agent": "napari-sam", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(info.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not offset:
            raise
        e.close()
        part.unlink()  # our partial file does not fit the server's file: start over
        return _fetch(info, part, progress)
    with response:
        total = _content_total(response)
        if response.status == 206:
            if _content_range_start(response) != offset:  # not the part we asked for
                response.close()
                part.unlink()
                return _fetch(info, part, progress)
            mode = "ab"
        else:  # 200: the server ignored the Range header, so the body is the whole file
            offset, mode = 0, "wb"
        if total == 0 and info.size_bytes:
            total = info.size_bytes
        done = offset
        with open(part, mode) as f:
            if progress is not None:
                progress(done, total)
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            f.flush()
            os.fsync(f.fileno())
    if total and done < total:
        raise http.client.IncompleteRead(b"", total - done)


def _content_total(response) -> int:
    """Full file size from Content-Range (206) or Content-Length (200); 0 if unknown."""
    match = re.match(r"bytes \d+-\d+/(\d+)", response.headers.get("Content-Range", ""))
    if match:
        return int(match.group(1))
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else 0


def _content_range_start(response) -> int:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else -1


def _offline_message(info: ModelInfo, dest: Path, error: BaseException) -> str:
    plain_url_error = isinstance(error, urllib.error.URLError) and not isinstance(
        error, urllib.error.HTTPError
    )
    reason = error.reason if plain_url_error else error
    return (
        f"Could not download {info.filename} (model {info.name!r}) from {info.url}: "
        f"{reason}.\nIf a partial download exists, running the same command again resumes "
        f"it. To work offline, fetch the file elsewhere and either put it at\n  {dest}\n"
        f"or pass its path instead of the name {info.name!r} (set {ENV_CACHE} to move the "
        "cache)."
    )


def file_hash(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (``sha256`` or ``xxh128``)."""
    if algorithm == "xxh128":
        import xxhash

        h = xxhash.xxh128()
    else:
        h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _verify(info: ModelInfo, path: Path, delete_on_mismatch: bool) -> None:
    if info.sha256:
        algorithm, expected = "sha256", info.sha256.lower()
    elif info.xxh128 and _has_xxhash():
        algorithm, expected = "xxh128", info.xxh128.lower()
    else:
        why = "no checksum is known"
        if info.xxh128:
            why = "only an xxh128 checksum is published; install 'xxhash' to check it"
        warnings.warn(
            f"{path.name} for model {info.name!r} could not be verified ({why}); "
            f"its sha256 is {file_hash(path)}.",
            stacklevel=3,
        )
        return
    actual = file_hash(path, algorithm)
    if actual != expected:
        if delete_on_mismatch:
            path.unlink(missing_ok=True)
        raise ChecksumError(
            f"{info.filename} from {info.url} is corrupt or not the published file: "
            f"{algorithm} {actual}, expected {expected}. "
            + ("The download was deleted; try again." if delete_on_mismatch else "")
            + "\nIf the problem persists, download it by hand and check it, or pass the "
            "path of a file you trust."
        )


def _check_existing(info: ModelInfo, path: Path, verify: bool) -> None:
    size = path.stat().st_size
    if info.size_bytes is not None and size != info.size_bytes:
        raise ChecksumError(
            f"{path} has {size} bytes, but {info.name!r} ({info.filename}) has "
            f"{info.size_bytes}. Delete it and download again."
        )
    if verify:
        _verify(info, path, delete_on_mismatch=False)


def _has_xxhash() -> bool:
    try:
        import xxhash  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- loading


def _default_checkpoint() -> Path | None:
    """The project's bundled default model (``napari_sam/weights/nsam_s.pt``), if shipped."""
    from napari_sam.model.small_encoder import default_weights

    path = default_weights()
    return path if path.is_file() else None


def resolve_checkpoint(
    name_or_path: str | os.PathLike | ModelInfo,
    progress: Progress | None = None,
    cache: str | os.PathLike | None = None,
) -> Path:
    """A registry name (downloaded if needed) or a local checkpoint path -> existing file."""
    if isinstance(name_or_path, ModelInfo) or (
        isinstance(name_or_path, str) and name_or_path in MODELS
    ):
        return download(name_or_path, progress=progress, cache=cache)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"Expected a model name or a checkpoint path, got {type(name_or_path).__name__}."
        )
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass the checkpoint file inside it.")
    looks_like_path = os.sep in str(name_or_path) or path.suffix in {".pt", ".pth", ".bin"}
    if looks_like_path:
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    raise ValueError(
        f"{str(name_or_path)!r} is neither a known model ({', '.join(MODELS)}) nor an "
        "existing checkpoint file."
    )


def load_model(
    name_or_path: str | os.PathLike | ModelInfo | None = None,
    device: str | torch.device = "auto",
    progress: Progress | None = None,
) -> Sam:
    """Build a SAM model from a registry name or a checkpoint file, in eval mode.

    ``name_or_path=None`` loads the project's default model. The model type (vit_b/l/h/t)
    is detected from the state_dict keys. ``device="auto"`` picks cuda > mps > cpu.
    """
    from napari_sam.devices import select_device

    target = select_device(device)  # a bad device fails before any download
    if name_or_path is None:
        name_or_path = _default_checkpoint()
        if name_or_path is None:
            raise ValueError(
                "No default model is bundled yet. Pass a model name "
                f"({', '.join(MODELS)}) or the path of a SAM checkpoint file."
            )
    path = resolve_checkpoint(name_or_path, progress=progress)
    state = load_checkpoint(path)

    from napari_sam.model.small_encoder import load_nsam, looks_like_nsam

    if looks_like_nsam(state):
        # The project's own small SAM: its config travels in a JSON sidecar.
        try:
            return load_nsam(path).to(target).eval()
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path} is a napari-sam small model but {e}") from e

    from napari_sam.model.build import build_sam, detect_model_type

    try:
        model_type = detect_model_type(state)
        model = build_sam(model_type, checkpoint=state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not match any known SAM architecture: {e}") from e
    return model.to(target).eval()

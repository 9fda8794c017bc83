"""Weights registry: data checks, cache location, resumable verified download, CLI.

Downloads go to a local HTTP server (tests/_httpserver.py) with small random files and
registry entries made in the test; the real entries are only checked as data.
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from _httpserver import FileServer, unreachable_url
from napari_sam import cli
from napari_sam.model import registry
from napari_sam.model.registry import (
    MODELS,
    ChecksumError,
    DownloadError,
    ModelInfo,
    cache_dir,
    download,
    resolve_checkpoint,
)

DATA = random.Random(0).randbytes(3 * 2**20 + 12345)  # a bit over 3 chunks of 1 MiB
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with FileServer() as s:
        yield s


def entry(url: str, **changes) -> ModelInfo:
    info = ModelInfo(
        name="tiny",
        model_type="vit_t",
        url=url,
        filename="tiny.pth",
        sha256=SHA,
        size_bytes=len(DATA),
        license="MIT",
        source="made by the test",
    )
    return replace(info, **changes)


class Recorder:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done, total):
        self.calls.append((done, total))


# ---------------------------------------------------------------------- registry data


def test_every_entry_is_complete_and_well_formed():
    assert {"vit_b", "vit_l", "vit_h", "vit_t"} <= set(MODELS)
    filenames = [m.filename for m in MODELS.values()]
    assert len(set(filenames)) == len(filenames), "two models would share a cache file"
    for name, m in MODELS.items():
        assert m.name == name
        assert m.model_type in {"vit_b", "vit_l", "vit_h", "vit_t"}
        assert m.url.startswith("https://"), name
        assert m.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", m.sha256), name
        assert m.xxh128 is None or re.fullmatch(r"[0-9a-f]{32}", m.xxh128), name
        assert m.sha256 or m.xxh128, f"{name} has no checksum at all"
        assert m.license and m.source and m.description, name
        assert m.size_bytes is None or m.size_bytes > 1_000_000, name
    for name in ("vit_b", "vit_l", "vit_h", "vit_t"):  # the official ones are fully pinned
        assert MODELS[name].sha256 and MODELS[name].size_bytes, name


def test_official_urls_point_at_the_official_files():
    base = "https://dl.fbaipublicfiles.com/segment_anything/"
    assert MODELS["vit_h"].url == base + "sam_vit_h_4b8939.pth"
    assert MODELS["vit_l"].url == base + "sam_vit_l_0b3195.pth"
    assert MODELS["vit_b"].url == base + "sam_vit_b_01ec64.pth"
    assert MODELS["vit_t"].url.endswith("/weights/mobile_sam.pt")


# ------------------------------------------------------------------------------ cache


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert registry.cached_path("vit_b") == tmp_path / "c" / "models" / "sam_vit_b_01ec64.pth"
    monkeypatch.delenv("NAPARI_SAM_CACHE")
    assert cache_dir().name == "napari-sam"


def test_download_by_name_goes_to_the_env_cache(server, monkeypatch, tmp_path):
    monkeypatch.setenv("NAPARI_SAM_CACHE", str(tmp_path))
    monkeypatch.setitem(MODELS, "tiny", entry(server.add("/w.pth", DATA)))
    path = download("tiny")
    assert path == tmp_path / "models" / "tiny.pth"
    assert path.read_bytes() == DATA


# --------------------------------------------------------------------------- download


def test_good_file_downloads_verifies_and_reports_progress(server, tmp_path):
    progress = Recorder()
    path = download(entry(server.add("/w.pth", DATA)), progress=progress, cache=tmp_path)
    assert path == tmp_path / "tiny.pth"
    assert path.read_bytes() == DATA
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]  # no .part left
    assert server.log == [{"path": "/w.pth", "range": None, "status": 200, "sent": len(DATA)}]
    done = [d for d, _ in progress.calls]
    assert done[0] == 0 and done[-1] == len(DATA)
    assert all(b > a for a, b in zip(done, done[1:], strict=False))  # strictly increasing
    assert len(done) >= 4  # one call per 1 MiB chunk
    assert {t for _, t in progress.calls} == {len(DATA)}


def test_corrupt_file_is_rejected_and_leaves_nothing(server, tmp_path):
    info = entry(server.add("/w.pth", DATA, mode="corrupt"))
    with pytest.raises(ChecksumError, match="sha256") as err:
        download(info, cache=tmp_path)
    assert SHA in str(err.value) and "tiny.pth" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_transfer_resumes_with_a_range_request(server, tmp_path):
    cut = 1_500_000
    url = server.add("/w.pth", DATA, mode=("cut", cut))
    with pytest.raises(DownloadError, match="again resumes"):
        download(entry(url), cache=tmp_path)
    part = tmp_path / "tiny.pth.part"
    assert part.stat().st_size == cut
    assert not (tmp_path / "tiny.pth").exists()

    server.routes["/w.pth"] = (DATA, "range")  # the connection is back
    progress = Recorder()
    path = download(entry(url), progress=progress, cache=tmp_path)
    assert path.read_bytes() == DATA
    assert not part.exists()
    resumed = server.log[-1]
    assert resumed["range"] == f"bytes={cut}-"
    assert resumed["status"] == 206
    assert resumed["sent"] == len(DATA) - cut  # only the remaining bytes were transferred
    assert progress.calls[0] == (cut, len(DATA))
    assert progress.calls[-1] == (len(DATA), len(DATA))


def test_resume_follows_redirects_with_the_range_header(server, tmp_path):
    server.add("/real.pth", DATA)
    url = server.add("/latest.pth", b"", mode=("redirect", "/real.pth"))
    (tmp_path / "tiny.pth.part").write_bytes(DATA[:1000])
    assert download(entry(url), cache=tmp_path).read_bytes() == DATA
    assert [(e["path"], e["status"]) for e in server.log] == [
        ("/latest.pth", 302),
        ("/real.pth", 206),
    ]
    assert server.log[-1]["range"] == "bytes=1000-"


def test_server_that_ignores_range_restarts_from_scratch(server, tmp_path):
    (tmp_path / "tiny.pth.part").write_bytes(b"stale bytes that must not survive")
    path = download(entry(server.add("/w.pth", DATA, mode="norange")), cache=tmp_path)
    assert path.read_bytes() == DATA
    assert server.log[-1]["range"] == "bytes=33-" and server.log[-1]["status"] == 200


def test_part_longer_than_remote_file_starts_over(server, tmp_path):
    # size unknown, so only the server's 416 reveals that the partial file does not fit
    (tmp_path / "tiny.pth.part").write_bytes(DATA + b"extra")
    info = entry(server.add("/w.pth", DATA), size_bytes=None)
    assert download(info, cache=tmp_path).read_bytes() == DATA
    assert [e["status"] for e in server.log] == [416, 200]


def test_complete_part_only_needs_verification(tmp_path):
    (tmp_path / "tiny.pth.part").write_bytes(DATA)
    path = download(entry(unreachable_url()), cache=tmp_path)  # no network needed
    assert path.read_bytes() == DATA


def test_offline_error_names_file_url_and_the_manual_way(tmp_path):
    url = unreachable_url()
    with pytest.raises(DownloadError) as err:
        download(entry(url), cache=tmp_path)
    message = str(err.value)
    for expected in ("tiny.pth", url, str(tmp_path / "tiny.pth"), "pass its path"):
        assert expected in message
    assert not (tmp_path / "tiny.pth").exists()


def test_http_error_is_reported(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(entry(server.url("/missing.pth")), cache=tmp_path)


def test_existing_file_is_used_offline_and_can_be_verified(tmp_path):
    info = entry(unreachable_url())
    (tmp_path / "tiny.pth").write_bytes(DATA)
    assert download(info, cache=tmp_path).read_bytes() == DATA
    assert download(info, cache=tmp_path, verify_existing=True).read_bytes() == DATA

    (tmp_path / "tiny.pth").write_bytes(bytes(len(DATA)))  # right size, wrong content
    with pytest.raises(ChecksumError):
        download(info, cache=tmp_path, verify_existing=True)
    assert (tmp_path / "tiny.pth").exists()  # a file the user placed is never deleted
    (tmp_path / "tiny.pth").write_bytes(b"short")
    with pytest.raises(ChecksumError, match="5 bytes"):
        download(info, cache=tmp_path)


def test_entry_without_checksum_downloads_with_a_warning(server, tmp_path):
    info = entry(server.add("/w.pth", DATA), sha256=None)
    with pytest.warns(UserWarning, match=f"could not be verified.*{SHA}"):
        assert download(info, cache=tmp_path).read_bytes() == DATA


def test_xxh128_is_checked_when_xxhash_is_installed(server, tmp_path):
    xxhash = pytest.importorskip("xxhash")
    good = xxhash.xxh128(DATA).hexdigest()
    info = entry(server.add("/w.pth", DATA), sha256=None, xxh128=good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert download(info, cache=tmp_path).read_bytes() == DATA
    bad = replace(info, xxh128="0" * 32, filename="other.pth")
    with pytest.raises(ChecksumError, match="xxh128"):
        download(bad, cache=tmp_path)


# ------------------------------------------------------------------------ resolution


def test_resolve_local_paths_names_and_mistakes(server, monkeypatch, tmp_path):
    ckpt = tmp_path / "my_model.pth"
    ckpt.write_bytes(b"weights")
    assert resolve_checkpoint(ckpt) == ckpt
    assert resolve_checkpoint(str(ckpt)) == ckpt
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="vit_b"):
        resolve_checkpoint("vit_q")
    with pytest.raises(IsADirectoryError):
        resolve_checkpoint(tmp_path)
    monkeypatch.setitem(MODELS, "tiny", entry(server.add("/w.pth", DATA)))
    assert resolve_checkpoint("tiny", cache=tmp_path / "c").read_bytes() == DATA


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="Known models: vit_h, vit_l, vit_b, vit_t"):
        download("vit_q")


# -------------------------------------------------------------------------------- CLI


def test_cli_models_lists_entries_and_cache_state(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(MODELS, "tiny", entry(unreachable_url()))
    (tmp_path / "tiny.pth.part").write_bytes(DATA[: len(DATA) // 4])
    assert cli.main(["models", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in MODELS)
    assert re.search(r"tiny\s+vit_t\s+3\.2 MB\s+MIT\s+partial 24%", out)
    assert re.search(r"vit_h\s+vit_h\s+2\.6 GB\s+Apache-2\.0\s+no", out)
    (tmp_path / "tiny.pth").write_bytes(DATA)
    cli.main(["models", "--cache", str(tmp_path)])
    assert re.search(r"tiny\s.*\syes", capsys.readouterr().out)


def test_cli_download_shows_progress_and_prints_the_path(server, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(MODELS, "tiny", entry(server.add("/w.pth", DATA)))
    assert cli.main(["download", "tiny", "--cache", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert Path(captured.out.strip()) == tmp_path / "tiny.pth"
    assert "100%" in captured.err and "3.2 MB / 3.2 MB" in captured.err
    assert (tmp_path / "tiny.pth").read_bytes() == DATA
    # a second run verifies the cached file instead of downloading it again
    assert cli.main(["download", "tiny", "--cache", str(tmp_path)]) == 0
    assert "verifying" in capsys.readouterr().err
    assert len(server.log) == 1


def test_cli_download_errors_are_one_clear_line(monkeypatch, tmp_path, capsys):
    assert cli.main(["download", "vit_q"]) == 2
    assert "Unknown model name 'vit_q'" in capsys.readouterr().err
    monkeypatch.setitem(MODELS, "tiny", entry(unreachable_url()))
    assert cli.main(["download", "tiny", "--cache", str(tmp_path)]) == 2
    assert "Could not download tiny.pth" in capsys.readouterr().err

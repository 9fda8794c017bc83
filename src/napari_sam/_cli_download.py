"""``napari-sam download NAME [NAME ...]``: fetch checkpoints into the cache, verified."""

from __future__ import annotations

import argparse
import sys
import time

from napari_sam._cli_models import human_size


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="+", metavar="NAME", help="model name(s), see `models`")
    parser.add_argument(
        "--cache", metavar="DIR", help="weights folder (default: <cache dir>/models)"
    )


class TextProgress:
    """A one-line text progress bar, ``progress(done, total)``; redraws at most 10x/s."""

    def __init__(self, label: str, stream=None, width: int = 30):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.1 and done != total:
            return
        self._last = now
        if total:
            filled = self.width * done // total
            bar = "#" * filled + "-" * (self.width - filled)
            text = f"[{bar}] {100 * done // total:3d}% {human_size(done)} / {human_size(total)}"
        else:
            text = human_size(done)
        self.stream.write(f"\r{self.label} {text}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    from napari_sam.model.registry import cached_path, download, get_info

    infos = [get_info(name) for name in args.names]  # fail early on a typo
    for info in infos:
        if cached_path(info, args.cache).is_file():
            print(f"{info.name}: already cached, verifying ...", file=sys.stderr)
            bar = None
        else:
            bar = TextProgress(info.name)
        try:
            path = download(info, progress=bar, cache=args.cache, verify_existing=True)
        finally:
            if bar is not None:
                bar.close()
        print(path)
    return 0

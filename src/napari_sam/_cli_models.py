"""``napari-sam models``: list the known checkpoints and whether they are cached."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache", metavar="DIR", help="weights folder (default: <cache dir>/models)"
    )


def human_size(n: int | None) -> str:
    """``375042383 -> '375.0 MB'``; ``None -> '?'``."""
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def cache_state(info, cache=None) -> str:
    """'yes', 'no' or 'partial N%' (a resumable ``.part`` file) for one registry entry."""
    from napari_sam.model.registry import cached_path

    path = cached_path(info, cache)
    if path.is_file():
        return "yes"
    part = path.with_name(path.name + ".part")
    if part.is_file():
        size = part.stat().st_size
        if info.size_bytes:
            return f"partial {100 * size // info.size_bytes}%"
        return f"partial {human_size(size)}"
    return "no"


def run(args: argparse.Namespace) -> int:
    from napari_sam.model.registry import MODELS, models_dir

    rows = [("NAME", "TYPE", "SIZE", "LICENSE", "CACHED")]
    for info in MODELS.values():
        size = human_size(info.size_bytes)
        rows.append(
            (info.name, info.model_type, size, info.license, cache_state(info, args.cache))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\nweights folder: {models_dir(args.cache)}")
    print("download with: napari-sam download NAME")
    return 0

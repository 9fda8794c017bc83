"""Command line: ``napari-sam <command> ...``.

Each command lives in its own module with two functions, ``configure(parser)`` (adds
arguments to an ``argparse`` sub-parser) and ``run(args) -> int``. Command modules must
be cheap to import (no torch/Qt at module level) because building the parser imports all
of them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Add a line here to add a command.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("napari_sam._cli_models", "list known model checkpoints and the cache"),
    "download": ("napari_sam._cli_download", "download model checkpoints into the cache"),
    "cache": ("napari_sam._cli_cache", "list or prune the stored stack embeddings"),
    "export": ("napari_sam.io.export_cmd", "convert labels between TIFF, zarr and OME-Zarr"),
    "train": ("napari_sam._cli_train", "train or fine-tune a SAM model with simulated prompts"),
    "demo": ("napari_sam._cli_demo", "open napari with a sample image and the SAM annotator"),
    "segment-all": (
        "napari_sam._cli_segment_all",
        "automatic instance segmentation of an image or a stack",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="napari-sam", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.configure(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        # OSError covers FileNotFoundError, FileExistsError, PermissionError and full disks
        print(f"napari-sam {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``napari-sam cache``: list the GUI's stored embeddings; ``--clear`` / ``--max-gb N`` prune."""

from __future__ import annotations

import argparse
import math
import sys
import time


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        metavar="DIR",
        help="embedding cache folder (default: $NAPARI_SAM_EMBEDDINGS, else "
        "<cache dir>/embeddings)",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--clear",
        action="store_true",
        help="delete every stored embedding that no running napari uses",
    )
    action.add_argument(
        "--max-gb",
        type=float,
        metavar="N",
        help="delete least recently used stores until the cache takes at most N GB "
        "(2^30 bytes); stores in use are kept",
    )


_KINDS = {"f": "float", "u": "uint", "i": "int", "b": "bool"}


def _dtype_name(code: str) -> str:
    """numpy's ``dtype.str`` without numpy: ``'<f4' -> 'float32'``, ``'|u1' -> 'uint8'``."""
    kind, size = code[1:2], code[2:]
    if kind in _KINDS and size.isdigit():
        return "bool" if kind == "b" else f"{_KINDS[kind]}{8 * int(size)}"
    return code


def _describe(info: dict) -> tuple[str, str]:
    """``(model, stack)`` columns from a store's signature."""
    if not info:
        return "?", "(being written)"
    shape = "x".join(str(s) for s in info.get("stack_shape") or []) or "?"
    dtype = _dtype_name(str(info.get("stack_dtype", "")))
    return str(info.get("model_name", "?")), f"{shape} {dtype} axis {info.get('axis')}"


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from napari_sam import embedding_cache as ec

    root = Path(args.root).expanduser() if args.root else ec.default_root()
    if args.clear or args.max_gb is not None:
        if args.max_gb is not None and not (math.isfinite(args.max_gb) and args.max_gb >= 0):
            raise ValueError(
                f"--max-gb must be a size in GB >= 0, e.g. --max-gb 10 (got {args.max_gb})"
            )
        cap = 0 if args.clear else int(args.max_gb * ec.GIB)
        removed = ec.prune_cache(cap, root)
        for s in removed:
            print(f"removed {s.path.name}  {ec.format_bytes(s.nbytes)}")
        freed = ec.format_bytes(sum(s.nbytes for s in removed))
        print(f"removed {len(removed)} store(s), {freed} freed\n")

    stores = ec.cache_usage(root)
    if not args.root and ec.cache_root() is None:
        print(
            f"note: {ec.ENV_EMBEDDINGS}=memory: the widget keeps embeddings in memory and "
            "does not use this folder"
        )
    if not stores:
        print(f"no stored embeddings in {root}")
    else:
        rows = [("STORE", "SIZE", "LAST USED", "MODEL", "STACK", "")]
        for s in stores:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(s.last_used))
            model, stack = _describe(s.info)
            state = "in use" if s.in_use else ""
            rows.append((s.path.name, ec.format_bytes(s.nbytes), used, model, stack, state))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        in_use = sum(s.in_use for s in stores)
        total = ec.format_bytes(sum(s.nbytes for s in stores))
        print(f"\n{len(stores)} store(s), {total} in {root} ({in_use} in use)")
    try:
        cap = ec.max_cache_bytes()
    except ValueError as e:
        print(f"warning: {e}", file=sys.stderr)
        cap = ec.DEFAULT_MAX_GB * ec.GIB
    limit = "none" if cap is None else ec.format_bytes(cap)
    print(
        f"limit: {limit} (set {ec.ENV_MAX_GB}, 0 for none); least recently used stores go "
        "when napari opens a stack"
    )
    if stores and not (args.clear or args.max_gb is not None):
        print("free space now with: napari-sam cache --clear, or --max-gb N")
    return 0

"""``napari-sam export INPUT OUTPUT``: convert labels between TIFF, zarr and OME-Zarr.

The input is read lazily and written region by region (no full copy in memory); its
name, scale, translate, axes and units carry over unless overridden, and its session
(``napari_sam_session.json`` / ``.session.json``) is copied along. The output is written
atomically and an existing output is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="labels: .tif/.tiff, a zarr array folder or an OME-Zarr")
    parser.add_argument(
        "output", help="destination: .tif, .zarr (plain array) or .ome.zarr (OME-Zarr labels)"
    )
    parser.add_argument(
        "--to",
        choices=["tif", "zarr", "ome-zarr"],
        default=None,
        help="output format (default: from the output name)",
    )
    parser.add_argument("--label", default=None, help="which labels of an OME-Zarr input")
    parser.add_argument("--name", default=None, help="name of the labels in the output")
    parser.add_argument(
        "--image",
        default=None,
        help="source image (tif, zarr, OME-Zarr) to store with the labels (ome-zarr output)",
    )
    parser.add_argument("--scale", type=float, nargs="+", default=None, help="pixel size per axis")
    parser.add_argument("--translate", type=float, nargs="+", default=None, help="origin per axis")
    parser.add_argument("--units", default=None, help="unit of the space axes, e.g. um")
    parser.add_argument("--levels", type=int, default=None, help="pyramid levels (ome-zarr)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (atomically)"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from napari_sam.io.formats import format_for_output, read_image, read_labels, write_labels
    from napari_sam.io.session import load_session, session_path

    fmt = format_for_output(args.output, args.to)
    src = read_labels(args.input, name=args.label, lazy=True)
    session = None
    try:
        sp = session_path(args.input, args.label)
        if sp.exists():
            session = load_session(sp)
    except ValueError:
        session = None
    kwargs = {
        "name": args.name or src.name,
        "scale": args.scale or src.scale,
        "translate": args.translate or src.translate,
        "axes": src.axes,
        "units": args.units if args.units is not None else (src.units or None),
        "overwrite": args.overwrite,
        "session": session,
    }
    if fmt == "ome-zarr":
        kwargs["colors"] = src.colors
        if args.levels is not None:
            kwargs["levels"] = args.levels
        if args.image:
            image, iscale, itrans = read_image(args.image)
            kwargs["image"] = image
            if iscale is not None and "c" not in src.axes and len(iscale) == len(src.axes):
                kwargs["image_scale"], kwargs["image_translate"] = iscale, itrans
    elif args.image or args.levels is not None:
        raise ValueError(f"--image and --levels apply to ome-zarr output only, not {fmt}")
    out = write_labels(args.output, src.data, format=fmt, **kwargs)
    shape = "x".join(str(s) for s in src.data.shape)
    print(f"wrote {fmt} labels {kwargs['name']!r} ({shape}) to {Path(out)}")
    return 0

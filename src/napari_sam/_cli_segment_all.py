"""``napari-sam segment-all IMAGE --out LABELS``: automatic instance segmentation.

A 2-D image (gray ``(H, W)`` or RGB ``(H, W, 3)``) gives a 2-D label image; a gray stack
``(Z, H, W)`` is segmented slice by slice and stitched into 3-D objects (see
``napari_sam.automatic`` and ``napari_sam.stitching``). The output format follows the
name of ``--out`` (``.tif``, ``.zarr``, ``.ome.zarr``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="input image: .tif/.tiff, .npy, .png, ...")
    parser.add_argument("--out", required=True, metavar="LABELS", help="output labels file")
    parser.add_argument(
        "--model",
        default=None,
        metavar="NAME_OR_PATH",
        help="model name (see `napari-sam models`) or checkpoint file "
        "(default: the project's default model)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda")
    parser.add_argument(
        "--mode",
        choices=("auto", "2d", "3d"),
        default="auto",
        help="3d: stitch the slices of a (Z, H, W) stack (default for 3-D "
        "gray input); 2d: segment each slice independently",
    )
    g = parser.add_argument_group("automatic segmentation")
    g.add_argument("--points-per-side", type=int, default=32, help="grid size (default 32)")
    g.add_argument("--points-per-batch", type=int, default=64)
    g.add_argument(
        "--pred-iou-thresh",
        type=float,
        help="keep masks with a predicted IoU of at least this (default: the model's "
        "recommended value, 0.88 for official SAM)",
    )
    g.add_argument(
        "--stability-thresh",
        type=float,
        help="keep masks with a stability score of at least this (default: the model's "
        "recommended value, 0.95 for official SAM)",
    )
    g.add_argument("--nms-thresh", type=float, default=0.7, help="mask IoU of duplicates")
    g.add_argument(
        "--min-area",
        type=int,
        default=25,
        help="holes/islands and objects smaller than this are removed (pixels)",
    )
    g.add_argument(
        "--max-area-fraction",
        type=float,
        default=0.5,
        help="masks larger than this fraction of the image are not output",
    )
    g.add_argument("--crop-layers", type=int, default=0, help="zoomed-in crop layers (slow)")
    g.add_argument(
        "--exhaustive",
        action="store_true",
        help="prompt every grid point (do not skip points inside found masks)",
    )
    g.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16"))
    s = parser.add_argument_group("stacks (3d mode)")
    s.add_argument(
        "--overlap-thresh",
        type=float,
        default=0.5,
        help="overlap (of the smaller) needed to link instances across slices",
    )
    s.add_argument(
        "--max-gap",
        type=int,
        default=2,
        help="look this many slices back for an object to continue",
    )
    s.add_argument(
        "--min-z-extent", type=int, default=2, help="drop 3-D objects present in fewer slices"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def read_image(path: str):
    """Read an image file into a numpy array (TIFF via tifffile, .npy, else imageio)."""
    import numpy as np

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input image not found: {path}")
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(p)
    if suffix == ".npy":
        return np.load(p, allow_pickle=False)
    from skimage import io as skio

    return np.asarray(skio.imread(p))


def params_from_args(args, model=None):
    """AutomaticParams from the command line; unset thresholds come from ``model``
    (see :meth:`AutomaticParams.for_model`)."""
    from napari_sam.automatic import AutomaticParams

    given = {
        k: v
        for k, v in (
            ("pred_iou_thresh", args.pred_iou_thresh),
            ("stability_score_thresh", args.stability_thresh),
        )
        if v is not None
    }
    return AutomaticParams.for_model(
        model,
        **given,
        points_per_side=args.points_per_side,
        points_per_batch=args.points_per_batch,
        nms_iou_thresh=args.nms_thresh,
        min_region_area=args.min_area,
        min_object_area=args.min_area,
        max_area_fraction=args.max_area_fraction,
        crop_n_layers=args.crop_layers,
        skip_covered_points=not args.exhaustive,
        precision=args.precision,
    )


def _progress(quiet: bool, what: str):
    if quiet:
        return None

    def report(done: int, total: int) -> None:
        end = "\n" if done >= total else ""
        print(f"\r{what}: {done}/{total}", end=end, file=sys.stderr, flush=True)

    return report


def run(args: argparse.Namespace, predictor=None) -> int:
    """``predictor``: use this SamPredictor instead of loading ``--model`` (for tests and
    embedding the command in other tools)."""
    import numpy as np

    from napari_sam.automatic import segment_slice, segment_volume
    from napari_sam.io.atomic import check_destination
    from napari_sam.stitching import StitchParams

    check_destination(args.out, args.overwrite)  # fail before the expensive part
    params_from_args(args)  # bad values fail before the expensive part
    stitch = StitchParams(
        overlap_threshold=args.overlap_thresh, max_gap=args.max_gap, min_z_extent=args.min_z_extent
    )
    image = read_image(args.image)
    rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
    if image.ndim == 2 or (rgb and args.mode != "3d"):
        mode = "2d-image"
    elif image.ndim == 3:
        mode = "2d" if args.mode == "2d" else "3d"
    else:
        raise ValueError(
            f"{args.image}: expected a 2-D image, an RGB image or a (Z, H, W) "
            f"stack, got shape {image.shape}"
        )
    if predictor is None:
        from napari_sam import SamPredictor, load_model

        predictor = SamPredictor(load_model(args.model, device=args.device))
    params = params_from_args(args, predictor.model)
    if mode == "2d-image":
        labels = segment_slice(
            predictor, image, params, progress=_progress(args.quiet, "point batches")
        )
    elif mode == "3d":
        labels = segment_volume(
            image, predictor, params, stitch=stitch, progress=_progress(args.quiet, "slices")
        )
    else:
        report = _progress(args.quiet, "slices")
        labels = np.zeros(image.shape, dtype=np.int32)
        offset = 0
        for z in range(image.shape[0]):
            lab = segment_slice(predictor, image[z], params)
            labels[z] = np.where(lab > 0, lab + offset, 0)
            offset = int(labels[z].max(initial=offset))
            if report:
                report(z + 1, image.shape[0])
    from napari_sam.io.formats import write_labels

    out = write_labels(args.out, labels, overwrite=args.overwrite, name="automatic")
    n = int(labels.max())
    if not args.quiet:
        print(f"{n} objects -> {out}", file=sys.stderr)
    return 0

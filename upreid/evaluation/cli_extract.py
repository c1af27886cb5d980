"""``upreid extract CHECKPOINT --out FEATURES.npz``: features of a dataset's query and gallery (or
one split, or any image folder) from a fine-tuning checkpoint, an exported backbone or any format
fine-tuning's ``init`` reads, written as the ``.npz`` that ``upreid evaluate`` reads."""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract", help="features of a dataset split or an image folder -> .npz (for upreid evaluate)",
        description=__doc__.split(": ", 1)[1] + " Image size, normalisation and flip-averaging default to "
        "the fine-tuning run's config; trunk-only files use 256 x 128 and the normalisation of their format.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="upreid fine-tuning checkpoint, exported backbone, MoCo / fast-reid / torchreid / "
                        "torchvision file")
    p.add_argument("--out", required=True, metavar="FEATURES.npz", help="output file")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="NAME:ROOT",
                     help="dataset (e.g. market1501:/data/Market-1501; a bare path: Market-style folders); "
                          "default: the fine-tuning run's dataset")
    src.add_argument("--images", metavar="DIR", help="any folder tree of images (or a list file) instead")
    p.add_argument("--split", default="query+gallery", choices=("query+gallery", "query", "gallery", "train"),
                   help="which split of --data (default query+gallery, the layout upreid evaluate reads)")
    flip = p.add_mutually_exclusive_group()
    flip.add_argument("--flip", dest="flip", action="store_true", default=None,
                      help="average each feature with the mirrored image's")
    flip.add_argument("--no-flip", dest="flip", action="store_false", help="no flip-averaging")
    p.add_argument("--height", type=int, help="input height (default: the checkpoint's)")
    p.add_argument("--width", type=int, help="input width (default: the checkpoint's)")
    p.add_argument("--backend", choices=("auto", "dali", "torch"), default="auto",
                   help="image pipeline: DALI, the Pillow + torch fallback, or auto (DALI when installed)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto (cuda when available)")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads or loader processes (default 2)")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast (default off)")
    p.add_argument("--last-stride", type=int, choices=(1, 2), default=1,
                   help="layer-4 stride of trunk-only files (default 1, the ReID convention)")
    cbn = p.add_mutually_exclusive_group()
    cbn.add_argument("--camera-bn", dest="camera_bn", action="store_true", default=None,
                     help="camera-based BatchNorm: re-estimate the statistics on each camera's images (query and "
                          "gallery together) and extract that camera's features with them; needs Market-style "
                          "names (the camera) and at least 2 images per camera (default: the run's eval.camera_bn)")
    cbn.add_argument("--no-camera-bn", dest="camera_bn", action="store_false", help="no camera-based BatchNorm")
    p.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                   help="an unreadable image: stop and name it (error, the default) or leave it out of the file "
                        "and list it (skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_extract)
    return p


def run_extract(args) -> int:
    import torch

    from upreid.data import DatasetError
    from upreid.data.imageio import BadImageError
    from upreid.engine.checkpoint import CheckpointError

    from upreid.evaluation.extract import extract_to_npz
    from upreid.utils.deps import MissingDependencyError
    from upreid.utils.cli_checks import device_problem, output_file_problem, say_error
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = device_problem(args.device) or output_file_problem(args.out, "--out", create_folder=True)
    if not problem and os.path.isfile(args.out) and not args.overwrite:
        problem = f"--out {args.out!r} exists; pass --overwrite to replace it"
    if problem:
        say_error("extract", problem)
        return 2
    try:
        s = extract_to_npz(args.checkpoint, args.out, data=args.data, images=args.images, split=args.split,
                           flip=args.flip, height=args.height, width=args.width, backend=args.backend,
                           device=args.device, batch_size=args.batch_size, workers=args.workers, amp=args.amp,
                           last_stride=args.last_stride, progress=not args.no_progress,
                           camera_bn=args.camera_bn, on_bad_image=args.on_bad_image)
    except BadImageError as e:
        say_error("extract", e.cli_message('pass --on-bad-image skip to leave such images out'))
        return 2
    except (CheckpointError, DatasetError, ValueError, OSError, MissingDependencyError) as e:
        say_error("extract", e)
        return 2
    for name, paths in s["skipped"].items():
        if paths:
            shown = ", ".join(repr(x) for x in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            print(f"skipped {len(paths)} unreadable {name} image(s), not in the file: {shown}", file=sys.stderr)
    counts = ", ".join(f"{n} {k}" for k, n in s["counts"].items())
    print(f"wrote {s['out']}: {counts} features of dimension {s['feat_dim']} ({s['format']} checkpoint, "
          f"{s['height']}x{s['width']}, flip {'on' if s['flip'] else 'off'}"
          f"{', camera BN' if s['camera_bn'] else ''})")
    e = s["eval"]
    if e and args.split == "query+gallery" and not args.images:
        metric = f" --metric {e['metric']}" if e.get("metric", "cosine") != "cosine" else ""
        print(f"the run's own evaluation: upreid evaluate {args.out} --rerank both{metric} --k1 {e['k1']} "
              f"--k2 {e['k2']} --lambda {e['lambda_value']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import logging
    parser = argparse.ArgumentParser(prog="upreid")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

"""``upreid export-onnx CHECKPOINT OUT.onnx``: the fine-tuned feature extractor as ONNX (dynamic
batch), checked with onnxruntime against PyTorch before it is written."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export-onnx", help="export the feature extractor (images -> embedding) to ONNX, dynamic batch",
        description="Export the feature extractor of a fine-tuning checkpoint (or any file `upreid extract` "
                    "reads) to ONNX: input 'images' [N, 3, H, W] normalised float32, output 'features' [N, D]. "
                    "The file's metadata holds height, width, mean and std; it is checked with onnxruntime "
                    "against PyTorch on synthetic pedestrians before it is written.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("out", metavar="OUT.onnx")
    p.add_argument("--height", type=int, help="input height (default: the checkpoint's)")
    p.add_argument("--width", type=int, help="input width (default: the checkpoint's)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest accepted onnxruntime vs PyTorch error (default 1e-4)")
    p.add_argument("--last-stride", type=int, choices=(1, 2), default=1, help="for trunk-only files (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT.onnx if it exists")
    p.set_defaults(func=run_export_onnx)
    return p


def run_export_onnx(args) -> int:
    from upreid.engine.checkpoint import CheckpointError
    from upreid.export.onnx import export_onnx
    from upreid.utils.cli_checks import output_file_problem, say_error
    problem = output_file_problem(args.out, "OUT.onnx")
    if problem:
        say_error("export-onnx", problem)
        return 2
    try:
        s = export_onnx(args.checkpoint, args.out, height=args.height, width=args.width, opset=args.opset,
                        atol=args.atol, last_stride=args.last_stride, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, ImportError, RuntimeError, ValueError) as e:
        say_error("export-onnx", e)
        return 2
    print(f"wrote {s['out']}: {s['format']} checkpoint, images [N, 3, {s['height']}, {s['width']}] -> features "
          f"[N, {s['feat_dim']}]; onnxruntime matches PyTorch to {s['max_abs_err']:.1e}")
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

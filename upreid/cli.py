"""The ``upreid`` command. Each area of the package contributes its subcommands through a
``register(subparsers)`` function in its own ``cli`` module."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# Modules that contribute subcommands, in the order they are listed in --help.
COMMAND_MODULES = ("upreid.data.cli", "upreid.engine.cli", "upreid.evaluation.cli", "upreid.evaluation.cli_extract",
                   "upreid.export.cli")


def _info(args: argparse.Namespace) -> int:
    import torch

    from upreid import __version__
    from upreid.ops import HAS_EXTENSION, built_with_cuda

    print(f"upreid {__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
          f"{torch.get_num_threads()} CPU threads")
    print(f"extension upreid._C: {'built' if HAS_EXTENSION else 'NOT built (pure-PyTorch fallback)'}")
    print(f"CUDA kernels: {'built' if built_with_cuda() else 'not built'}; "
          f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is absent
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upreid", description="UP-ReID person re-identification toolkit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = sub.add_parser("info", help="show the build (extension, CUDA kernels) and the devices")
    info.set_defaults(func=_info)
    for name in COMMAND_MODULES:
        if _exists(name):
            importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from upreid.engine.cli import parse   # key=value overrides anywhere on the line

    parser = build_parser()
    args = parse(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

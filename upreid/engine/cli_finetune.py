"""``upreid finetune`` and ``upreid demo``; :func:`register` adds them to the main command.
Several devices: ``torchrun --nproc_per_node=N -m upreid.engine.cli_finetune finetune ...``."""
from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="supervised fine-tuning (BoT / MGN) with evaluation (one process, or torchrun)",
        description="Fine-tune a ReID model. Settings come from a YAML config (with _base_ inheritance) and "
                    "key=value overrides, e.g. `upreid finetune --config configs/finetune/bot_r50.yaml "
                    "data.root=DIR init=CKPT`. init: an upreid pre-training checkpoint or exported backbone, a "
                    "MoCo checkpoint (module.encoder_q.*), a torchvision ResNet file, or random.")
    p.add_argument("--config", help="YAML config file (default: the built-in BoT defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in train.output (its checkpoint.pt)")
    p.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint file")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a train.output folder that holds a checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_finetune)

    d = subparsers.add_parser(
        "demo", help="synthetic data -> UP-ReID pre-training -> fine-tuning vs random init -> table (minutes)",
        description="End to end on a fresh machine: render the synthetic dataset, pre-train UP-ReID briefly "
                    "(small on CPU, the R50 recipe on GPU), fine-tune it and a random-initialised twin, "
                    "evaluate both with and without re-ranking and print a table.")
    d.add_argument("--out", default="upreid_demo", help="output folder for everything (default: upreid_demo)")
    d.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    d.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (no meaningful numbers)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_demo)


def _demo(args) -> int:
    from upreid.engine.demo import run_demo_cli
    return run_demo_cli(args)


def run_finetune(args) -> int:
    from upreid.engine.cli import _errors  # the errors a run reports as one line, not a traceback
    from upreid.engine.finetune_config import load_finetune_config
    errors = _errors()
    try:
        cfg = load_finetune_config(args.config, args.overrides)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        from upreid.engine.finetune import finetune
        resume = args.resume_from or ("auto" if args.resume else None)
        summary = finetune(cfg, resume=resume, overwrite=args.overwrite)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["rank"] == 0:
        if summary["interrupted"]:
            print(f"finetune interrupted at step {summary['step']}/{summary['total']}; checkpoint "
                  f"{summary['checkpoint']} (continue with --resume)")
            return 0
        from upreid.evaluation import format_table
        for mode, res in summary["results"].items():
            print(format_table(res, title="with re-ranking" if mode == "rerank" else "without re-ranking"))
        print(f"results in {summary['output']}/results.json, rank lists in {summary['output']}/ranklist.png")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="upreid")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

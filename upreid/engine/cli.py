"""``upreid pretrain`` and ``upreid export-backbone``; :func:`register` adds them to the main command."""
from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("upreid.pretrain")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="UP-ReID unsupervised pre-training (one process, or torchrun for several)",
        description="UP-ReID pre-training. Settings come from a YAML config (with _base_ inheritance) and "
                    "key=value overrides, e.g. `upreid pretrain --config configs/pretrain/upreid_r50.yaml "
                    "data.root=DIR train.steps=1000`. Several devices: `torchrun --nproc_per_node=N -m "
                    "upreid.engine.cli pretrain ...`.")
    p.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in train.output (from its checkpoint.pt)")
    p.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint file")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a train.output folder that holds a checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_pretrain)

    e = subparsers.add_parser(
        "export-backbone", help="write the pre-trained query trunk (torchvision-style keys) for fine-tuning",
        description="Extract the query encoder's ResNet trunk from a pre-training checkpoint.")
    e.add_argument("checkpoint", metavar="CKPT")
    e.add_argument("out", metavar="OUT")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=run_export)


def _errors():
    from upreid.data import DatasetError
    from upreid.engine.checkpoint import CheckpointError
    from upreid.engine.config import ConfigError
    from upreid.engine.pretrain import NonFiniteLossError, RunExistsError
    return (ConfigError, DatasetError, CheckpointError, RunExistsError, NonFiniteLossError, ValueError,
            NotImplementedError)


def run_pretrain(args) -> int:
    from upreid.engine.config import load_config
    errors = _errors()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg, sort_keys=False), end="")
            return 0
        from upreid.engine.pretrain import pretrain
        resume = args.resume_from or ("auto" if args.resume else None)
        summary = pretrain(cfg, resume=resume, overwrite=args.overwrite)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["rank"] == 0:
        state = "interrupted" if summary["interrupted"] else "finished"
        terms = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items() if k.startswith("loss"))
        print(f"pretrain {state} at step {summary['step']}/{summary['total']} ({terms}); "
              f"checkpoint {summary['checkpoint']}")
    return 0


def run_export(args) -> int:
    from upreid.engine.pretrain import export_backbone
    try:
        info = export_backbone(args.checkpoint, args.out, overwrite=args.overwrite)
    except _errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    a = info["arch"]
    print(f"wrote {args.out}: ResNet-{a['depth']} (last_stride {a['last_stride']}, ibn {a['ibn']}), "
          f"{info['tensors']} tensors, pre-trained {info['step']} steps")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="upreid")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

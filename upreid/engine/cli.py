"""``upreid pretrain``, ``upreid finetune``, ``upreid export-backbone`` and ``upreid demo``;
:func:`register` adds them to the main command. Several devices:
``torchrun --nproc_per_node=N -m upreid.engine.cli pretrain|finetune ...``."""
from __future__ import annotations

import argparse
import logging
import sys

TASK_HELP = {
    "pretrain": ("UP-ReID unsupervised pre-training (one process, or torchrun for several)",
                 "UP-ReID pre-training. Settings come from configs/pretrain/base.yaml, a YAML config (with "
                 "_base_ inheritance) and key=value overrides, e.g. `upreid pretrain --config "
                 "configs/pretrain/upreid_r50.yaml data.root=DIR train.steps=1000`."),
    "finetune": ("supervised fine-tuning (BoT / MGN) with evaluation (one process, or torchrun)",
                 "Fine-tune a ReID model. Settings come from configs/finetune/base.yaml, a YAML config (with "
                 "_base_ inheritance) and key=value overrides, e.g. `upreid finetune --config "
                 "configs/finetune/bot_r50.yaml data.root=DIR init=CKPT`. init: an upreid pre-training "
                 "checkpoint, exported backbone or fine-tuning checkpoint, a MoCo checkpoint "
                 "(module.encoder_q.*), a fast-reid or torchreid model, a torchvision ResNet file, or random "
                 "(docs/finetuning.md, \"Initialisation formats\")."),
}


def register(subparsers) -> None:
    for task, (short, long) in TASK_HELP.items():
        p = subparsers.add_parser(task, help=short, description=long + " Several devices: `torchrun "
                                  f"--nproc_per_node=N -m upreid.engine.cli {task} ...`.")
        p.add_argument("--config", help=f"YAML config file (default: configs/{task}/base.yaml alone)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config overrides (anywhere on the line, before or after the options)")
        p.add_argument("--resume", action="store_true", help="continue the run in train.output (its checkpoint.pt)")
        p.add_argument("--resume-from", metavar="CKPT", help="continue from this checkpoint file")
        p.add_argument("--overwrite", action="store_true",
                       help="start a new run in a train.output folder that holds a checkpoint")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.set_defaults(func=run_task, task=task, accepts_overrides=True)

    e = subparsers.add_parser(
        "export-backbone", help="write the pre-trained query trunk (torchvision-style keys) for fine-tuning",
        description="Extract the query encoder's ResNet trunk from a pre-training checkpoint.")
    e.add_argument("checkpoint", metavar="CKPT")
    e.add_argument("out", metavar="OUT")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    e.set_defaults(func=run_export)

    d = subparsers.add_parser(
        "demo", help="synthetic data -> UP-ReID pre-training -> fine-tuning vs random init -> table (minutes)",
        description="End to end on a fresh machine: render the synthetic dataset, pre-train UP-ReID briefly "
                    "(small on CPU, the R50 recipe on GPU), fine-tune it and a random-initialised twin, "
                    "evaluate both with and without re-ranking and print a table.")
    d.add_argument("--out", default="upreid_demo", help="output folder for everything (default: upreid_demo)")
    d.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    d.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (no meaningful numbers)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the pre-training and of both fine-tunings (default 0); the rendered data are "
                        "the same for every seed. On the CPU, seeds 0-4 are the runs of the README's 5-seed study")
    d.set_defaults(func=run_demo)


def errors() -> tuple:
    """The errors a run reports as one line (``error: ...``, exit status 1), not a traceback."""
    from upreid.data import DatasetError
    from upreid.data.imageio import BadImageError
    from upreid.engine.checkpoint import CheckpointError
    from upreid.engine.config import ConfigError
    from upreid.engine.trainer import NonFiniteLossError, OutputError, RunExistsError
    from upreid.utils.deps import MissingDependencyError
    return (ConfigError, DatasetError, BadImageError, CheckpointError, RunExistsError, OutputError,
            NonFiniteLossError, FileExistsError, ValueError, NotImplementedError, MissingDependencyError)


SKIP_HINT = "set data.on_bad_image=skip to skip such files; they are counted in the epoch summary"


def run_task(args) -> int:
    from upreid.data.imageio import BadImageError
    from upreid.engine.config import load_config
    try:
        cfg = load_config(args.task, args.config, args.overrides)
        if args.print_config:
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        resume = args.resume_from or ("auto" if args.resume else None)
        if args.task == "pretrain":
            from upreid.engine.pretrain import pretrain as run
        else:
            from upreid.engine.finetune import finetune as run
        summary = run(cfg, resume=resume, overwrite=args.overwrite)
    except BadImageError as e:
        print(f"error: {e.cli_message(SKIP_HINT)}", file=sys.stderr)
        return 1
    except errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary["rank"] == 0:
        report(args.task, summary)
    if summary["interrupted"]:
        # not 0: `upreid pretrain ... && upreid finetune ...` must not go on from a half-trained model
        from upreid.engine.trainer import exit_status
        return exit_status(summary)
    return 0


def report(task: str, summary: dict) -> None:
    if summary["interrupted"]:
        print(f"{task} interrupted at step {summary['step']}/{summary['total']}; checkpoint "
              f"{summary['checkpoint']} (continue with --resume; exit status 128 + the signal)")
        return
    if task == "pretrain":
        terms = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items() if k.startswith("loss"))
        print(f"pretrain finished at step {summary['step']}/{summary['total']}{f' ({terms})' if terms else ''}; "
              f"checkpoint {summary['checkpoint']}")
        return
    from upreid.evaluation import format_table
    for mode, res in summary["results"].items():
        print(format_table(res, title="with re-ranking" if mode == "rerank" else "without re-ranking"))
    print(f"results in {summary['output']}/results.json, rank lists in {summary['output']}/ranklist.png")


def run_export(args) -> int:
    from upreid.engine.pretrain import export_backbone
    try:
        info = export_backbone(args.checkpoint, args.out, overwrite=args.overwrite)
    except errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    a = info["arch"]
    print(f"wrote {args.out}: ResNet-{a['depth']} (last_stride {a['last_stride']}, ibn {a['ibn']}), "
          f"{info['tensors']} tensors, pre-trained {info['step']} steps")
    return 0


def run_demo(args) -> int:
    from upreid.engine.demo import run_demo_cli
    return run_demo_cli(args)


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` overrides may come anywhere, also after ``--resume`` (argparse
    alone takes only the first run of positionals)."""
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not getattr(args, "accepts_overrides", False) or any(r.startswith("-") for r in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = list(args.overrides) + rest
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="upreid")
    register(parser.add_subparsers(dest="command", required=True))
    args = parse(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

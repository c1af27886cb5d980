"""``upreid synth``: write the procedural synthetic person dataset. The main ``upreid`` command calls
:func:`register` to add the subcommand; ``python -m upreid.data.cli synth ...`` works on its own."""
from __future__ import annotations

import argparse
import os
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth", help="render the synthetic person ReID dataset (Market-style folders)",
        description="Render a procedural person ReID dataset, deterministic by seed, in Market1501 layout "
                    "(bounding_box_train/, query/, bounding_box_test/) plus unlabeled/ for pre-training.")
    p.add_argument("--root", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--ids", type=int, default=200, help="identities, half train and half test (default 200)")
    p.add_argument("--cameras", type=int, default=6, help="cameras, 2..9 (default 6)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same images (default 0)")
    p.add_argument("--height", type=int, default=128, help="image height (default 128)")
    p.add_argument("--width", type=int, default=64, help="image width (default 64)")
    p.add_argument("--min-images", type=int, default=2, help="min images per identity per camera (default 2)")
    p.add_argument("--max-images", type=int, default=4, help="max images per identity per camera (default 4)")
    p.add_argument("--unlabeled", type=int, default=1000, help="unlabeled pre-training images (default 1000)")
    p.add_argument("--distractors", type=int, default=100, help="distractor gallery images, pid 0 (default 100)")
    p.add_argument("--junk", type=int, default=20, help="junk gallery images, pid -1 (default 20)")
    p.add_argument("--occlusion", type=float, default=0.3, help="probability of partial occlusion (default 0.3)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="rendering processes (default: CPU count, at most 8)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the synthetic set in a non-empty folder (its folders and meta.json are removed "
                        "first; nothing else is touched)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)
    return p


SET_ENTRIES = ("bounding_box_train", "query", "bounding_box_test", "unlabeled", "meta.json")


def remove_set(root: str) -> None:
    """Remove what ``upreid synth`` writes under ``root`` (so that a smaller set leaves no old images)."""
    import shutil
    for name in SET_ENTRIES:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def run_synth(args) -> int:
    from .datasets import synth as parse_synth
    from .synthetic import SynthConfig, generate

    cfg = SynthConfig(ids=args.ids, cameras=args.cameras, seed=args.seed, height=args.height, width=args.width,
                      min_images=args.min_images, max_images=args.max_images, unlabeled=args.unlabeled,
                      distractors=args.distractors, junk=args.junk, occlusion_p=args.occlusion,
                      quality=args.quality)
    try:
        cfg.validate()
        if args.workers < 1:
            raise ValueError(f"synth: --workers must be >= 1, got {args.workers}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.exists(args.root) and not os.path.isdir(args.root):
        print(f"error: synth: --root {args.root!r} is a file, not a folder", file=sys.stderr)
        return 2
    if os.path.isdir(args.root) and os.listdir(args.root):
        if not args.overwrite:
            print(f"error: synth: {args.root!r} is not empty; pass --overwrite to replace the set in it",
                  file=sys.stderr)
            return 2
        remove_set(args.root)
    try:
        os.makedirs(args.root, exist_ok=True)
    except OSError as e:
        print(f"error: synth: --root {args.root!r} cannot be created: {e.strerror or e}", file=sys.stderr)
        return 2
    counts = generate(args.root, cfg, workers=args.workers, progress=not args.no_progress)
    print(f"wrote {sum(counts.values())} images to {args.root}: "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    parse_synth(args.root).show_summary()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="upreid")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

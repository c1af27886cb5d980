"""What does the pre-training buy? Fine-tuned accuracy on the synthetic dataset per initialisation.

Variants (pre-training objective, then the same BoT fine-tuning):
  random        no pre-training
  moco          MoCo v2 only (gc=off, ic=off)
  moco+gc       + global consistency (bank_kl)
  moco+ic       + intrinsic patch contrast (aligned)
  upreid        full UP-ReID (gc + ic)

Each variant runs with several seeds (pre-training and fine-tuning seed; the dataset is fixed).
The scales are the demo's (``upreid.engine.demo``): ``cpu`` (ResNet-18 at 64 x 32), ``gpu`` (ResNet-50 at
256 x 128), ``tiny`` (seconds; a smoke run of this script). Every finished run is kept under ``--work``
(``runs.jsonl``): re-running the script skips them, so an interrupted study continues.

Output: one CSV row per run (``benchmarks/results/study_pretrain.csv``, with device, versions and commit)
and a table of mean ± sample std with the raw values (printed, and written to ``--work/table.md``).

    python benchmarks/study_pretrain.py --scale cpu --seeds 0 1 2 --work runs/study_cpu
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import env_fields  # noqa: E402

VARIANTS = {
    "random": None,
    "moco": ["model.gc=off", "model.ic=off"],
    "moco+gc": ["model.gc=bank_kl", "model.ic=off"],
    "moco+ic": ["model.gc=off", "model.ic=aligned"],
    "upreid": ["model.gc=bank_kl", "model.ic=aligned"],
}
CSV = Path(__file__).resolve().parent / "results" / "study_pretrain.csv"
FIELDS = ["timestamp", "commit", "device", "torch", "threads", "scale", "variant", "seed", "mAP", "Rank-1",
          "mAP_rerank", "Rank-1_rerank", "pretrain_s", "finetune_s", "pretrain_steps", "finetune_steps"]


def run_one(scale, variant: str, seed: int, data: str, work: str, progress: bool) -> dict:
    from upreid.engine.config import load_config
    from upreid.engine.demo import finetune_overrides, pretrain_overrides
    from upreid.engine.finetune import finetune
    from upreid.engine.pretrain import export_backbone, pretrain

    run = os.path.join(work, f"{variant}_s{seed}")
    prog = [] if progress else ["train.progress=false"]
    init, pre_s = None, 0.0
    if VARIANTS[variant] is not None:
        t = time.perf_counter()
        pcfg = load_config("pretrain", None, pretrain_overrides(scale, os.path.join(data, "unlabeled"), os.path.join(run, "pretrain"),
                                                    seed) + VARIANTS[variant] + prog)
        pre = pretrain(pcfg, overwrite=True)
        init = os.path.join(run, "backbone.pt")
        export_backbone(pre["checkpoint"], init, overwrite=True)
        pre_s = time.perf_counter() - t
    t = time.perf_counter()
    fcfg = load_config("finetune", None, finetune_overrides(scale, data, os.path.join(run, "finetune"), init, seed)
                                + ["eval.ranklist_queries=0"] + prog)
    s = finetune(fcfg, overwrite=True)
    r = s["results"]
    return {"scale": None, "variant": variant, "seed": seed, "mAP": r["plain"]["mAP"], "Rank-1": r["plain"]["Rank-1"],
            "mAP_rerank": r["rerank"]["mAP"], "Rank-1_rerank": r["rerank"]["Rank-1"], "pretrain_s": round(pre_s, 1),
            "finetune_s": round(time.perf_counter() - t, 1),
            "pretrain_steps": scale.pretrain_steps if init else 0, "finetune_steps": s["step"]}


def table(rows: list) -> str:
    keys = ("mAP", "Rank-1", "mAP_rerank", "Rank-1_rerank")
    out = ["| initialisation | seeds | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for v in VARIANTS:
        rs = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"])
        if not rs:
            continue
        cells = []
        for k in keys:
            vals = [100 * r[k] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f} ({', '.join(f'{x:.2f}' for x in vals)})")
        out.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("cpu", "gpu", "tiny"), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--work", default="runs/study_pretrain", help="folder of the runs (resumable)")
    ap.add_argument("--csv", default=str(CSV), help="CSV the per-run rows are appended to ('' = none)")
    ap.add_argument("--progress", action="store_true", help="progress bars of every run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from upreid.data.synthetic import SynthConfig, generate
    from upreid.engine import demo
    scale = {"cpu": demo.CPU, "gpu": demo.GPU, "tiny": demo.TINY}[args.scale]
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        generate(data, SynthConfig(ids=scale.ids, cameras=scale.cameras, unlabeled=scale.unlabeled,
                                   height=scale.image_height, width=scale.image_width,
                                   distractors=scale.ids // 2, junk=scale.ids // 10),
                 workers=max(1, min(8, os.cpu_count() or 1)), progress=args.progress)
    done_path = os.path.join(args.work, "runs.jsonl")
    done = [json.loads(x) for x in open(done_path)] if os.path.exists(done_path) else []
    env = env_fields(scale.device)
    scale_name = f"{args.scale}:" + ",".join(f"{k}={v}" for k, v in dataclasses.asdict(scale).items())
    for seed in args.seeds:
        for variant in args.variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in done):
                continue
            t = time.perf_counter()
            row = run_one(scale, variant, seed, data, args.work, args.progress)
            row["scale"] = scale_name
            done.append(row)
            with open(done_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if args.csv:
                new = not os.path.exists(args.csv) or os.path.getsize(args.csv) == 0
                with open(args.csv, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=FIELDS)
                    if new:
                        w.writeheader()
                    w.writerow({k: ({**env, **row}).get(k, "") for k in FIELDS})
            print(f"{variant:8s} seed {seed}: mAP {100 * row['mAP']:.2f}, Rank-1 {100 * row['Rank-1']:.2f} "
                  f"(re-rank {100 * row['mAP_rerank']:.2f}) in {time.perf_counter() - t:.0f} s", flush=True)
    rows = [r for r in done if r["variant"] in args.variants and r["seed"] in args.seeds]
    text = table(rows)
    with open(os.path.join(args.work, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Record an `upreid demo` run: its table as CSV rows and its pictures beside the CSV.

    upreid demo --out runs/demo && python benchmarks/demo_report.py runs/demo

Appends one row per (method, re-ranking) to ``benchmarks/results/demo.csv`` with the device, versions,
commit, time and load of the demo's run (as its summary.json records them), wall time per stage, the
demo's scale and its ``--seed`` (the column came after the first rows: an empty cell is a seed-0 demo,
the only seed there was), and copies the rank lists of both fine-tunings and the training curves to
``benchmarks/results/demo_*.png`` (the README shows them).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import append_rows, env_fields  # noqa: E402
from upreid.engine.demo import TINY  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["timestamp", "commit", "device", "torch", "threads", "load_avg_1m", "scale", "k1", "k2", "method",
          "rerank", "mAP", "Rank-1", "Rank-5", "Rank-10", "mINP", "seconds_total", "seconds_synth",
          "seconds_baselines", "seconds_pretrain", "seconds_finetune_upreid", "seconds_finetune_random", "seed"]
PICTURES = {"finetune_upreid/ranklist.png": "demo_ranklist_upreid.png",
            "finetune_random/ranklist.png": "demo_ranklist_random.png",
            "curves_pretrain.png": "demo_curves_pretrain.png", "curves_finetune.png": "demo_curves_finetune.png"}
RUN_FIELDS = ("timestamp", "commit", "device", "torch", "threads", "load_avg_1m")   # summary.json's


def run_env(summary: dict, path: str) -> dict:
    """The run's device, commit, versions, time and load from its summary.json; an older summary that
    lacks them is labelled with this machine's, with a note saying so."""
    if all(k in summary for k in RUN_FIELDS):
        return {k: summary[k] for k in RUN_FIELDS}
    gpu = bool(summary.get("cuda"))
    env = env_fields("cuda" if gpu and torch.cuda.is_available() else "cpu")
    if gpu and not torch.cuda.is_available():
        env["device"] = "a CUDA GPU (name not recorded)"
    env["load_avg_1m"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else ""
    print(f"note: {path} predates the run's device/commit/time fields; its rows carry this machine's "
          f"({env['device']}, commit {env['commit']}, {env['timestamp']})")
    return {**env, **{k: summary[k] for k in RUN_FIELDS if k in summary}}


def rows_of(summary: dict, env: dict) -> list:
    s, rr = summary["seconds"], summary["rerank"]
    scale = ",".join(f"{k}={v}" for k, v in summary["scale"].items())
    out = []
    for method, res in summary["results"].items():
        for mode in ("plain", "rerank"):
            if mode not in res:
                continue
            m = res[mode]
            out.append({**env, "threads": summary["threads"], "scale": scale, "seed": summary.get("seed", 0),
                        "k1": rr["k1"], "k2": rr["k2"],
                        "method": method, "rerank": mode == "rerank",
                        **{k: round(100 * m[k], 2) for k in ("mAP", "Rank-1", "Rank-5", "Rank-10", "mINP")},
                        **{f"seconds_{k}": round(v, 1) for k, v in s.items()}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", help="the demo's output folder (holds summary.json)")
    ap.add_argument("--csv", default=str(RESULTS / "demo.csv"))
    ap.add_argument("--pictures", default=str(RESULTS), help="folder the demo's pictures are copied to ('' = none)")
    args = ap.parse_args(argv)
    path = os.path.join(args.demo, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read {path!r} ({e}); run `upreid demo --out {args.demo}` first", file=sys.stderr)
        return 1
    into_results = bool(args.pictures) and os.path.abspath(args.pictures) == os.path.abspath(RESULTS)
    published = os.path.abspath(args.csv) == os.path.abspath(RESULTS / "demo.csv") or into_results
    if published and summary.get("scale") == dataclasses.asdict(TINY):
        print(f"error: {args.demo} holds a `upreid demo --tiny` run (a smoke test, not results); it is not "
              "recorded in benchmarks/results. Pass --csv and --pictures '' (or another folder) to record it "
              "elsewhere", file=sys.stderr)
        return 1
    if into_results and summary.get("seed", 0) != 0:
        print(f"error: {args.demo} holds a `upreid demo --seed {summary['seed']}` run; the pictures in "
              "benchmarks/results are the seed-0 demo's that the README shows. Pass --pictures '' (rows only) "
              "or another folder", file=sys.stderr)
        return 1
    rows = rows_of(summary, run_env(summary, path))
    append_rows(rows, args.csv, FIELDS, ignore_unknown=True, widen=True)
    print(f"{len(rows)} rows appended to {args.csv}")
    if args.pictures:
        for src, dst in PICTURES.items():
            p = os.path.join(args.demo, src)
            if os.path.exists(p):
                shutil.copyfile(p, os.path.join(args.pictures, dst))
                print(f"{p} -> {os.path.join(args.pictures, dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

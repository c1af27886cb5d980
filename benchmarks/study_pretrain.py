"""What does the pre-training buy? Fine-tuned accuracy on the synthetic dataset per initialisation.

Variants (pre-training objective, then the same BoT fine-tuning):
  random        no pre-training
  moco          MoCo v2 only (gc=off, ic=off)
  moco+gc       + global consistency (bank_kl)
  moco+ic       + intrinsic patch contrast (aligned)
  upreid        full UP-ReID (gc + ic)
  moco+gc-sharp / upreid-sharp   the same with a sharper teacher in the global consistency
                (gc_tau_teacher = tau / 2, the usual choice in distillation)
  moco+gc-cos / upreid-cos   the same with the cosine reading of the global consistency
                (model.gc=cosine: 2 - 2 cos(q_i, k_o), no bank distribution)
  moco-crop10 / upreid-crop10   the same with torchvision's crops (data.crop_attempts=10, the package's
                default; the demo's CPU pre-training keeps one clamped draw)
  upreid-color  full UP-ReID with the fine-tuning's colour jitter on the two views too (data.color_p=0.8;
                the original stays unjittered, so the GC ties jittered views to it)
  moco-sbn / upreid-sbn   MoCo / UP-ReID with shuffle-BN emulated on one device (model.bn_groups=4:
                BN statistics in 4 groups of batch / 4, the key encoder's after a seeded shuffle)

Each variant runs with several seeds (pre-training and fine-tuning seed; the dataset is fixed).
The scales are the demo's (``upreid.engine.demo``): ``cpu`` (ResNet-18 at 64 x 32), ``gpu`` (ResNet-50 at
256 x 128), ``tiny`` (seconds; a smoke run of this script). Every finished run is kept under ``--work``
(``runs.jsonl``): re-running the script skips them, so an interrupted study continues.

Output: one CSV row per run (``benchmarks/results/study_pretrain.csv``, with device, versions and commit)
and a table of mean ± sample std with the raw values (printed, and written to ``--work/table.md``).

    python benchmarks/study_pretrain.py --scale cpu --seeds 0 1 2 --work runs/study_cpu

``--report`` runs nothing: it reads the CSV's rows at the scale's current recipe (its ``scale`` column
equal to the scale now; the last row of a repeated variant and seed wins) and writes the table and chart
of every variant there (or of ``--variants``) to ``--table`` and ``--plot``:

    python benchmarks/study_pretrain.py --report --seeds 0 1 2 3 4 \
        --table benchmarks/results/study_pretrain_table.md --plot benchmarks/results/study_pretrain.png
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

from benchmarks.common import append_rows, env_fields  # noqa: E402

VARIANTS = {
    "random": None,
    "moco": ["model.gc=off", "model.ic=off"],
    "moco+gc": ["model.gc=bank_kl", "model.ic=off"],
    "moco+ic": ["model.gc=off", "model.ic=aligned"],
    "upreid": ["model.gc=bank_kl", "model.ic=aligned"],
    "moco+gc-sharp": ["model.gc=bank_kl", "model.ic=off", "model.gc_tau_teacher=0.05"],
    "upreid-sharp": ["model.gc=bank_kl", "model.ic=aligned", "model.gc_tau_teacher=0.05"],
    "moco+gc-cos": ["model.gc=cosine", "model.ic=off"],
    "upreid-cos": ["model.gc=cosine", "model.ic=aligned"],
    "moco-crop10": ["model.gc=off", "model.ic=off", "data.crop_attempts=10"],
    "upreid-crop10": ["model.gc=bank_kl", "model.ic=aligned", "data.crop_attempts=10"],
    "upreid-color": ["model.gc=bank_kl", "model.ic=aligned", "data.color_p=0.8"],
    "moco-sbn": ["model.gc=off", "model.ic=off", "model.bn_groups=4"],
    "upreid-sbn": ["model.gc=bank_kl", "model.ic=aligned", "model.bn_groups=4"],
}
DEFAULT_VARIANTS = ["random", "moco", "moco+gc", "moco+ic", "upreid"]
CSV = Path(__file__).resolve().parent / "results" / "study_pretrain.csv"
FIELDS = ["timestamp", "commit", "device", "torch", "threads", "scale", "variant", "seed", "mAP", "Rank-1",
          "mAP_rerank", "Rank-1_rerank", "pretrain_s", "finetune_s", "pretrain_steps", "finetune_steps",
          "frozen_mAP", "probe_mAP", "probe_bn_mAP"]
PROBE_CSV = Path(__file__).resolve().parent / "results" / "study_probe_bn.csv"
PROBE_FIELDS = ["timestamp", "commit", "device", "torch", "threads", "scale", "variant", "seed", "trunk",
                "frozen_mAP", "probe_mAP", "probe_bn_mAP"]


def run_one(scale, variant: str, seed: int, data: str, work: str, progress: bool, rerank: dict) -> dict:
    from upreid.engine.config import load_config
    from upreid.engine.demo import finetune_overrides, pretrain_overrides
    from upreid.engine.finetune import finetune
    from upreid.engine.pretrain import export_backbone, pretrain
    from upreid.engine.trainer import finished    # a signal stops the study: no row from a half-trained model

    run = os.path.join(work, f"{variant}_s{seed}")
    prog = [] if progress else ["train.progress=false"]
    init, pre_s = None, 0.0
    if VARIANTS[variant] is not None:
        t = time.perf_counter()
        pcfg = load_config("pretrain", None, pretrain_overrides(scale, os.path.join(data, "unlabeled"), os.path.join(run, "pretrain"),
                                                    seed) + VARIANTS[variant] + prog)
        pre = finished(pretrain(pcfg, overwrite=True), f"{variant} seed {seed}: pre-training")
        init = os.path.join(run, "backbone.pt")
        export_backbone(pre["checkpoint"], init, overwrite=True)
        pre_s = time.perf_counter() - t
    trunk = init
    if trunk is None:       # the random initialisation's trunk, probed like the pre-trained ones
        trunk = os.path.join(run, "random_trunk.pt")
        write_random_trunk(trunk, scale, seed)
    probes = probe_trunk(scale, data, trunk)
    t = time.perf_counter()
    fcfg = load_config("finetune", None, finetune_overrides(scale, data, os.path.join(run, "finetune"), init, seed,
                                                            rerank=rerank) + ["eval.ranklist_queries=0"] + prog)
    s = finished(finetune(fcfg, overwrite=True), f"{variant} seed {seed}: fine-tuning")
    r = s["results"]
    return {"scale": None, "variant": variant, "seed": seed, "mAP": r["plain"]["mAP"], "Rank-1": r["plain"]["Rank-1"],
            "mAP_rerank": r["rerank"]["mAP"], "Rank-1_rerank": r["rerank"]["Rank-1"], "pretrain_s": round(pre_s, 1),
            "finetune_s": round(time.perf_counter() - t, 1),
            "pretrain_steps": scale.pretrain_steps if init else 0, "finetune_steps": s["step"],
            **probes}


def probe_trunk(scale, data: str, trunk: str) -> dict:
    """The frozen trunk before fine-tuning: nearest-neighbour mAP of its pooled features and the linear
    probe's (LDA fitted on the training split), with its stored BatchNorm statistics (``probe_mAP``) and
    with them re-estimated on the unlabeled images (``probe_bn_mAP``), which compares trunks by their
    weights alone: a random trunk's stored statistics are mean 0 / variance 1, a pre-trained one's an
    EMA over augmented views."""
    from upreid.data.datasets import synth, unlabeled
    from upreid.evaluation.baselines import frozen_trunk_baseline
    ds = synth(data)
    kw = dict(flip=scale.flip_test, device=scale.device, linear_probe=True)
    a = frozen_trunk_baseline(ds, trunk, scale.pretrain_height, scale.pretrain_width, **kw)
    b = frozen_trunk_baseline(ds, trunk, scale.pretrain_height, scale.pretrain_width,
                              bn_records=unlabeled(os.path.join(data, "unlabeled"), progress=False).train, **kw)
    return {"frozen_mAP": a["plain"]["mAP"], "probe_mAP": a["lda"]["mAP"], "probe_bn_mAP": b["lda"]["mAP"]}


def write_random_trunk(path: str, scale, seed: int) -> None:
    """A random-initialised trunk of the scale's architecture as a backbone file (seeded)."""
    import torch
    from upreid.engine import checkpoint as ckpt_io
    from upreid.models.resnet import ResNet
    torch.manual_seed(seed)
    net = ResNet(scale.pretrain_depth, last_stride=1, width=scale.width)
    ckpt_io.save_backbone(path, net.state_dict(), depth=scale.pretrain_depth, width=scale.width, last_stride=1)


def scale_tag(name: str, scale) -> str:
    """The ``scale`` column: the scale's name and every setting of its recipe, so that rows of an older
    recipe are told apart."""
    return f"{name}:" + ",".join(f"{k}={v}" for k, v in dataclasses.asdict(scale).items())


def append_csv(path: str, row: dict, fields: list = FIELDS) -> None:
    """Append ``row`` under the ``fields`` header; a file written with fewer columns (an older version
    of this script) is rewritten first with the full header, its rows' new cells left empty."""
    append_rows([row], path, fields, ignore_unknown=True, widen=True)


KEYS = ("mAP", "Rank-1", "mAP_rerank", "Rank-1_rerank", "frozen_mAP", "probe_mAP", "probe_bn_mAP")


def _values(rows: list, variant: str, key: str) -> list:
    """The variant's values of ``key`` in %, by seed; rows without it (older runs) are left out."""
    return [100 * float(r[key]) for r in sorted((r for r in rows if r["variant"] == variant),
                                                key=lambda r: int(r["seed"]))
            if r.get(key) not in (None, "")]


def cell(vals: list) -> str:
    """``mean ± sample std (raw values)``, or ``-`` for none."""
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return f"{statistics.mean(vals):.2f} ± {sd:.2f} ({', '.join(f'{x:.2f}' for x in vals)})"


def difference_row(label: str, key: str, x: list, y: list) -> str | None:
    """``| label | key | mean(x) - mean(y) | 2 SE | exceeds 2 SE |`` with SE = sqrt(s1^2/n1 + s2^2/n2);
    None when either side has fewer than two values."""
    if len(x) < 2 or len(y) < 2:
        return None
    d = statistics.mean(x) - statistics.mean(y)
    se = (statistics.variance(x) / len(x) + statistics.variance(y) / len(y)) ** 0.5
    return f"| {label} | {key} | {d:+.2f} | {2 * se:.2f} | {'yes' if abs(d) > 2 * se else 'no'} |"


def table(rows: list) -> str:
    """Mean ± sample std (raw values) per variant: the fine-tuned metrics, then the frozen trunk's
    (before fine-tuning): nearest neighbour on its pooled features, and the linear probe (LDA fitted on
    the training split's features)."""
    out = ["| initialisation | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    for v in VARIANTS:
        if any(r["variant"] == v for r in rows):
            out.append(f"| {v} | {len(_values(rows, v, 'mAP'))} | "
                       + " | ".join(cell(_values(rows, v, k)) for k in KEYS) + " |")
    return "\n".join(out)


def differences(rows: list, pairs=None) -> str:
    """Each variant against random init and MoCo, and each regulariser against what it is added to: the
    difference of means, its standard error sqrt(s1^2/n1 + s2^2/n2), and whether it exceeds 2 SE."""
    present = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    if pairs is None:
        pairs = [(v, "random") for v in present if v != "random"]
        pairs += [(a, b) for a, b in (("moco+gc", "moco"), ("moco+ic", "moco"), ("upreid", "moco"),
                                      ("upreid", "moco+ic"), ("upreid", "moco+gc"), ("moco+gc-sharp", "moco+gc"),
                                      ("upreid-sharp", "upreid"), ("moco+gc-sharp", "moco"),
                                      ("moco+gc-cos", "moco+gc"), ("upreid-cos", "upreid"), ("moco+gc-cos", "moco"),
                                      ("moco-crop10", "moco"), ("upreid-crop10", "upreid"),
                                      ("moco-sbn", "moco"), ("upreid-sbn", "upreid"), ("upreid-sbn", "moco-sbn"))]
    out = ["| comparison | metric | difference | 2 SE | exceeds 2 SE |", "|---|---|---|---|---|"]
    for a, b in pairs:
        if a in present and b in present:
            for k in ("mAP", "Rank-1", "probe_mAP", "probe_bn_mAP"):
                row = difference_row(f"{a} - {b}", k, _values(rows, a, k), _values(rows, b, k))
                if row:
                    out.append(row)
    return "\n".join(out)


def plot(rows: list, path: str, title: str) -> str:
    """Bar chart: mean fine-tuned mAP and Rank-1 per variant, and the frozen trunk's linear-probe mAP
    where every variant has it; error bars one sample std, the seeds as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    present = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    fig = Figure(figsize=(max(6.2, 1.5 + 1.3 * len(present)), 3.8), dpi=110)   # the title's width at least
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # the probe with BN statistics re-estimated on the unlabeled images where every variant has it: with
    # the stored ones a random trunk's untouched BN (mean 0, variance 1) flatters it (docs/finetuning.md)
    probe = [("probe_bn_mAP", "mAP, linear probe of the trunk before fine-tuning (BN re-estimated)"),
             ("probe_mAP", "mAP, linear probe of the trunk before fine-tuning (stored BN statistics)")]
    def everywhere(key):
        return all(_values(rows, v, key) for v in present)
    series = [s for s in (("mAP", "mAP, fine-tuned", "tab:blue"), ("Rank-1", "Rank-1, fine-tuned", "tab:orange"))
              if everywhere(s[0])]
    series += [(k, label, "tab:green") for k, label in probe if everywhere(k)][:1]
    w = 0.8 / len(series)
    for j, (k, label, colour) in enumerate(series):
        for i, v in enumerate(present):
            vals = _values(rows, v, k)
            m = statistics.mean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            x = i + (j - (len(series) - 1) / 2) * w
            ax.bar(x, m, w * 0.95, yerr=sd, capsize=3, color=colour, alpha=0.8, label=label if i == 0 else None)
            ax.plot([x] * len(vals), vals, "k.", markersize=3)
    ax.set_xticks(range(len(present)))
    ax.set_xticklabels(present, rotation=20, fontsize=8)
    ax.set_ylabel("% (no re-ranking)")
    ax.grid(True, axis="y", alpha=0.3)
    wide = len(present) >= 6                          # the legend's entries fit side by side
    ax.set_ylim(0, ax.get_ylim()[1] * (1.3 if wide else 1.2 + 0.12 * len(series)))   # room for the legend
    ax.legend(fontsize=7, loc="upper center", ncol=len(series) if wide else 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def csv_rows(path: str, scale_name: str) -> list:
    """The CSV's runs at ``scale_name`` as run dicts (numbers parsed; a repeated variant and seed: the
    last row). Runs from more than one device are kept and named in a warning: CPU training is
    reproducible on one class of CPU, not across two, so such a table compares machines too."""
    out = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            if r["scale"] != scale_name:
                continue
            r = dict(r, seed=int(r["seed"]))
            for k in KEYS:
                r[k] = float(r[k]) if r.get(k) not in (None, "") else None
            out[(r["variant"], r["seed"])] = r
    devices = sorted({r.get("device") or "unknown" for r in out.values()})
    if len(devices) > 1:
        print(f"warning: {path}: the {scale_name} runs come from {len(devices)} devices ({'; '.join(devices)}); "
              "seeds do not reproduce across them", file=sys.stderr)
    return list(out.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("cpu", "gpu", "tiny"), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                    help=f"default: {' '.join(DEFAULT_VARIANTS)} (runs), every variant in the CSV (--report)")
    ap.add_argument("--work", default="runs/study_pretrain", help="folder of the runs (resumable)")
    ap.add_argument("--csv", default=str(CSV), help="CSV the per-run rows are appended to ('' = none)")
    ap.add_argument("--progress", action="store_true", help="progress bars of every run")
    ap.add_argument("--plot", default=None, help="bar chart PNG of the study (default: --work/study.png)")
    ap.add_argument("--table", default=None, help="markdown table of the study (default: --work/table.md)")
    ap.add_argument("--reprobe", action="store_true",
                    help="run nothing new: probe the trunks of the finished runs under --work (random: a "
                         "fresh seeded trunk) with stored and re-estimated BN statistics; rows to --probe-csv")
    ap.add_argument("--probe-csv", default=str(PROBE_CSV), help="CSV of --reprobe's rows")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: table and chart from the CSV's rows at the scale's current recipe")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from upreid.engine import demo
    scale = {"cpu": demo.CPU, "gpu": demo.GPU, "tiny": demo.TINY}[args.scale]
    scale_name = scale_tag(args.scale, scale)
    if args.report:
        rows = [r for r in csv_rows(args.csv, scale_name)
                if r["seed"] in args.seeds and (args.variants is None or r["variant"] in args.variants)]
        if not rows:
            print(f"{args.csv}: no rows at the current {args.scale} scale for these seeds and variants")
            return 1
        return _report(rows, args, len({r["seed"] for r in rows}))
    args.variants = args.variants or DEFAULT_VARIANTS
    if args.reprobe:
        return _reprobe(args, scale, scale_name)

    data, rerank = study_data(args.work, scale, args.progress)

    def one(variant, seed):
        row = run_one(scale, variant, seed, data, args.work, args.progress, rerank)
        print(f"{variant:8s} seed {seed}: mAP {100 * row['mAP']:.2f}, Rank-1 {100 * row['Rank-1']:.2f} "
              f"(re-rank {100 * row['mAP_rerank']:.2f})", end="", flush=True)
        return row

    rows = run_resumable(args.work, args.seeds, args.variants, one, scale_name, args.csv, FIELDS, scale.device)
    return _report(rows, args, len(args.seeds))


def study_data(work: str, scale, progress: bool) -> tuple:
    """The study's dataset under ``work`` (rendered once, the demo's at ``scale``) and the re-ranking
    settings for its split: (data folder, {k1, k2, lambda_value, ...})."""
    from upreid.data.datasets import synth
    from upreid.data.synthetic import generate
    from upreid.engine import demo
    from upreid.evaluation.rerank_settings import rerank_settings
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        generate(data, demo.synth_config(scale), workers=max(1, min(8, os.cpu_count() or 1)), progress=progress)
    ds = synth(data)
    return data, rerank_settings([r.pid for r in ds.query], [r.pid for r in ds.gallery])


def side_study_parser(doc: str, work: str, csv_path, seeds: list) -> argparse.ArgumentParser:
    """The options of a study that compares its runs with this study's rows (study_oracle.py,
    crosscheck_moco.py): scale, seeds, work folder, CSVs, table, progress."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("cpu", "tiny"), default="cpu")
    ap.add_argument("--seeds", type=int, nargs="+", default=seeds)
    ap.add_argument("--work", default=work, help="folder of the runs (resumable)")
    ap.add_argument("--csv", default=str(csv_path), help="CSV the per-run rows are appended to ('' = none)")
    ap.add_argument("--study-csv", default=str(CSV), help="the pre-training study's CSV (reference rows)")
    ap.add_argument("--table", default=None, help="markdown table (default: --work/table.md)")
    ap.add_argument("--progress", action="store_true")
    return ap


def side_study(args, variants: list, run, fields: list, table) -> int:
    """Run ``run(scale, variant, seed, data, rerank) -> row`` resumably for every seed and variant on the
    study's data at ``args.scale``, then write and print ``table(rows, this study's rows at that scale)``."""
    from upreid.engine import demo
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    scale = {"cpu": demo.CPU, "tiny": demo.TINY}[args.scale]
    scale_name = scale_tag(args.scale, scale)
    data, rerank = study_data(args.work, scale, args.progress)
    rows = run_resumable(args.work, args.seeds, variants, lambda v, seed: run(scale, v, seed, data, rerank),
                         scale_name, args.csv, fields, scale.device)
    reference = csv_rows(args.study_csv, scale_name) if os.path.exists(args.study_csv) else []
    text = table(rows, reference)
    with open(args.table or os.path.join(args.work, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


def run_resumable(work: str, seeds, variants, run, scale_name: str, csv_path: str, fields: list, device) -> list:
    """``run(variant, seed) -> row`` for every seed x variant not yet in ``work/runs.jsonl``; each
    finished row is kept there (so an interrupted study continues) and appended to ``csv_path`` ('' =
    none) under ``fields`` with the environment's columns. Returns the rows of these seeds and variants."""
    done_path = os.path.join(work, "runs.jsonl")
    done = [json.loads(x) for x in open(done_path)] if os.path.exists(done_path) else []
    other = sorted({r.get("scale") for r in done} - {scale_name}, key=str)
    if other:      # runs of another recipe would be reused as this one's and set beside its rows
        raise SystemExit(f"{work} holds runs of another recipe (scale {other[0]!r}), not the current "
                         f"{scale_name!r}: pass another --work, or remove that folder")
    env = env_fields(device)
    for seed in seeds:
        for variant in variants:
            if any(r["variant"] == variant and r["seed"] == seed for r in done):
                continue
            t = time.perf_counter()
            row = {**run(variant, seed), "scale": scale_name}
            done.append(row)
            with open(done_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if csv_path:
                append_csv(csv_path, {**env, **row}, fields)
            print(f" in {time.perf_counter() - t:.0f} s", flush=True)
    return [r for r in done if r["variant"] in variants and r["seed"] in seeds]


def _reprobe(args, scale, scale_name: str) -> int:
    """Probe again, with stored and with re-estimated BN statistics, every trunk of ``--variants`` x
    ``--seeds`` that ``--work`` still holds (random: written afresh from its seed); one row each in
    ``--probe-csv``, and a table of both probes per variant."""
    data = os.path.join(args.work, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        print(f"{args.work}: no study data here (run the study first)")
        return 1
    env, rows = env_fields(scale.device), []
    for variant in args.variants:
        for seed in args.seeds:
            run = os.path.join(args.work, f"{variant}_s{seed}")
            trunk = os.path.join(run, "random_trunk.pt" if VARIANTS[variant] is None else "backbone.pt")
            if VARIANTS[variant] is None:
                os.makedirs(run, exist_ok=True)
                write_random_trunk(trunk, scale, seed)
            elif not os.path.exists(trunk):
                print(f"{variant} seed {seed}: no trunk at {trunk}; skipped")
                continue
            row = {"scale": scale_name, "variant": variant, "seed": seed, "trunk": os.path.relpath(trunk, args.work),
                   **probe_trunk(scale, data, trunk)}
            rows.append(row)
            if args.probe_csv:
                append_csv(args.probe_csv, {**env, **row}, PROBE_FIELDS)
            print(f"{variant} seed {seed}: probe {100 * row['probe_mAP']:.2f} (stored BN), "
                  f"{100 * row['probe_bn_mAP']:.2f} (BN re-estimated)", flush=True)
    out = ["| trunk | seeds | probe mAP, stored BN | probe mAP, BN re-estimated on the unlabeled images |",
           "|---|---|---|---|"]
    for variant in args.variants:
        cells = []
        for k in ("probe_mAP", "probe_bn_mAP"):
            vals = _values(rows, variant, k)
            if not vals:
                break
            sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
            cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f} ({', '.join(f'{x:.2f}' for x in vals)})")
        if cells:
            out.append(f"| {variant} | {len(_values(rows, variant, 'probe_mAP'))} | " + " | ".join(cells) + " |")
    print("\n".join(out))
    return 0


def _report(rows: list, args, seeds: int) -> int:
    text = table(rows) + "\n\n" + differences(rows)
    with open(args.table or os.path.join(args.work, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    try:
        print("chart:", plot(rows, args.plot or os.path.join(args.work, "study.png"),
                             f"pre-training study, {args.scale} scale, {seeds} seeds (bars: mean, "
                             "error bars: 1 std, dots: seeds)"))
    except ImportError:
        print("matplotlib missing: no chart")
    return 0


if __name__ == "__main__":
    sys.exit(main())

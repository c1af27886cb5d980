"""What does camera-based BatchNorm at test time buy? The pre-training study's models, evaluated again.

Camera-based BN (``eval.camera_bn``, ``upreid extract --camera-bn``) extracts each test camera's images
with BatchNorm statistics re-estimated on that camera's images alone, so that what a camera adds to
every image (colour cast, brightness, background) is normalised away. Without ``--train`` or
``--epochs`` this script trains nothing: it takes the runs that ``study_pretrain.py`` left under
``--work`` and scores, per variant and seed,

  ft_mAP, ft_Rank-1            the fine-tuned model as fine-tuning evaluated it (no re-ranking)
  ft_cbn_mAP, ft_cbn_Rank-1    the same model with camera BN
  trunk_mAP, trunk_cbn_mAP     the trunk before fine-tuning (the pre-trained one; for random init the
                               seeded random trunk), nearest neighbour on its pooled features
  cbn_ft_mAP, cbn_ft_Rank-1    with ``--train``: the same initialisation fine-tuned again with the run's
                               own recipe and camera BN in training too (``model.camera_bn=true``), evaluated
                               with camera BN (the run is kept under ``--work/<run>/finetune_cbn``)
  short_mAP, short_Rank-1,     with ``--epochs E``: the same initialisation fine-tuned again for E epochs
  short_cbn_mAP, ..._Rank-1    (the run's recipe, the demo's schedule scaled to E), scored plain and with
                               camera BN (kept under ``--work/<run>/finetune_eE``): does camera BN leave
                               pre-training a head start where the fine-tuning is short?

and, once for the split, mAP and Rank-1 of the linear metric on pixels (LDA, as the demo's row) against
the same metric on camera-centred pixels (each camera's mean image subtracted): camera BN uses the
camera ids, so the linear baseline is given them too. One CSV row per (variant, seed) in
``benchmarks/results/study_camera_bn.csv``; the table (mean ± sample std, raw values, differences with
two standard errors) goes to ``--table``. The fine-tunings that ``--train`` and ``--epochs`` start are
kept and reused when the script runs again with the same config.

    python benchmarks/study_camera_bn.py --work runs/s4 --seeds 0 1 2 3 4 --epochs 15 \\
        --variants random upreid --table benchmarks/results/study_camera_bn_table.md
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import study_pretrain as study  # noqa: E402
from benchmarks.common import env_fields  # noqa: E402

CSV = Path(__file__).resolve().parent / "results" / "study_camera_bn.csv"
FIELDS = ["timestamp", "commit", "device", "torch", "threads", "work", "variant", "seed", "ft_mAP", "ft_Rank-1",
          "ft_cbn_mAP", "ft_cbn_Rank-1", "trunk_mAP", "trunk_cbn_mAP", "lda_mAP", "lda_cam_mAP", "cbn_ft_mAP", "cbn_ft_Rank-1",
          "lda_Rank-1", "lda_cam_Rank-1", "short_epochs", "short_mAP", "short_Rank-1", "short_cbn_mAP",
          "short_cbn_Rank-1"]
KEYS = ("ft_mAP", "ft_cbn_mAP", "cbn_ft_mAP", "ft_Rank-1", "ft_cbn_Rank-1", "cbn_ft_Rank-1", "trunk_mAP",
        "trunk_cbn_mAP", "short_mAP", "short_cbn_mAP", "short_Rank-1", "short_cbn_Rank-1")


def camera_centred(x: np.ndarray, cams: np.ndarray) -> np.ndarray:
    """``x`` with each camera's mean row subtracted from that camera's rows."""
    out = x.astype(np.float32, copy=True)
    for c in np.unique(cams):
        out[cams == c] -= out[cams == c].mean(0)
    return out


def pixel_rows(ds, height: int, width: int) -> dict:
    """mAP and Rank-1 of LDA on pixels and on camera-centred pixels (query and gallery centred together)."""
    from upreid.evaluation.baselines import fit_linear_metric, load_pixels, score_features
    tr = load_pixels(ds.train, height, width)
    te = np.concatenate([load_pixels(ds.query, height, width), load_pixels(ds.gallery, height, width)])
    tp, tc = (np.array([getattr(r, k) for r in ds.train]) for k in ("pid", "camid"))
    recs = list(ds.query) + list(ds.gallery)
    pids, cams = (np.array([getattr(r, k) for r in recs]) for k in ("pid", "camid"))
    nq, out = len(ds.query), {}
    for key, a, b in (("lda_mAP", tr, te), ("lda_cam_mAP", camera_centred(tr, tc), camera_centred(te, cams))):
        lm, _ = fit_linear_metric(a, tp, tc, what="pixels")
        f = lm.transform(b)
        res = score_features(f[:nq], f[nq:], pids[:nq], pids[nq:], cams[:nq], cams[nq:], metric="cosine")["plain"]
        out[key], out[key.replace("mAP", "Rank-1")] = res["mAP"], res["cmc"][0]
    return out


def refinetune(run: str, folder: str, overrides: list) -> str:
    """The run's initialisation fine-tuned again into ``run/folder`` with the run's own fine-tuning config
    (its recipe, even where the demo's has changed since) and ``overrides``; returns the folder.
    Resumable: a finished run is kept when it was made from that same config."""
    import yaml

    from upreid.engine.config import load_config
    from upreid.engine.finetune import finetune
    from upreid.engine.trainer import finished
    out = os.path.join(run, folder)
    cfg = load_config("finetune", os.path.join(run, "finetune", "config.yaml"), [
        f"train.output={out}", "eval.rerank=false", "eval.ranklist_queries=0", "train.progress=false", *overrides])
    saved = os.path.join(out, "config.yaml")
    same = False
    if os.path.isfile(saved):
        with open(saved) as f:
            same = yaml.safe_load(f) == yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    if not (os.path.isfile(os.path.join(out, "results.json")) and same):
        finished(finetune(cfg, overwrite=True), f"fine-tuning {out}")
    return out


def finetune_with_camera_bn(run: str) -> dict:
    """The run's initialisation fine-tuned again with camera BN in training and evaluation."""
    import json
    out = refinetune(run, "finetune_cbn", ["model.camera_bn=true", "eval.camera_bn=true"])
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)["final"]["plain"]
    return {"cbn_ft_mAP": res["mAP"], "cbn_ft_Rank-1": res["Rank-1"]}


def finetune_shorter(ds, run: str, epochs: int) -> dict:
    """The run's initialisation fine-tuned again for ``epochs`` (the demo's schedule scaled to them:
    ``upreid.engine.demo.schedule_overrides``), scored plain and with camera BN at test time."""
    from upreid.engine.demo import schedule_overrides
    out = refinetune(run, f"finetune_e{epochs}", schedule_overrides(epochs))
    got = score_model(ds, os.path.join(out, "checkpoint.pt"))
    return {"short_epochs": epochs, **{k.replace("ft_", "short_"): v for k, v in got.items()}}


def score_model(ds, checkpoint: str) -> dict:
    """A fine-tuned model on the test split, plain (``ft_*``) and with camera BN (``ft_cbn_*``)."""
    from upreid.evaluation.baselines import score_features
    from upreid.evaluation.extract import extract_features, split_rows
    from upreid.evaluation.feature_model import load_feature_model
    model, info = load_feature_model(checkpoint)
    recs = list(ds.query) + list(ds.gallery)
    pre = dict(height=info["height"], width=info["width"], mean=info["mean"], std=info["std"],
               flip=info["flip_test"], workers=0, progress=False, return_index=True)
    row = {}
    for tag, cbn in (("ft", False), ("ft_cbn", True)):
        (fq, qp, qc, _), (fg, gp, gc, _) = split_rows(extract_features(model, recs, camera_bn=cbn, **pre), len(ds.query))
        res = score_features(fq, fg, qp, gp, qc, gc, metric="cosine")["plain"]
        row[f"{tag}_mAP"], row[f"{tag}_Rank-1"] = res["mAP"], res["cmc"][0]
    return row


def score_run(ds, run: str, variant: str, scale) -> dict:
    """The fine-tuned model and the trunk before fine-tuning of one study run, plain and with camera BN."""
    from upreid.evaluation.baselines import frozen_trunk_baseline
    row = score_model(ds, os.path.join(run, "finetune", "checkpoint.pt"))
    trunk = os.path.join(run, "random_trunk.pt" if study.VARIANTS[variant] is None else "backbone.pt")
    for tag, cbn in (("trunk", False), ("trunk_cbn", True)):
        res = frozen_trunk_baseline(ds, trunk, scale.pretrain_height, scale.pretrain_width, flip=scale.flip_test,
                                    camera_bn=cbn)
        row[f"{tag}_mAP"] = res["plain"]["mAP"]
    return row


def table(rows: list, pixels: dict) -> str:
    out = ["| initialisation | seeds | " + " | ".join(KEYS) + " |", "|---|---|" + "---|" * len(KEYS)]
    variants = [v for v in study.VARIANTS if any(r["variant"] == v for r in rows)]
    for v in variants:
        out.append(f"| {v} | {len(study._values(rows, v, 'ft_mAP'))} | "
                   + " | ".join(study.cell(study._values(rows, v, k)) for k in KEYS) + " |")
    lda = {k: (f"{100 * float(pixels[k]):.2f}" if pixels.get(k) not in (None, "") else "-")
           for k in ("lda_mAP", "lda_Rank-1", "lda_cam_mAP", "lda_cam_Rank-1")}
    short = sorted({r["short_epochs"] for r in rows if r.get("short_epochs") not in (None, "")}, key=int)
    out += ["", f"LDA on pixels: {lda['lda_mAP']} mAP, {lda['lda_Rank-1']} Rank-1; LDA on camera-centred pixels: "
                f"{lda['lda_cam_mAP']} mAP, {lda['lda_cam_Rank-1']} Rank-1 (one split, no seed).",
            *([f"short_*: each initialisation fine-tuned again for {', '.join(short)} epochs (the demo's "
               "schedule scaled), plain and with camera BN at test."] if short else []), "",
            "| comparison | metric | difference | 2 SE | exceeds 2 SE |", "|---|---|---|---|---|"]
    for v in variants:
        for a, b, label in (("ft_cbn_mAP", "ft_mAP", "camera BN - plain"),
                            ("ft_cbn_Rank-1", "ft_Rank-1", "camera BN - plain"),
                            ("trunk_cbn_mAP", "trunk_mAP", "camera BN - plain"),
                            ("cbn_ft_mAP", "ft_cbn_mAP", "camera BN in training too - at test only"),
                            ("cbn_ft_Rank-1", "ft_cbn_Rank-1", "camera BN in training too - at test only"),
                            ("short_cbn_mAP", "short_mAP", "shorter fine-tuning, camera BN - plain"),
                            ("short_cbn_Rank-1", "short_Rank-1", "shorter fine-tuning, camera BN - plain")):
            r = study.difference_row(f"{v}: {label}", b.replace("_cbn", ""), study._values(rows, v, a),
                                     study._values(rows, v, b))
            if r:
                out.append(r)
    for v in variants:
        if v != "random" and "random" in variants:
            for k, label in (("ft_mAP", "plain"), ("ft_Rank-1", "plain"),
                             ("ft_cbn_mAP", "camera BN"), ("ft_cbn_Rank-1", "camera BN"),
                             ("trunk_cbn_mAP", "camera BN"), ("cbn_ft_mAP", "camera BN in training too"),
                             ("cbn_ft_Rank-1", "camera BN in training too"),
                             ("short_mAP", "shorter fine-tuning, plain"),
                             ("short_Rank-1", "shorter fine-tuning, plain"),
                             ("short_cbn_mAP", "shorter fine-tuning, camera BN"),
                             ("short_cbn_Rank-1", "shorter fine-tuning, camera BN")):
                r = study.difference_row(f"{v} - random, {label}", k.replace("cbn_", "").replace("_cbn", ""),
                                         study._values(rows, v, k), study._values(rows, "random", k))
                if r:
                    out.append(r)
    return "\n".join(out)


def main(argv=None) -> int:
    import torch

    from upreid.data.datasets import synth
    from upreid.engine import demo
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="runs/study_cpu2", help="the pre-training study's --work folder")
    ap.add_argument("--scale", choices=("cpu", "tiny"), default="cpu", help="the study's scale")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", choices=list(study.VARIANTS), default=["random", "upreid"])
    ap.add_argument("--train", action="store_true",
                    help="also fine-tune each initialisation again with camera BN in training (cbn_ft_*)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="also fine-tune each initialisation again for this many epochs (the demo's schedule "
                         "scaled to them) and score it plain and with camera BN (short_*)")
    ap.add_argument("--csv", default=str(CSV), help="CSV the rows are appended to ('' = none)")
    ap.add_argument("--table", default=None, help="markdown table (default: --work/camera_bn_table.md)")
    args = ap.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        ap.error(f"--epochs must be at least 1, got {args.epochs}")
    scale = {"cpu": demo.CPU, "tiny": demo.TINY}[args.scale]
    data = os.path.join(args.work, "data")
    missing = [f"{v}_s{s}" for v in args.variants for s in args.seeds
               if not os.path.isfile(os.path.join(args.work, f"{v}_s{s}", "finetune", "checkpoint.pt"))]
    if not os.path.isfile(os.path.join(data, "meta.json")) or missing:
        print(f"study_camera_bn: {args.work!r} lacks the study's data or runs {missing[:5]}; run "
              "benchmarks/study_pretrain.py with the same --work, --seeds and --variants first", file=sys.stderr)
        return 1
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ds = synth(data)
    pixels = pixel_rows(ds, scale.pretrain_height, scale.pretrain_width)
    rows = []
    for v in args.variants:
        for s in args.seeds:
            row = {**env_fields("cpu"), "work": args.work, "variant": v, "seed": s, **pixels,
                   **score_run(ds, os.path.join(args.work, f"{v}_s{s}"), v, scale)}
            if args.train:
                row.update(finetune_with_camera_bn(os.path.join(args.work, f"{v}_s{s}")))
            if args.epochs is not None:
                row.update(finetune_shorter(ds, os.path.join(args.work, f"{v}_s{s}"), args.epochs))
            print(f"{v} seed {s}: " + ", ".join(f"{k} {100 * row[k]:.2f}" for k in KEYS if k in row), flush=True)
            rows.append(row)
            if args.csv:
                study.append_csv(args.csv, row, FIELDS)
    text = table([{k: str(v) for k, v in r.items()} for r in rows], pixels)
    path = args.table or os.path.join(args.work, "camera_bn_table.md")
    with open(path, "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"table written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

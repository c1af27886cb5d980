"""What do the study's trunks encode before fine-tuning? The share of their features' variance that the
camera explains, and the share that identity explains.

For each trunk (``--work``/VARIANT_sSEED/backbone.pt as ``study_pretrain.py`` leaves them; random: the
seeded initial trunk, written there if missing), BN statistics are re-estimated on the study's
unlabeled images (as its ``probe_bn_mAP``), then the pooled features (flip-averaged, L2-normalised) of
the test split's query and gallery images of real identities (distractors left out) are split by
group: share = between-group sum of squares / total sum of squares, for groups = cameras and for
groups = identities. A random trunk gives the baseline: the images of one camera share a background,
colour cast, blur and resolution, so even random features cluster by camera somewhat.

    python benchmarks/feature_shares.py --work runs/study_cpu --seeds 0 1 2 3 4 \
        --variants random moco moco+gc moco+ic upreid

One row per trunk in ``benchmarks/results/feature_shares.csv`` (device, versions, commit); a table of
mean ± sample std (raw values) is printed. ``--label`` names the rows of trunks that are not one of
the study's variants (a prototype's, under another ``--work``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import append_rows, env_fields  # noqa: E402

CSV = Path(__file__).resolve().parent / "results" / "feature_shares.csv"
FIELDS = ["timestamp", "commit", "device", "torch", "threads", "variant", "seed", "images", "cameras",
          "identities", "camera_share", "identity_share"]


def between_share(features, labels) -> float:
    """Between-group sum of squares over the total, of the rows of ``features`` [N, D] grouped by
    ``labels`` [N] (a 1-D tensor): 0 when every group has the overall mean, 1 when every row equals its
    group's mean."""
    import torch
    f = features - features.mean(0)
    total = float((f ** 2).sum())
    if total == 0:
        raise ValueError("feature_shares: the features have no variance (a constant trunk?)")
    between = 0.0
    for g in torch.unique(labels):
        m = labels == g
        between += float(m.sum()) * float((f[m].mean(0) ** 2).sum())
    return between / total


def trunk_shares(trunk: str, data: str, scale) -> dict:
    import torch
    import torch.nn.functional as F
    from upreid.data.datasets import synth, unlabeled
    from upreid.evaluation.extract import extract_features, recalibrate_bn
    from upreid.evaluation.feature_model import load_feature_model

    ds = synth(data)
    recs = [r for r in list(ds.query) + list(ds.gallery) if r.pid > 0]
    model, info = load_feature_model(trunk, last_stride=1)
    model.to(scale.device)
    pre = dict(height=scale.pretrain_height, width=scale.pretrain_width, mean=info["mean"], std=info["std"],
               device=scale.device, workers=0, progress=False)
    recalibrate_bn(model, unlabeled(os.path.join(data, "unlabeled"), progress=False).train, **pre)
    f, pids, cams = extract_features(model, recs, flip=scale.flip_test, **pre)
    f = F.normalize(f.float(), dim=1)
    return {"images": len(recs), "cameras": int(torch.unique(cams).numel()),
            "identities": int(torch.unique(pids).numel()),
            "camera_share": between_share(f, cams), "identity_share": between_share(f, pids)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="a study_pretrain.py --work folder (its data/ and runs)")
    ap.add_argument("--data", default=None, help="the study's data folder (default: --work/data)")
    ap.add_argument("--variants", nargs="+", required=True)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--scale", choices=["cpu", "gpu", "tiny"], default="cpu", help="the study's scale")
    ap.add_argument("--label", default=None, help="the variant name written in the rows (one variant only)")
    ap.add_argument("--csv", default=str(CSV), help="CSV the rows are appended to ('' = none)")
    args = ap.parse_args(argv)
    if args.label and len(args.variants) != 1:
        ap.error("--label names the rows of one variant; give one --variants")

    from benchmarks.study_pretrain import write_random_trunk
    from upreid.engine import demo
    scale = {"cpu": demo.CPU, "gpu": demo.GPU, "tiny": demo.TINY}[args.scale]
    data = args.data or os.path.join(args.work, "data")
    if not os.path.exists(os.path.join(data, "meta.json")):
        print(f"{data}: no study data here (run benchmarks/study_pretrain.py first)", file=sys.stderr)
        return 1
    env, table = env_fields(scale.device), {}
    for variant in args.variants:
        name = args.label or variant
        for seed in args.seeds:
            run = os.path.join(args.work, f"{variant}_s{seed}")
            trunk = os.path.join(run, "random_trunk.pt" if variant == "random" else "backbone.pt")
            if variant == "random" and not os.path.exists(trunk):
                os.makedirs(run, exist_ok=True)
                write_random_trunk(trunk, scale, seed)
            if not os.path.exists(trunk):
                print(f"{name} seed {seed}: no trunk at {trunk}; skipped", file=sys.stderr)
                continue
            row = {**env, "variant": name, "seed": seed, **trunk_shares(trunk, data, scale)}
            if args.csv:
                append_rows([row], args.csv, FIELDS, ignore_unknown=True)
            table.setdefault(name, []).append(row)
            print(f"{name} seed {seed}: camera {100 * row['camera_share']:.1f} %, identity "
                  f"{100 * row['identity_share']:.1f} %", flush=True)
    print("\n| trunk | seeds | camera share % | identity share % |\n|---|---|---|---|")
    for name, rows in table.items():
        cells = []
        for k in ("camera_share", "identity_share"):
            v = [100 * r[k] for r in rows]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.1f} ± {sd:.1f} ({', '.join(f'{x:.1f}' for x in v)})")
        print(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

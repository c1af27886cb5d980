"""What could pre-training buy on the demo's data? Supervised pre-training on *labelled other identities*.

The pre-training study (``study_pretrain.py``) finds no self-supervised initialisation that beats random
init after fine-tuning. This script asks whether that is the data's fault or the pre-training's: it
pre-trains with labels (BoT, the demo's fine-tuning recipe, no pre-training before it) on identities
that are neither the demo's train, test nor unlabeled ones, seen by the same cameras, then fine-tunes
on the demo's 30 training identities with the demo's recipe, like every row of the study.

Variants (the pre-training set):
  sup-cams    300 identities, each in 2-4 cameras with 2-4 images per camera (like the labelled split)
  sup-1cam    300 identities, each in one camera only, 8 images: no cross-camera pair ever
  sup-pairs   1,024 identities (the unlabeled set's size), 2 renders each in one camera
  exemplar    the demo's 1,024 unlabeled images, each its own identity, twice: what labels can do with
              one image per identity, the situation of a self-supervised pre-training

Per run: the pre-trained model applied directly to the demo's test split (``direct_mAP``), the linear
probe of its trunk with BN statistics re-estimated on the unlabeled images (``probe_bn_mAP``, as the
study's), and the fine-tuned metrics. One CSV row per run (``benchmarks/results/study_oracle.csv``);
the table compares each variant with the study's random-init and UP-ReID rows at the same scale.

    python benchmarks/study_oracle.py --seeds 0 1 2 --work runs/study_oracle \\
        --table benchmarks/results/study_oracle_table.md
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import study_pretrain as study  # noqa: E402

# name: (identities, cameras per identity ("2-4" | 1), images per camera, pre-training epochs)
POOLS = {
    "sup-cams": (300, "2-4", "2-4", 8),
    "sup-1cam": (300, 1, 8, 8),
    "sup-pairs": (1024, 1, 2, 4),
    "exemplar": (None, 1, 2, 4),
}
CSV = Path(__file__).resolve().parent / "results" / "study_oracle.csv"
FIELDS = ["timestamp", "commit", "device", "torch", "threads", "scale", "variant", "seed", "pool_ids",
          "pool_images", "pretrain_steps", "pretrain_s", "direct_mAP", "probe_bn_mAP", "mAP", "Rank-1",
          "mAP_rerank", "Rank-1_rerank", "finetune_s"]
KEYS = ("direct_mAP", "probe_bn_mAP", "mAP", "Rank-1")
ID_BASE = 40_000_000          # identity keys of the pools: beyond train/test (pids), unlabeled (1e7+)


def render_pool(variant: str, seed: int, data: str, root: str, scale) -> tuple:
    """Write the variant's labelled pre-training set as a Market-style ``bounding_box_train`` under
    ``root`` (query and gallery: links to the demo's, so the run also scores the direct transfer);
    returns (identities, images)."""
    from PIL import Image
    from upreid.data.datasets import unlabeled
    from upreid.data.synthetic import make_camera, make_identity, render
    n_ids, cams_per, per_cam, _ = POOLS[variant]
    train = os.path.join(root, "bounding_box_train")
    if os.path.isdir(train):
        shutil.rmtree(train)                            # a half-written pool of an interrupted run
    os.makedirs(train)
    for split in ("query", "bounding_box_test"):
        link = os.path.join(root, split)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(data, split)), link)
    h, w = scale.image_height, scale.image_width
    if variant == "exemplar":
        recs = unlabeled(os.path.join(data, "unlabeled"), progress=False).train
        for i, r in enumerate(recs):
            for k in range(per_cam):
                shutil.copyfile(r.path, os.path.join(train, f"{i + 1:04d}_c1s1_{25 * k:06d}_00.jpg"))
        return len(recs), per_cam * len(recs)
    cameras = [make_camera(0, c) for c in range(scale.cameras)]   # the demo's cameras (dataset seed 0)
    images = 0
    for i in range(n_ids):
        rng = np.random.default_rng([seed, 70, i])
        ident = make_identity(0, ID_BASE + 1_000_000 * seed + i)
        if cams_per == 1:
            cams = [int(rng.integers(scale.cameras))]
        else:
            cams = sorted(rng.choice(scale.cameras, int(rng.integers(2, scale.cameras + 1)), replace=False).tolist())
        for cam in cams:
            n = int(rng.integers(2, 5)) if per_cam == "2-4" else per_cam
            for k in range(n):
                img = render(ident, cameras[cam], np.random.default_rng([seed, 71, i, cam, k]), (h, w))
                Image.fromarray(img).save(os.path.join(train, f"{i + 1:04d}_c{cam + 1}s1_{25 * k:06d}_00.jpg"),
                                          quality=90)
                images += 1
    return n_ids, images


def run_one(scale, variant: str, seed: int, data: str, work: str, rerank: dict, progress: bool) -> dict:
    from upreid.engine import checkpoint as ckpt_io
    from upreid.engine.config import load_config
    from upreid.engine.demo import finetune_overrides, schedule_overrides
    from upreid.engine.finetune import finetune
    from upreid.engine.init_weights import read_trunk_state
    from upreid.engine.trainer import finished

    run = os.path.join(work, f"{variant}_s{seed}")
    prog = [] if progress else ["train.progress=false"]
    ids, images = render_pool(variant, seed, data, os.path.join(run, "pool"), scale)
    epochs = POOLS[variant][3]
    k = 2 if POOLS[variant][2] == 2 else scale.finetune_k
    t = time.perf_counter()
    pcfg = load_config("finetune", None, finetune_overrides(scale, os.path.join(run, "pool"), os.path.join(run, "pretrain"),
                                                            None, seed, rerank=rerank)
                       + schedule_overrides(epochs)
                       + [f"data.k={k}", f"data.p={scale.finetune_p * scale.finetune_k // k}", "eval.ranklist_queries=0"]
                       + prog)
    pre = finished(finetune(pcfg, overwrite=True), f"{variant} seed {seed}: supervised pre-training")
    pre_s = time.perf_counter() - t
    ckpt = os.path.join(run, "pretrain", "checkpoint.pt")
    _, state, info = read_trunk_state(ckpt)
    trunk = os.path.join(run, "trunk.pt")
    ckpt_io.save_backbone(trunk, state, depth=scale.pretrain_depth, width=scale.width, last_stride=1)
    probe = study.probe_trunk(scale, data, trunk)
    t = time.perf_counter()
    fcfg = load_config("finetune", None, finetune_overrides(scale, data, os.path.join(run, "finetune"), ckpt, seed,
                                                            rerank=rerank) + ["eval.ranklist_queries=0"] + prog)
    r = finished(finetune(fcfg, overwrite=True), f"{variant} seed {seed}: fine-tuning")["results"]
    return {"variant": variant, "seed": seed, "pool_ids": ids, "pool_images": images, "pretrain_steps": pre["step"],
            "pretrain_s": round(pre_s, 1), "direct_mAP": pre["results"]["plain"]["mAP"],
            "probe_bn_mAP": probe["probe_bn_mAP"], "mAP": r["plain"]["mAP"], "Rank-1": r["plain"]["Rank-1"],
            "mAP_rerank": r["rerank"]["mAP"], "Rank-1_rerank": r["rerank"]["Rank-1"],
            "finetune_s": round(time.perf_counter() - t, 1)}


def table(rows: list, reference: list) -> str:
    """Mean ± sample std (raw values) per variant, the study's random and UP-ReID rows first (their
    direct transfer is their untrained / pre-trained trunk's nearest neighbour), then each variant's
    difference from random init with two standard errors."""
    vals = study._values
    ref = [dict(r, direct_mAP=r.get("frozen_mAP")) for r in reference]
    out = ["| initialisation | seeds | direct transfer mAP | probe mAP (BN re-estimated) | fine-tuned mAP | "
           "fine-tuned Rank-1 |", "|---|---|---|---|---|---|"]
    for name, rs, v in [(f"study: {v}", ref, v) for v in ("random", "upreid")] + [(v, rows, v) for v in POOLS]:
        if vals(rs, v, "mAP"):
            out.append(f"| {name} | {len(vals(rs, v, 'mAP'))} | " + " | ".join(study.cell(vals(rs, v, k)) for k in KEYS)
                       + " |")
    out += ["", "| variant - study's random init | metric | difference | 2 SE | exceeds 2 SE |", "|---|---|---|---|---|"]
    out += [r for v in POOLS for key in ("mAP", "Rank-1")
            if (r := study.difference_row(v, key, vals(rows, v, key), vals(ref, "random", key)))]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = study.side_study_parser(__doc__, "runs/study_oracle", CSV, [0, 1, 2])
    ap.add_argument("--variants", nargs="+", choices=list(POOLS), default=list(POOLS))
    args = ap.parse_args(argv)

    def one(scale, variant, seed, data, rerank):
        row = run_one(scale, variant, seed, data, args.work, rerank, args.progress)
        print(f"{variant} seed {seed}: direct {100 * row['direct_mAP']:.2f}, probe {100 * row['probe_bn_mAP']:.2f}, "
              f"fine-tuned mAP {100 * row['mAP']:.2f}", end="", flush=True)
        return row

    return study.side_study(args, args.variants, one, FIELDS, table)


if __name__ == "__main__":
    sys.exit(main())

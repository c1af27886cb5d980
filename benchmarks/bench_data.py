"""Data-layer benchmarks: samples/s of the pre-training (3 views), fine-tuning and evaluation
pipelines, DALI vs the Pillow + torch fallback, on synthetic Market-like JPEGs (128 x 64 originals,
256 x 128 outputs). Rows are appended to benchmarks/results/data.csv.

    python benchmarks/bench_data.py                       # CPU, 2 threads, every pipeline and backend
    python benchmarks/bench_data.py --device cuda --impl dali --batch 256 --images 4096 --csv OUT/data.csv
    python benchmarks/bench_data.py --baseline DIR        # raw-pixel / colour-histogram NN mAP of a synth set
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.common import append_rows  # noqa: E402
from upreid.data.augment import MAX_CROP_ATTEMPTS, PretrainAug  # noqa: E402
from upreid.data.loader import build_loader, dali_available  # noqa: E402
from upreid.data.testing import write_tiny  # noqa: E402
from upreid.utils.environment import device_name, git_commit  # noqa: E402

CSV = os.path.join(HERE, "results", "data.csv")
FIELDS = ["timestamp", "commit", "device", "torch", "dali", "pipeline", "impl", "batch", "threads", "images",
          "epochs", "samples_per_s", "seconds"]
PIPELINES = ("pretrain", "finetune", "eval")


def dali_version() -> str:
    if not dali_available():
        return ""
    import nvidia.dali as d
    return d.__version__


def run(kind, recs, impl, device, batch, threads, epochs, crop_attempts=None):
    aug = None if kind == "eval" else ({} if kind == "finetune" or crop_attempts is None
                                       else {"crop_attempts": crop_attempts})
    L = build_loader(kind, recs, batch_size=batch, backend=impl, device=device, workers=threads, aug=aug)
    for _ in L:                                   # warm-up epoch (pipeline build, worker start)
        pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for b in L:
            n += len(b["index"])
        if device == "cuda":
            torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return n, dt


def nn_baseline(root: str) -> dict:
    """Raw-pixel and colour-histogram nearest-neighbour mAP on a synthetic test split."""
    from PIL import Image

    from upreid.data import synth

    ds = synth(root)
    load = lambda recs: np.stack([np.asarray(Image.open(r.path).convert("RGB")) for r in recs]).astype(np.float32) / 255
    q, g = load(ds.query), load(ds.gallery)
    qp, qc = np.array([r.pid for r in ds.query]), np.array([r.camid for r in ds.query])
    gp, gc = np.array([r.pid for r in ds.gallery]), np.array([r.camid for r in ds.gallery])

    def mean_ap(dist):
        aps = []
        for i in range(len(qp)):
            keep = ~((gp == qp[i]) & (gc == qc[i]))
            match = (gp[keep] == qp[i])[np.argsort(dist[i][keep], kind="stable")]
            if match.any():
                ranks = np.nonzero(match)[0] + 1
                aps.append((np.arange(1, len(ranks) + 1) / ranks).mean())
        return float(np.mean(aps))

    fq, fg = q.reshape(len(q), -1), g.reshape(len(g), -1)
    out = {"raw_pixel_l2": mean_ap((fq ** 2).sum(1)[:, None] + (fg ** 2).sum(1)[None] - 2 * fq @ fg.T)}

    def hist(x, bins=8):
        code = np.minimum((x * bins).astype(int), bins - 1) @ np.array([bins * bins, bins, 1])
        h = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in code]).astype(np.float32)
        return h / h.sum(1, keepdims=True)

    hq, hg = hist(q), hist(g)
    out["rgb_hist_bhattacharyya"] = mean_ap(-np.sqrt(hq) @ np.sqrt(hg).T)
    out["rgb_hist_l1"] = mean_ap(np.abs(hq[:, None] - hg[None]).sum(-1))
    out["lda_on_train_cosine"] = mean_ap(_lda_distance(load(ds.train), np.array([r.pid for r in ds.train]), q, g))
    out["chance"] = float(np.mean([((gp == p) & (gc != c)).sum() / len(gp) for p, c in zip(qp, qc)]))
    out["queries"], out["gallery"] = len(qp), len(gp)
    return out


def _lda_distance(train, tp, q, g, dims=64):
    """Evidence that identity is recoverable: grey-world normalised cell colours + stripe histograms,
    projected by LDA fitted on the train identities, cosine distance."""
    import scipy.linalg as sl

    def feat(x):
        xn = np.clip(x / (x.mean((1, 2), keepdims=True) + 1e-3) * 0.5, 0, 0.999)
        n, h, w, _ = x.shape
        cells = xn.reshape(n, 16, h // 16, 8, w // 8, 3).mean((2, 4)).reshape(n, -1)
        hs = []
        for s in range(6):
            part = xn[:, s * h // 6:(s + 1) * h // 6, w // 4:3 * w // 4]
            code = (part * 6).astype(int) @ np.array([36, 6, 1])
            hh = np.stack([np.bincount(c.ravel(), minlength=216) for c in code]).astype(np.float32)
            hs.append(hh / hh.sum(1, keepdims=True))
        return np.concatenate([cells] + hs, 1)

    ft, fq, fg = feat(train), feat(q), feat(g)
    mu = ft.mean(0)
    ft, fq, fg = ft - mu, fq - mu, fg - mu
    sw = np.zeros((ft.shape[1],) * 2)
    for p in np.unique(tp):
        d = ft[tp == p] - ft[tp == p].mean(0)
        sw += d.T @ d
    sw = sw / len(ft) + 1e-3 * np.eye(len(sw))
    _, v = sl.eigh(ft.T @ ft / len(ft), sw)
    v = v[:, ::-1][:, :dims]
    a, b = fq @ v, fg @ v
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return -a @ b.T


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impl", nargs="+", default=["torch", "dali"], choices=["dali", "torch"])
    ap.add_argument("--pipeline", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader workers")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data", help="folder of JPEGs to reuse (default: render into a temp folder)")
    ap.add_argument("--csv", default=CSV, help="the CSV the rows are appended to")
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--crop-attempts", type=int, nargs="+", default=None,
                    help="pre-training crop rule(s) to time (data.crop_attempts, 1.."
                         f"{MAX_CROP_ATTEMPTS}; default {PretrainAug.crop_attempts}; rows name it in 'pipeline')")
    ap.add_argument("--baseline", metavar="SYNTH_ROOT", help="only measure the NN baselines of a synth dataset")
    args = ap.parse_args(argv)
    if args.crop_attempts is None:
        args.crop_attempts = [PretrainAug.crop_attempts]
    elif "pretrain" not in args.pipeline:
        ap.error("--crop-attempts applies to the pretrain pipeline, which --pipeline leaves out")
    for a in args.crop_attempts:        # the pipelines' own rule (PretrainAug.validate), checked before measuring
        try:
            PretrainAug(crop_attempts=a).validate()
        except ValueError as e:
            ap.error(f"--crop-attempts {a}: {e}")

    if args.baseline:
        for k, v in nn_baseline(args.baseline).items():
            print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
        return 0
    torch.set_num_threads(args.threads)
    tmp = None
    root = args.data
    if root is None:
        tmp = tempfile.TemporaryDirectory()
        root = tmp.name
    recs = write_tiny(root, n=args.images, ids=max(16, args.images // 16), cameras=6)
    rows = []
    # all torch runs first: DataLoader workers forked after a DALI pipeline ran would have to be spawned
    for impl in sorted(args.impl, key=lambda i: i != "torch"):
        for kind, crops in [(k, c) for k in args.pipeline for c in (args.crop_attempts if k == "pretrain" else [None])]:
            if impl == "dali" and not dali_available():
                print(f"skip {kind}/dali: DALI not installed")
                continue
            n, dt = run(kind, recs, impl, args.device, args.batch, args.threads, args.epochs, crops)
            name = kind if crops is None else f"{kind}, crop_attempts={crops}"
            row = dict(timestamp=datetime.datetime.now().isoformat(timespec="seconds"), commit=git_commit(),
                       device=device_name(args.device), torch=torch.__version__, dali=dali_version(),
                       pipeline=name, impl=impl, batch=args.batch, threads=args.threads, images=args.images,
                       epochs=args.epochs, samples_per_s=f"{n / dt:.1f}", seconds=f"{dt:.3f}")
            rows.append(row)
            print(f"{name:>9} {impl:>6} {args.device:>5} batch {args.batch:>4} threads {args.threads}: "
                  f"{n / dt:9.1f} samples/s ({n} in {dt:.2f} s)")
    if rows and not args.no_csv:
        append_rows(rows, args.csv, FIELDS)
        print(f"appended {len(rows)} rows to {os.path.relpath(args.csv)}")
    if not rows:
        print("bench_data: no row was measured (DALI not installed?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one-line swap, measured: upreid.compat's evaluate_rank / re_ranking against NumPy
transcriptions of the code they replace, on protocol-sized random workloads. Rows are appended to
benchmarks/results/compat.csv (device, commit, load average).

    python benchmarks/bench_compat.py                                # Market1501 rank, small re-rank
    python benchmarks/bench_compat.py --rank-workload msmt17 --rerank-workload cuhk03
    python benchmarks/bench_compat.py --csv OUT/compat.csv             # rows into another CSV

The fast-reid / torchreid ``evaluate_rank`` transcription (:func:`published_evaluate_rank`) follows
their published algorithm: argsort of every query's row, matches, per query the same-camera
removal, CMC by cumulative sum, INP and AP; its AP division is vectorised (the originals' Python
path divides element by element, so it is slower than this). The argsort of the whole matrix is
timed on its own too: every published implementation, the compiled Cython one included, starts
with it, so it bounds them from below. Re-ranking is compared with the NumPy transcription of the
original in ``upreid/ops/reference_eval.py`` (dense ``N x N``, float64 where the original uses
float32).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import bench_eval  # noqa: E402
from benchmarks.bench_eval import make, timed  # noqa: E402
from benchmarks.common import append_rows, env_fields  # noqa: E402
from upreid.compat import fastreid, torchreid  # noqa: E402
from upreid.ops import reference_eval as ref  # noqa: E402

COMPAT_CSV = Path(__file__).resolve().parent / "results" / "compat.csv"
WORKLOADS = bench_eval.WORKLOADS               # make() reads this table
WORKLOADS.setdefault("cuhk03", (1400, 5332, 2048, 700, 2))      # CUHK03-NP detected: Q, G, D, ids, cameras


def row(*args, **kw) -> dict:
    """bench_eval's row, without a peak-memory figure (not measured here)."""
    r = bench_eval.row(*args, **kw)
    r["peak_mem_mb"] = ""
    return r


def published_evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The published Market1501 evaluation, transcribed: ``(cmc, all_AP, all_INP)``."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    indices = np.argsort(distmat, axis=1)                                   # [Q, G]
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)   # [Q, G]
    all_cmc, all_ap, all_inp = [], [], []
    for q in range(num_q):
        order = indices[q]
        keep = ~((g_pids[order] == q_pids[q]) & (g_camids[order] == q_camids[q]))
        raw_cmc = matches[q][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        last = np.max(np.where(raw_cmc == 1))
        all_inp.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        precision = raw_cmc.cumsum() / np.arange(1.0, len(raw_cmc) + 1)    # vectorised (see above)
        all_ap.append((precision * raw_cmc).sum() / raw_cmc.sum())
    if not all_cmc:
        raise AssertionError("Error: all query identities do not appear in gallery")
    return np.asarray(all_cmc, np.float32).sum(0) / len(all_cmc), np.asarray(all_ap), np.asarray(all_inp)


def rank_rows(env, workload, repeats):
    feats, pids, camids, q = make(workload, "cpu")
    qf, gf = feats[:q], feats[q:]
    dist = (1.0 - qf @ gf.t()).numpy()                                      # [Q, G] fp32 cosine distance
    lab = [t.numpy() for t in (pids[:q], pids[q:], camids[:q], camids[q:])]
    del feats, qf, gf
    cfg = f"{workload} Q={dist.shape[0]} G={dist.shape[1]}"
    mine = fastreid.evaluate_rank(dist, *lab)
    theirs = published_evaluate_rank(dist, *lab)
    for a, b in zip(mine, theirs):          # same numbers (random distances: no ties)
        np.testing.assert_allclose(a, b, atol=1e-5)
    out = []
    for impl, fn, n in (("upreid.compat.fastreid", lambda: fastreid.evaluate_rank(dist, *lab), repeats),
                        ("upreid.compat.torchreid", lambda: torchreid.evaluate_rank(dist, *lab), repeats),
                        ("published (NumPy)", lambda: published_evaluate_rank(dist, *lab), 1),
                        ("argsort only", lambda: np.argsort(dist, axis=1), 1)):
        med, iqr = timed(fn, "cpu", n)
        out.append(row(env, "evaluate_rank", impl, cfg, "float32", med, iqr, 0, "max_rank=50"))
    return out


def rerank_rows(env, workload, repeats):
    feats, _, _, q = make(workload, "cpu")
    qf, gf = feats[:q], feats[q:]
    dists = [torch.cdist(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    cfg = f"{workload} Q={q} G={gf.shape[0]} D={feats.shape[1]}"
    mine = torchreid.re_ranking(*dists)
    out = []
    med, iqr = timed(lambda: torchreid.re_ranking(*dists), "cpu", repeats)
    out.append(row(env, "re_ranking", "upreid.compat.torchreid", cfg, "float32", med, iqr, 0,
                   "k1=20 k2=6 lambda=0.3; inputs dense"))
    holder = {}
    med, iqr = timed(lambda: holder.setdefault("r", ref.k_reciprocal_rerank_dense(*dists, 20, 6, 0.3)), "cpu", 1)
    err = float(np.abs(holder["r"].numpy() - mine).max())
    out.append(row(env, "re_ranking", "published (NumPy)", cfg, "float64", med, iqr, 0,
                   f"dense transcription of the original; max |difference| {err:.1e}"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank-workload", choices=sorted(WORKLOADS), default="market1501")
    p.add_argument("--rerank-workload", choices=sorted(WORKLOADS), default="small")
    p.add_argument("--skip", default="", help="comma list of rank,rerank to leave out")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--csv", default=str(COMPAT_CSV), help="the CSV the rows are appended to")
    p.add_argument("--no-csv", action="store_true", help="print only")
    args = p.parse_args(argv)
    env = env_fields("cpu")
    print(f"{env['device']}, {env['threads']} threads, torch {env['torch']}")
    rows, skip = [], set(bench_eval.comma_list(p, "--skip", args.skip, ("rank", "rerank")))
    if "rank" not in skip:
        rows += rank_rows(env, args.rank_workload, args.repeats)
    if "rerank" not in skip:
        rows += rerank_rows(env, args.rerank_workload, args.repeats)
    if not args.no_csv and rows:
        print(f"appended {len(rows)} rows to {append_rows(rows, args.csv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of the evaluation operators on protocol-sized random workloads: exact k-reciprocal
re-ranking (from features, distance included; from a precomputed dense distance) and the sort-free
rank metrics, against the NumPy references. Median time, spread, peak memory; rows are appended to
benchmarks/results/results.csv.

    python benchmarks/bench_eval.py                          # Market1501-size, CPU
    python benchmarks/bench_eval.py --workload msmt17 --repeats 1
    python benchmarks/bench_eval.py --workload small --reference rerank_dense,rank
    python benchmarks/bench_eval.py --device cuda --csv OUT/results.csv

The references run on the CPU whatever --device says: their rows name the CPU and their peak memory
is the CPU's (resident set), measured in a fresh process.

Workloads are random features with a protocol's shape: identities as Gaussian clusters (centre +
noise, L2-normalised), cameras uniform. The references are dense O(N^2) and run only where asked
(--reference) and where they fit (the dense re-ranking reference needs ~15 GB at Market size).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_CSV, append_rows, env_fields  # noqa: E402
from upreid.ops import reference_eval as ref  # noqa: E402
from upreid.ops.rank import rank_metrics  # noqa: E402
from upreid.ops.rerank import k_reciprocal_rerank, k_reciprocal_rerank_dense  # noqa: E402
from upreid.utils.memory import peak_bytes  # noqa: E402

WORKLOADS = {  # name: (queries, gallery, dim, identities, cameras)
    "tiny": (40, 200, 64, 10, 3),      # tests: seconds
    "small": (700, 3300, 2048, 150, 6),
    "market1501": (3368, 15913, 2048, 750, 6),
    "msmt17": (11659, 82161, 2048, 3060, 15),
    "n20000": (3368, 16632, 2048, 750, 6),
}


def make(workload: str, device: str, seed: int = 0):
    q, g, d, ids, cams = WORKLOADS[workload]
    gen = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, ids, (q + g,), generator=gen)
    centres = torch.randn(ids, d, generator=gen)
    feats = torch.empty(q + g, d)
    for s in range(0, q + g, 8192):  # chunked: no second [N, D] temporary
        e = min(q + g, s + 8192)
        feats[s:e] = torch.nn.functional.normalize(
            centres[pids[s:e]] + 1.5 * torch.randn(e - s, d, generator=gen), dim=1)
    camids = torch.randint(0, cams, (q + g,), generator=gen)
    return feats.to(device), pids.to(device), camids.to(device), q


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    med = statistics.median(times)
    iqr = times[(3 * len(times)) // 4] - times[len(times) // 4] if len(times) > 1 else 0.0
    return med * 1e3, iqr * 1e3


def build_calls(name, feats, pids, camids, q, device):
    """(label, callable) of one benchmarked call; the inputs are built outside the callable."""
    k1, k2, lam = 20, 6, 0.3
    qf, gf = feats[:q], feats[q:]
    if name == "rerank":
        return lambda: k_reciprocal_rerank(feats, q, k1, k2, lam)
    if name in ("rerank_dense", "rerank_dense_ref"):
        dists = [torch.cdist(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf))]
        if name == "rerank_dense_ref":
            dists = [t.cpu() for t in dists]
            return lambda: ref.k_reciprocal_rerank_dense(*dists, k1, k2, lam)
        return lambda: k_reciprocal_rerank_dense(*dists, k1, k2, lam)
    if name in ("rank", "rank_ref", "rank_worst"):
        lab = (pids[:q], pids[q:], camids[:q], camids[q:])
        if name == "rank_worst":
            # Uniform random distances, positives shifted down by 0.3: most negatives precede the
            # last positive, the costliest case of the sort-free counting.
            gen = torch.Generator().manual_seed(1)
            dist = torch.rand(q, feats.shape[0] - q, generator=gen).to(feats.device)
            dist = torch.where(lab[0][:, None] == lab[1][None, :], dist - 0.3, dist)
            return lambda: rank_metrics(dist, *lab, 50)
        dist = 1.0 - qf @ gf.t()  # [Q, G] cosine distance
        if name == "rank_ref":
            dist, lab = dist.cpu(), [t.cpu() for t in lab]   # a CPU reference: no copy in its time
            return lambda: ref.rank_metrics(dist, *lab, 50)
        return lambda: rank_metrics(dist, *lab, 50)
    raise ValueError(name)


OPS = ("rerank", "rerank_dense", "rank", "rank_worst")
REFERENCES = ("rerank_dense", "rank")          # ops with a (CPU, NumPy) reference


def peak_of(name, workload, device):
    """Peak memory of the first call: the CUDA allocator's for an op on the GPU; the resident set in a
    fresh process for one on the CPU, the references included (a warm allocator hides it)."""
    if torch.device(device).type == "cuda" and not name.endswith("_ref"):
        feats, pids, camids, q = make(workload, device)
        fn = build_calls(name, feats, pids, camids, q, device)
        return peak_bytes(fn, device)
    out = subprocess.run([sys.executable, __file__, "--workload", workload, "--peak-of", name],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(env, bench, impl, config, dtype, med, iqr, peak, extra=""):
    # Timings on a shared machine depend on its load: record it with the row.
    extra = f"{extra}; loadavg={os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else extra
    print(f"{bench:<22} {impl:<10} {config:<44} {med / 1e3:9.3f} s  +-{iqr / 1e3:.3f}  "
          f"peak {peak / 2**20:8.1f} MiB  {extra}")
    return dict(env, benchmark=bench, impl=impl, config=config, dtype=dtype, **{"pass": "forward"},
                median_ms=f"{med:.2f}", iqr_ms=f"{iqr:.2f}", peak_mem_mb=f"{peak / 2**20:.1f}",
                extra=extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="market1501")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ops", default="rerank,rerank_dense,rank", help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reference", default="",
                   help=f"comma list of ops whose reference to time too ({', '.join(REFERENCES)})")
    p.add_argument("--csv", default=str(RESULTS_CSV), help="the CSV the rows are appended to")
    p.add_argument("--no-csv", action="store_true", help="print only")
    p.add_argument("--peak-of", help=argparse.SUPPRESS)  # internal: one CPU peak measurement
    args = p.parse_args(argv)
    if args.peak_of:
        feats, pids, camids, q = make(args.workload, "cpu")
        fn = build_calls(args.peak_of, feats, pids, camids, q, "cpu")
        try:  # hand freed heap pages back, so that reused ones count as growth
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        print(json.dumps(peak_bytes(fn, "cpu")))
        return 0
    ops = comma_list(p, "--ops", args.ops, OPS)
    refs = comma_list(p, "--reference", args.reference, REFERENCES)
    env = env_fields(args.device)
    cpu_env = env_fields("cpu")                # the references' rows
    feats, pids, camids, q = make(args.workload, args.device)
    n, d = feats.shape
    g = n - q
    cfg = f"{args.workload} Q={q} G={g} D={d}"
    rows = []
    k1, k2, lam = 20, 6, 0.3
    print(f"{env['device']}, {env['threads']} threads, torch {env['torch']}")

    names = {"rerank": ("rerank_features", "upreid", "float32",
                        f"k1={k1} k2={k2} lambda={lam}; peak includes the [Q,G] fp32 output "
                        f"{q * g * 4 / 2**20:.0f} MiB"),
             "rerank_dense": ("rerank_from_distance", "upreid", "float32",
                              "inputs q_g, q_q, g_g dense fp32 (not in peak)"),
             "rerank_dense_ref": ("rerank_from_distance", "reference", "float64",
                                  "NumPy dense transcription of the original"),
             "rank": ("rank_metrics", "upreid", "float32",
                      "max_rank=50; peak beyond the [Q,G] distance matrix"),
             "rank_worst": ("rank_metrics", "upreid", "float32",
                            "max_rank=50; worst case: uniform random distances, positives - 0.3"),
             "rank_ref": ("rank_metrics", "reference", "float32", "NumPy sort-based (stable)")}
    todo = [o for o in OPS if o in ops] + [o + "_ref" for o in REFERENCES if o in refs]
    for name in todo:
        is_ref = name.endswith("_ref")
        dev = "cpu" if is_ref else args.device
        fn = build_calls(name, feats, pids, camids, q, args.device)
        if not is_ref:
            fn()  # warm-up
        med, iqr = timed(fn, dev, 1 if is_ref else args.repeats)
        del fn
        peak = peak_of(name, args.workload, args.device)
        bench, impl, dtype, extra = names[name]
        rows.append(row(cpu_env if is_ref else env, bench, impl, cfg, dtype, med, iqr, peak, extra))
    if not args.no_csv and rows:
        print(f"appended {len(rows)} rows to {append_rows(rows, args.csv)}")
    if not rows:
        print("bench_eval: no row was measured (check --ops and --reference)", file=sys.stderr)
        return 1
    return 0


def comma_list(parser, flag: str, value: str, known) -> list:
    """The names of a comma list (empty items skipped); an unknown name is an argparse error."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = sorted(set(names) - set(known))
    if unknown:
        parser.error(f"{flag}: unknown {unknown}; choose from {list(known)}")
    return names


if __name__ == "__main__":
    sys.exit(main())

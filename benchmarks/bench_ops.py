"""Microbenchmarks of the fused contrastive operators against the pure-PyTorch reference and
torch.compile(reference): forward, backward and both; median time, spread, peak memory, achieved
TFLOP/s. Prints a table and appends rows to benchmarks/results/results.csv.

    python benchmarks/bench_ops.py                      # CPU, fp32, the quick shape set
    python benchmarks/bench_ops.py --device cuda --dtype bfloat16 --shapes full

FLOPs count the useful matrix products only (forward 2*M*C*D, backward 4*M*C*D for C candidate
columns, as flash-attention reports); the fused backward's recomputation of the logits is not credited.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_CSV, append_rows, env_fields  # noqa: E402
from upreid.ops import bank_kl, info_nce, reference  # noqa: E402
from upreid.utils.memory import peak_bytes  # noqa: E402


@dataclass
class Shape:
    name: str
    op: str          # info_nce | bank_kl
    m: int
    n: int           # keys (info_nce) / unused (bank_kl)
    k: int           # bank rows
    d: int
    group: int = 1   # info_nce group_size
    keys_grad: bool = True  # info_nce: whether the keys need a gradient (momentum keys do not)

    def columns(self) -> int:
        keys = self.n if self.group in (0, self.n) else self.group
        return self.k + (keys if self.op == "info_nce" else self.k)  # bank_kl: two products

    def label(self) -> str:
        grad = "" if self.keys_grad else ",keys_grad=0"
        return f"{self.name}:M={self.m},N={self.n},K={self.k},D={self.d},g={self.group}{grad}"


SHAPES = {
    "quick": [
        Shape("moco", "info_nce", 256, 256, 65536, 128, 1),
        Shape("patch-image", "info_nce", 256 * 4, 256 * 4, 0, 128, 4),
        Shape("patch-batch", "info_nce", 256 * 8, 256 * 8, 0, 128, 0),
        Shape("bank_kl", "bank_kl", 256, 256, 65536, 128),
    ],
    "full": [
        Shape("moco", "info_nce", 256, 256, 65536, 128, 1),
        Shape("moco", "info_nce", 4096, 4096, 65536, 128, 1),
        Shape("patch-image", "info_nce", 256 * 4, 256 * 4, 0, 128, 4),
        Shape("patch-image", "info_nce", 256 * 8, 256 * 8, 0, 128, 8),
        Shape("patch-batch", "info_nce", 256 * 4, 256 * 4, 0, 128, 0),
        Shape("patch-batch", "info_nce", 256 * 8, 256 * 8, 0, 128, 0),
        Shape("bank_kl", "bank_kl", 256, 256, 65536, 128),
        Shape("bank_kl", "bank_kl", 4096, 4096, 65536, 128),
    ],
    # The backward's cost with and without a gradient for the keys (ctx.needs_input_grad).
    "needs-grad": [
        Shape("all-keys", "info_nce", 1024, 1024, 16384, 128, 0),
        Shape("all-keys", "info_nce", 1024, 1024, 16384, 128, 0, keys_grad=False),
    ],
}


def make_inputs(s: Shape, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def feats(n):
        return F.normalize(torch.randn(n, s.d, generator=g), dim=-1).to(device=device, dtype=dtype)

    if s.op == "info_nce":
        q, keys = feats(s.m).requires_grad_(), feats(s.n).requires_grad_(s.keys_grad)
        bank = feats(s.k) if s.k else None
        pos = torch.arange(s.m, device=device) % s.n
        return (q, keys, pos, bank), (q, keys) if s.keys_grad else (q,)
    student = feats(s.m).requires_grad_()
    return (student, feats(s.m), feats(s.k)), (student,)


IMPLS = ("fused", "reference", "compiled")     # compiled: torch.compile(reference)


def forward_fn(s: Shape, impl: str) -> Callable:
    if s.op == "info_nce":
        ref = lambda q, k, p, b: reference.info_nce(q, k, p, b, 0.1, s.group)[0]  # noqa: E731
        fused = lambda q, k, p, b: info_nce(q, k, p, b, 0.1, s.group)[0]  # noqa: E731
    else:
        ref = lambda st, te, b: reference.bank_kl(st, te, b, 0.1, 0.1)[0]  # noqa: E731
        fused = lambda st, te, b: bank_kl(st, te, b, 0.1, 0.1)[0]  # noqa: E731
    if impl == "fused":
        return fused
    if impl == "reference":
        return ref
    if impl != "compiled":
        raise ValueError(f"bench_ops: impl must be one of {IMPLS}, got {impl!r}")
    # The timed backward-only pass replays one graph (retain_graph), which donated buffers forbid.
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
    return torch.compile(ref, dynamic=False)


def fwd_bwd_step(fwd: Callable, inputs, leaves) -> Callable[[], None]:
    """One forward + backward (gradient of ones) with fresh .grad: the unit every timing measures."""

    def step():
        for t in leaves:
            t.grad = None
        out = fwd(*inputs)
        out.backward(torch.ones_like(out))

    return step


def timer(device) -> Callable[[Callable], float]:
    if torch.device(device).type == "cuda":
        def t(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def t(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return t


def measure(fn, device, warmup, repeat):
    clock = timer(device)
    for _ in range(warmup):
        fn()
    times = sorted(clock(fn) for _ in range(repeat))
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def bench_shape(s: Shape, impl: str, dtype, device, warmup, repeat):
    inputs, leaves = make_inputs(s, dtype, device)
    fwd = forward_fn(s, impl)

    def run_fwd():
        with torch.no_grad():
            return fwd(*inputs)

    run_both = fwd_bwd_step(fwd, inputs, leaves)
    state = {}

    def prep_bwd():
        for t in leaves:
            t.grad = None
        state["out"] = fwd(*inputs)

    def run_bwd():
        state["out"].backward(torch.ones_like(state["out"]), retain_graph=True)

    rows = []
    # The matrix products the math needs: logits (forward), then grad_query = W @ C (backward).
    # How an implementation splits work between its passes differs (the fused training variant
    # accumulates the bank mean in its forward), so the backward alone gets no FLOP rate.
    flops = {"fwd": 2.0 * s.m * s.columns() * s.d, "bwd": None}
    flops["fwd+bwd"] = 2 * flops["fwd"]
    run_both()  # compile / first-call costs out of the timings
    for name, fn in (("fwd", run_fwd), ("fwd+bwd", run_both), ("bwd", run_bwd)):
        if name == "bwd":
            prep_bwd()
        med, iqr = measure(fn, device, warmup, repeat)
        rate = flops[name] / (med * 1e-3) / 1e12 if flops[name] else ""
        rows.append({"pass": name, "median_ms": round(med, 3), "iqr_ms": round(iqr, 3),
                     "tflops": round(rate, 4) if rate != "" else ""})
    state.clear()
    peak = fresh_process_peak(s, impl, dtype, device)
    for r in rows:
        r["peak_mem_mb"] = round(peak / 2**20, 1) if r["pass"] == "fwd+bwd" else ""
    return rows


def probe_peak(s: Shape, impl: str, dtype, device) -> int:
    """Peak bytes of one fused/reference forward+backward after a warm-up call."""
    inputs, leaves = make_inputs(s, dtype, device)
    run_both = fwd_bwd_step(forward_fn(s, impl), inputs, leaves)
    run_both()
    return peak_bytes(run_both, device)


def fresh_process_peak(s: Shape, impl: str, dtype, device) -> int:
    """probe_peak in a new process, so that memory the allocator kept from earlier runs does not hide
    (or inflate) this one's peak."""
    import dataclasses
    import json
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--probe", json.dumps(dataclasses.asdict(s)), impl,
         str(dtype).replace("torch.", ""), str(device)],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--probe":
        import json
        s = Shape(**json.loads(argv[1]))
        print(probe_peak(s, argv[2], getattr(torch, argv[3]), argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--shapes", default="quick", choices=sorted(SHAPES))
    ap.add_argument("--only", default="", help="substring filter on the shape names")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--csv", default=str(RESULTS_CSV))
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args(argv)
    impls = args.impls.split(",")
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        ap.error(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    dtype = getattr(torch, args.dtype)
    env = env_fields(args.device)
    print(f"# {env['device']} | torch {env['torch']} | threads {env['threads']} | commit {env['commit']}")
    header = f"{'shape':58s} {'impl':9s} {'pass':8s} {'median ms':>10s} {'iqr':>8s} {'TFLOP/s':>8s} {'peak MiB':>9s}"
    print(header)
    out_rows, failed = [], []
    for s in SHAPES[args.shapes]:
        if args.only and args.only not in s.name:
            continue
        base = {}
        for impl in impls:
            try:
                rows = bench_shape(s, impl, dtype, args.device, args.warmup, args.repeat)
            except Exception as exc:  # a baseline that cannot run (e.g. out of memory) is reported
                print(f"{s.label():58s} {impl:9s} failed: {type(exc).__name__}: {exc}"[:200])
                if impl == "fused":   # the operator itself failed: the run fails, whatever else ran
                    failed.append(f"{s.label()}: {type(exc).__name__}: {exc}"[:300])
                continue
            # Timings on a shared machine depend on its load: recorded with the rows.
            load = f"loadavg={os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
            for r in rows:
                if impl == "reference":
                    base[r["pass"]] = r["median_ms"]
                print(f"{s.label():58s} {impl:9s} {r['pass']:8s} {r['median_ms']:10.2f} {r['iqr_ms']:8.2f} "
                      f"{str(r['tflops']):>8s} {str(r['peak_mem_mb']):>9s}")
                out_rows.append({**env, "benchmark": s.op, "impl": impl, "config": s.label(),
                                 "dtype": args.dtype, **r, "extra": load})
        fused = {r["pass"]: r for r in out_rows if r["config"] == s.label() and r["impl"] == "fused"}
        ref = {r["pass"]: r for r in out_rows if r["config"] == s.label() and r["impl"] == "reference"}
        if "fwd+bwd" in fused and "fwd+bwd" in ref:
            f, r = fused["fwd+bwd"], ref["fwd+bwd"]
            mem = (f"; peak memory {f['peak_mem_mb']} vs {r['peak_mem_mb']} MiB"
                   if f["peak_mem_mb"] != "" else "")
            print(f"  -> fused fwd+bwd is {r['median_ms'] / f['median_ms']:.2f}x the reference's speed{mem}")
    if not args.no_csv and out_rows:
        path = append_rows(out_rows, args.csv)
        print(f"appended {len(out_rows)} rows to {path}")
    if failed:
        print(f"bench_ops: the fused operator failed on {len(failed)} shape(s): {failed[:3]}", file=sys.stderr)
        return 1
    if not out_rows:
        print("bench_ops: no row was measured (check --only and --shapes)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

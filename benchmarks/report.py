"""Turns rows of benchmarks/results/results.csv into the README's tables and figures.

    python benchmarks/report.py                      # newest run of each device: markdown table
    python benchmarks/report.py --plot out.png       # also a bar chart (needs matplotlib)
    python benchmarks/report.py --benchmark info_nce --device H100   # one operator, one device

Every table line names the commit and timestamp of the rows it was made from, so a number quoted in
the README can be traced back to its CSV row.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS_CSV  # noqa: E402

OPS = ("info_nce", "bank_kl")


def load(path: Path) -> list[dict]:
    if not path.exists():
        raise SystemExit(f"no results at {path}; run benchmarks/bench_ops.py first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def newest_runs(rows: list[dict], device_filter: str, ops=OPS) -> list[dict]:
    """For each (device, config, impl, dtype, pass), the newest row."""
    keep: dict[tuple, dict] = {}
    for r in rows:
        if r["benchmark"] not in ops or device_filter.lower() not in r["device"].lower():
            continue
        key = (r["device"], r["config"], r["impl"], r["dtype"], r["pass"])
        if key not in keep or r["timestamp"] >= keep[key]["timestamp"]:
            keep[key] = r
    return list(keep.values())


def table(rows: list[dict]) -> str:
    by = defaultdict(dict)
    for r in rows:
        if r["pass"] == "fwd+bwd":
            by[(r["device"], r["dtype"], r["config"])][r["impl"]] = r
    lines = [
        "| device | dtype | shape | fused ms | reference ms | compiled ref. ms | speed-up vs ref. | "
        "fused peak MiB | ref. peak MiB | rows (commit, time) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for (device, dtype, config), impls in sorted(by.items()):
        f, ref, comp = impls.get("fused"), impls.get("reference"), impls.get("compiled")
        ms = lambda r: f"{float(r['median_ms']):.1f}" if r else "-"  # noqa: E731
        mem = lambda r: r["peak_mem_mb"] if r and r["peak_mem_mb"] else "-"  # noqa: E731
        speed = (f"{float(ref['median_ms']) / float(f['median_ms']):.2f}x" if f and ref else "-")
        src = f"{f['commit']}, {f['timestamp']}" if f else "-"
        lines.append(f"| {device} | {dtype} | {config} | {ms(f)} | {ms(ref)} | {ms(comp)} | {speed} | "
                     f"{mem(f)} | {mem(ref)} | {src} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib")
    both = [r for r in rows if r["pass"] == "fwd+bwd"]
    configs = sorted({r["config"] for r in both})
    impls = [i for i in ("fused", "reference", "compiled") if any(r["impl"] == i for r in both)]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 0.6 * len(configs) + 2))
    height = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        t = [next((float(r["median_ms"]) for r in both if r["config"] == c and r["impl"] == impl), 0) for c in configs]
        m = [next((float(r["peak_mem_mb"] or 0) for r in both if r["config"] == c and r["impl"] == impl), 0) for c in configs]
        ys = [i + j * height for i in range(len(configs))]
        ax_t.barh(ys, t, height, label=impl)
        ax_m.barh(ys, m, height, label=impl)
    for ax, title in ((ax_t, "forward + backward, median ms"), (ax_m, "peak memory, MiB")):
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(configs))])
        ax.set_yticklabels(configs if ax is ax_t else [""] * len(configs), fontsize=8)
        ax.set_title(title)
        ax.invert_yaxis()
    ax_m.legend()
    devices = sorted({r["device"] for r in both})
    fig.suptitle(" / ".join(devices))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv", default=str(RESULTS_CSV))
    ap.add_argument("--benchmark", choices=OPS, help="one operator's rows (default: all of them)")
    ap.add_argument("--device", default="", help="substring of the device name")
    ap.add_argument("--plot", default="", help="write a PNG bar chart here")
    args = ap.parse_args(argv)
    rows = newest_runs(load(Path(args.csv)), args.device, (args.benchmark,) if args.benchmark else OPS)
    print(table(rows))
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()

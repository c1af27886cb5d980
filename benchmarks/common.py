"""Shared benchmark plumbing: environment description and appending rows to the results CSV.

Every row carries the device, the library versions and the commit so that a number quoted in the
README can be traced to the run that produced it.
"""
from __future__ import annotations

import csv
import datetime as _dt
from pathlib import Path

import torch

from upreid.utils.environment import device_name, git_commit

RESULTS_CSV = Path(__file__).resolve().parent / "results" / "results.csv"

FIELDS = [
    "timestamp", "commit", "device", "torch", "cuda", "threads", "benchmark", "impl", "config",
    "dtype", "pass", "median_ms", "iqr_ms", "peak_mem_mb", "tflops", "gbps", "extra",
]


def env_fields(device: str | torch.device) -> dict:
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "threads": torch.get_num_threads(),
    }


def append_rows(rows: list[dict], path: Path | str = RESULTS_CSV) -> Path:
    """Append rows (missing fields left empty, unknown fields are an error) to the CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        unknown = set(row) - set(FIELDS)
        if unknown:
            raise KeyError(f"unknown result fields {sorted(unknown)}; known: {FIELDS}")
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    return path

"""Shared benchmark plumbing: environment description and appending rows to the results CSV.

Every row carries the device, the library versions and the commit so that a number quoted in the
README can be traced to the run that produced it.
"""
from __future__ import annotations

import csv
import datetime as _dt
import os
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


def append_rows(rows: list[dict], path: Path | str = RESULTS_CSV, fields: list[str] | None = None,
                ignore_unknown: bool = False, widen: bool = False) -> Path:
    """Append rows to the CSV under the ``fields`` header (default: the results CSV's), the header
    written first into a new or empty file; an existing file with another header is refused. Missing
    fields are left empty; unknown fields are an error, or, with ``ignore_unknown``, left out (rows that
    carry more than their CSV records). ``widen``: a file whose columns are all among ``fields`` (written
    before a script gained columns) is first rewritten under the full header, its rows' new cells
    empty; a column that ``fields`` lacks is still refused."""
    fields = FIELDS if fields is None else fields
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for row in rows:
        unknown = set(row) - set(fields)
        if unknown and not ignore_unknown:
            raise KeyError(f"unknown result fields {sorted(unknown)}; known: {fields}")
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != list(fields):
            if not (widen and set(header) <= set(fields) and len(set(header)) == len(header)):
                extra = sorted(set(header) - set(fields))
                twice = sorted({c for c in header if header.count(c) > 1})
                why = (f" (columns {extra} are not this script's)" if widen and extra else
                       f" (it names {twice} twice)" if widen and twice else "")
                raise ValueError(f"{path}: its header {header} is not this script's {list(fields)}{why}; "
                                 "pass another CSV path (rows under another header would be misread)")
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
            long = [i + 2 for i, r in enumerate(old) if None in r]     # DictReader's key for surplus cells
            if long:
                raise ValueError(f"{path}: line(s) {long[:5]} have more cells than its header {header}; "
                                 "mend or move the file before adding columns to it")
            tmp = path.with_name(path.name + ".tmp")
            try:
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=fields)
                    w.writeheader()
                    w.writerows(old)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})
    return path

"""Metrics sinks of the trainer: JSONL always, TensorBoard when the ``tensorboard`` package is importable.

``metrics.jsonl`` holds one run: a new run starts it afresh, a resumed one keeps the lines up to the
checkpoint's step and continues from there (the steps after it are run again and logged once).
"""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


def _kept_lines(path: str, keep_until: int) -> list:
    if keep_until <= 0 or not os.path.isfile(path):
        return []
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if int(json.loads(line)["step"]) <= keep_until:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue          # a line cut by a kill: dropped
    return kept


class MetricsWriter:
    def __init__(self, folder: str, enabled: bool = True, tensorboard: bool = True, keep_until: int = 0):
        self.enabled = enabled
        self.path = os.path.join(folder, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not enabled:
            return
        kept = _kept_lines(self.path, keep_until)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(folder, "tensorboard"), purge_step=keep_until + 1)
            except ImportError:
                log.debug("tensorboard is not installed; metrics go to %s only", self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

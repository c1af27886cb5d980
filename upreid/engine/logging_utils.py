"""Metrics sinks of the engine: JSONL always, TensorBoard when the ``tensorboard`` package is importable."""
from __future__ import annotations

import json
import logging
import os

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, folder: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(folder, "metrics.jsonl")
        self._file = open(self.path, "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                import tensorboard  # noqa: F401
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(folder, "tensorboard"))
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

"""Progress reporting for long evaluations: a tqdm bar when tqdm is installed, else log lines."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("upreid.evaluation")

try:  # optional dependency
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None


class Progress:
    """``with Progress(total, desc, enabled) as p: p.update(n)``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "query"):
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.done, self._bar, self._next_log, self._t0 = 0, None, 0.1, 0.0

    def __enter__(self) -> "Progress":
        self._t0 = time.perf_counter()
        if self.enabled and _tqdm is not None:
            self._bar = _tqdm(total=self.total, desc=self.desc, unit=self.unit, leave=False)
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.total and self.done / self.total >= self._next_log:
            log.info("%s: %d/%d %ss (%.1f s)", self.desc, self.done, self.total, self.unit,
                     time.perf_counter() - self._t0)
            self._next_log += 0.1

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()

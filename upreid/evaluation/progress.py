"""Progress reporting for long evaluations: a tqdm bar where someone watches (``upreid.utils.progress``),
else log lines at every tenth (shown where logging is set to INFO)."""
from __future__ import annotations

import logging
import time

from upreid.utils.progress import bar, interactive

log = logging.getLogger("upreid.evaluation")


class Progress:
    """``with Progress(total, desc, enabled) as p: p.update(n)``."""

    def __init__(self, total: int, desc: str, enabled: bool = True, unit: str = "query"):
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.done, self._bar, self._next_log, self._t0 = 0, None, 0.1, 0.0

    def __enter__(self) -> "Progress":
        self._t0 = time.perf_counter()
        if self.enabled and interactive():
            self._bar = bar(total=self.total, desc=self.desc, unit=self.unit, leave=False)
        return self

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.total and self.done / self.total >= self._next_log:
            log.info("%s: %d/%d %s (%.1f s)", self.desc, self.done, self.total, plural(self.unit, self.total),
                     time.perf_counter() - self._t0)
            self._next_log += 0.1

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def plural(noun: str, n: int) -> str:
    """``query`` -> ``queries``, ``batch`` -> ``batches``, ``image`` -> ``images`` (1: the noun itself)."""
    if n == 1:
        return noun
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")

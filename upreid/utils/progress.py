"""Progress bars that stay out of logs: one place decides whether a tqdm bar is drawn.

A bar is drawn where someone watches it: stderr is a terminal, or the code runs in a Jupyter kernel
(whose output streams are not terminals but show tqdm's widget). Piped or redirected to a file
(``upreid demo 2>&1 | tee log``, a batch job), the bar's carriage-return frames would fill the log with
hundreds of partial lines, so none is drawn there; the run's log lines still are, and training logs a
progress line every 30 s instead (``upreid.engine.trainer.PROGRESS_LINE_S``).

``UPREID_PROGRESS`` overrides the guess: ``1`` draws bars anywhere, ``0`` never draws them. Code that
was asked for no progress (``progress=False``, ``train.progress=false``, ``--no-progress``) draws none
whatever the setting. Any other value is warned about (once) and read as unset.
"""
from __future__ import annotations

import logging
import os
import sys

ENV = "UPREID_PROGRESS"
log = logging.getLogger("upreid")
_warned: set = set()


def _in_notebook() -> bool:
    """A Jupyter kernel (what tqdm.auto draws a widget for), not a plain IPython terminal."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def interactive(stream=None) -> bool:
    """Whether a progress bar written to ``stream`` (default: stderr) would be seen as a bar."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced and forced not in _warned:     # a typo must not stop a run (or one rank of it): say so, go on
        _warned.add(forced)
        log.warning("%s=%r is neither 1 (always draw progress bars) nor 0 (never): ignored; bars are drawn "
                    "when stderr is a terminal", ENV, os.environ[ENV])
    if _in_notebook():
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):     # no isatty, or a closed stream
        return False


def bar(iterable=None, *, enabled: bool = True, **kw):
    """``tqdm.auto.tqdm(iterable, **kw)``, disabled unless ``enabled`` and :func:`interactive`. A
    disabled bar passes the iterable through and ignores updates, so callers need no branch."""
    from tqdm.auto import tqdm
    return tqdm(iterable, disable=not (enabled and interactive(kw.get("file"))), **kw)

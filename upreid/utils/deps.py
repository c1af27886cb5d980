"""The error for an optional dependency a feature needs and does not find."""
from __future__ import annotations


class MissingDependencyError(ImportError):
    """An optional package is not installed; the message says which feature needs it and how to install
    it. Command-line tools report it as one line, not a traceback (an ImportError of anything else is a
    broken install and keeps its traceback)."""

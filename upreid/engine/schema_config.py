"""Config loading against any schema: the rules of :mod:`upreid.engine.config` (``_base_`` chains,
``key=value`` overrides, unknown keys are errors with a suggestion, values must have the default's
type, choices) with the defaults and choices passed in rather than fixed to pre-training's.

:mod:`upreid.engine.config` keeps its own module-level schema; this file reuses its reader, its override
parser and its dump, and adds only the schema-parametrised check. (Folding this back: ``config.load_config``
would become ``Schema(DEFAULTS, CHOICES).load``.)
"""
from __future__ import annotations

import copy
import difflib
from typing import Any, Iterable

from upreid.engine.config import ConfigError, _flat, _read, _set, dump_config, parse_override

__all__ = ["ConfigError", "Schema", "dump_config"]


class Schema:
    def __init__(self, defaults: dict, choices: dict | None = None):
        self.defaults = defaults
        self.choices = dict(choices or {})
        self.known = _flat(defaults)

    def suggest(self, key: str) -> str:
        leaf = key.rsplit(".", 1)[-1]
        same_leaf = [k for k in self.known if k.rsplit(".", 1)[-1] == leaf]
        close = same_leaf[:1] or difflib.get_close_matches(key, list(self.known), n=1, cutoff=0.5)
        return f"; did you mean '{close[0]}'?" if close else ""

    def check(self, key: str, value: Any, origin: str) -> Any:
        if key not in self.known:
            raise ConfigError(f"unknown config key '{key}' (from {origin}){self.suggest(key)}")
        default = self.known[key]
        if isinstance(default, str) and isinstance(value, bool) and "off" in self.choices.get(key, ()):
            value = "off" if value is False else value  # YAML 1.1 reads a bare `off` as false
        if key in self.choices and value not in self.choices[key]:
            raise ConfigError(f"{key}={value!r} (from {origin}): must be one of {list(self.choices[key])}")
        ok = (value is None or default is None or
              (isinstance(default, bool) and isinstance(value, bool)) or
              (isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool)) or
              (isinstance(default, int) and not isinstance(default, bool) and isinstance(value, int)
               and not isinstance(value, bool)) or
              (isinstance(default, str) and isinstance(value, (str, bool))) or
              (isinstance(default, list) and isinstance(value, list)))
        if not ok:
            raise ConfigError(f"{key}={value!r} (from {origin}): expected a {type(default).__name__} "
                              f"like the default {default!r}")
        if isinstance(default, float) and isinstance(value, int):
            value = float(value)
        return value

    def load(self, path: str | None = None, overrides: Iterable[str] = ()) -> dict:
        """Defaults <- file (and its ``_base_`` chain) <- ``key=value`` overrides; validated."""
        cfg = copy.deepcopy(self.defaults)
        items = _read(path) if path else []
        items += [(*parse_override(o), "the command line") for o in overrides]
        for key, value, origin in items:
            _set(cfg, key, self.check(key, value, origin))
        return cfg

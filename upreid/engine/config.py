"""One config system for both tasks: YAML files with ``_base_`` inheritance, ``key=value`` overrides,
every setting type- and range-checked at load, and a frozen result.

The defaults of a task live in one place, its ``configs/<task>/base.yaml``; :mod:`upreid.engine.schema`
says what each key accepts. Loading reads the defaults, then the file (and its ``_base_`` chain), then
the overrides, and checks every value as it arrives: an unknown key is an error that suggests the
closest known one, a bad value an error naming the key, the value, where it came from and what is
allowed. Checks between keys (a stripe count that must fit the feature map, ...) run once all values
are in. The result is a :class:`Config`: read-only, ``cfg["train"]["steps"]`` or ``cfg.train.steps``.
"""
from __future__ import annotations

import difflib
import os
from typing import Any, Iterable, Iterator, Mapping

import yaml

from upreid.engine.schema import SPECS, ConfigError, check_relations

TASKS = ("pretrain", "finetune")


def config_roots() -> list:
    """Where the recipes are looked for, in order: the checkout this package runs from (an editable
    install), then the copies a wheel installs under ``<data>/share/upreid/configs`` (pyproject's
    data-files), for the install schemes pip may have used: this environment's (``sys.prefix``, and
    the scheme's data path, e.g. /usr/local on Debian's system Python), the user's (``pip install
    --user``), and the folder above the one this package was installed in (``--prefix``, ``--target``)."""
    import site
    import sys
    import sysconfig
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))          # .../upreid
    up = os.path.dirname
    checkout = os.path.join(up(package), "configs")
    data = [sys.prefix, sysconfig.get_path("data"), getattr(site, "USER_BASE", None) or ""]
    try:
        data.append(sysconfig.get_path("data", f"{os.name}_user"))
    except KeyError:
        pass
    # --prefix P puts the package in P/lib/pythonX.Y/site-packages/upreid and the data in P; --target T
    # puts it in T/upreid and the data in T
    data += [up(up(up(up(package)))), up(package)]
    out = [checkout]
    for d in data:
        r = os.path.join(d, "share", "upreid", "configs") if d else ""
        if r and r not in out:
            out.append(r)
    return out


def find_config_root(roots=None) -> str:
    """The first of ``roots`` (default :func:`config_roots`) that holds both tasks' base.yaml; the first
    root when none does (loading then names what is missing)."""
    roots = config_roots() if roots is None else roots
    for r in roots:
        if all(os.path.isfile(os.path.join(r, t, "base.yaml")) for t in TASKS):
            return r
    return roots[0]


CONFIG_ROOT = find_config_root()


# ------------------------------------------------------------------------------------- frozen object
def _freeze(v):
    if isinstance(v, Mapping):
        return Config(v)
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v):
    if isinstance(v, Config):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


class Config(Mapping):
    """A read-only nested mapping (lists become tuples); ``to_dict()`` gives plain dicts and lists."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping):
        object.__setattr__(self, "_data", {k: _freeze(v) for k, v in data.items()})

    def __getitem__(self, key):
        return self._data[key]

    def __getattr__(self, key):
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r} (keys: {', '.join(self._data)})") from None

    def __setattr__(self, key, value):
        raise TypeError(f"a config is frozen: cannot set {key!r}; load it with an override instead")

    __setitem__ = __setattr__

    def __iter__(self) -> Iterator:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and _thaw(self) == _thaw(Config(other))

    __hash__ = None

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def to_dict(self) -> dict:
        return _thaw(self)


def flatten(d: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and tuples are leaves)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: Mapping) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


# -------------------------------------------------------------------------------------------- files
def _recipe_hint(path: str) -> str:
    """For a missing recipe: where the package's own copy is. ``.../configs/TASK/NAME.yaml`` (a recipe path
    written relative to the checkout, used from another folder), or a bare name (``_base_: tiny_cpu.yaml``
    in a config of one's own) that names a recipe of either task."""
    parts = os.path.normpath(path).split(os.sep)
    if "configs" in parts:
        tail = parts[len(parts) - 1 - parts[::-1].index("configs") + 1:]
        if tail and os.path.isfile(os.path.join(CONFIG_ROOT, *tail)):
            return f"; the package's recipe of that name is {os.path.join(CONFIG_ROOT, *tail)}"
    found = sorted(os.path.join(CONFIG_ROOT, t, parts[-1]) for t in TASKS
                   if os.path.isfile(os.path.join(CONFIG_ROOT, t, parts[-1])))
    if len(found) == 1:
        return f"; the package's recipe of that name is {found[0]} (give that path)"
    if found:
        return (f"; the package's recipes of that name: {', '.join(found)} (give the path of the one for "
                f"this task)")
    return ""


def _read(path: str, seen: tuple = ()) -> list[tuple[str, Any, str]]:
    """Flattened (key, value, origin) of a file and its bases, bases first."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config: _base_ cycle through {path}")
    if not os.path.isfile(path):
        named = f" (the _base_ of {seen[-1]!r})" if seen else ""
        raise ConfigError(f"config file {path!r}{named} does not exist{_recipe_hint(path)}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                          "save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    items: list = []
    base = data.pop("_base_", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"config file {path!r}: _base_ must be one file path (a string), got "
                          f"{type(base).__name__} {base!r}; chain several files through their own _base_")
    if base:
        items += _read(os.path.join(os.path.dirname(path), str(base)), seen + (path,))
    origin = os.path.basename(path)
    for section, body in data.items():
        if isinstance(body, dict):
            items += [(k, v, origin) for k, v in flatten(body, f"{section}.").items()]
        else:  # a top-level leaf (fine-tuning's `init`), or a misplaced key: the schema decides
            items.append((str(section), body, origin))
    return items


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. data.root=/path/to/images")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def base_file(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    path = os.path.join(CONFIG_ROOT, task, "base.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"the defaults of {task} ({path!r}) are missing, and no installed copy was found in "
                          f"{', '.join(config_roots()[1:])}: use upreid from a checkout (an editable install) "
                          "that has the configs/ folder, or reinstall it (pip install --no-build-isolation .)")
    return path


def defaults(task: str) -> dict:
    """``task``'s defaults as written in its base.yaml, flattened (``{"model.depth": 50, ...}``)."""
    return {k: v for k, v, _ in _read(base_file(task))}


# ------------------------------------------------------------------------------------------ loading
def suggest(key: str, known: Iterable[str]) -> str:
    known = list(known)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    close = same_leaf[:1] or difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else ""


def load_config(task: str, path: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """``task``'s config: its base.yaml <- ``path`` (and its ``_base_`` chain) <- ``key=value``
    overrides, every value checked (:mod:`upreid.engine.schema`); a frozen :class:`Config`."""
    if task not in SPECS:
        raise ConfigError(f"unknown task {task!r}; expected one of {sorted(SPECS)}")
    spec = SPECS[task]
    items = _read(base_file(task))
    if path:
        items += _read(path)
    items += [(*parse_override(o), "the command line") for o in overrides]
    values, origins = {}, {}
    for key, value, origin in items:
        if key not in spec:
            other = [t for t in SPECS if t != task and key in SPECS[t]]
            hint = (f"; '{key}' is a {other[0]} setting: is this a {other[0]} config? (upreid {other[0]} "
                    "--config ...)" if other and origin != "the command line" else suggest(key, spec))
            raise ConfigError(f"unknown {task} config key '{key}' (from {origin}){hint}")
        values[key] = spec[key].check(key, value, origin)
        origins[key] = origin
    missing = [k for k in spec if k not in values]
    if missing:   # base.yaml lacks a key of the schema: a defect of the package, said plainly
        raise ConfigError(f"{base_file(task)} lacks the keys {missing}")
    check_relations(task, values, origins)
    return Config(_nest(values))


def dump_config(cfg: Mapping, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict() if isinstance(cfg, Config) else dict(cfg), f, sort_keys=False)
    os.replace(tmp, path)

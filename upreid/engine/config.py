"""Pre-training configuration: nested YAML, a base file, ``key=value`` overrides.

A config file may name a parent with ``_base_: base.yaml`` (relative to the file); sections merge key
by key. ``DEFAULTS`` below is the schema: every key a file or an override sets must exist here (an
unknown key is an error that suggests the closest known one), and its value must have the default's
type (ints are accepted for floats; a default of ``None`` accepts numbers and strings).
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable

import yaml

DEFAULTS: dict = {
    "model": {
        "depth": 50, "last_stride": 2, "ibn": False,
        "dim": 128, "hidden_dim": 2048, "patch_dim": 128,
        "queue_size": 65536, "momentum": 0.999, "temperature": 0.1, "symmetric": False,
        "gc": "bank_kl", "gc_tau_student": None, "gc_tau_teacher": None, "lambda_gc": 1.0,
        "ic": "aligned", "ic_negatives": "image", "ic_temperature": None, "lambda_ic": 1.0,
        "stripes": 4, "roi_samples": 2, "loss_impl": "fused", "shuffle_bn": True,
    },
    "data": {
        "root": None, "backend": "auto", "height": 256, "width": 128, "batch_size": 64, "workers": 4,
        "crop_scale_min": 0.2, "grayscale_p": 0.2, "blur_p": 0.5, "flip_p": 0.5, "erasing_p": 0.5,
        "erasing_area": [0.02, 0.6], "blur_sigma": [0.1, 2.0],
        "mean": [0.3525, 0.3106, 0.3140], "std": [0.2660, 0.2522, 0.2505],
    },
    "optim": {
        "lr": 0.3, "momentum": 0.9, "weight_decay": 1.0e-4, "warmup_steps": 0, "warmup_epochs": 0.0,
        "min_lr": 0.0, "grad_clip": None,
    },
    "train": {
        "epochs": 200, "steps": None, "seed": 0, "device": "auto", "amp": "auto",
        "channels_last": "auto", "compile": False, "output": "runs/upreid_pretrain",
        "checkpoint_every": 1000, "log_every": 20, "progress": True, "deterministic": False,
    },
}

CHOICES = {
    "model.depth": (18, 34, 50, 101), "model.last_stride": (1, 2), "model.gc": ("bank_kl", "cosine", "off"),
    "model.ic": ("aligned", "unaligned", "off"), "model.ic_negatives": ("image", "batch"),
    "model.loss_impl": ("fused", "reference"), "data.backend": ("auto", "dali", "torch", "simple"),
    "train.amp": ("auto", "bf16", "fp16", "off"), "train.channels_last": ("auto", True, False),
}


class ConfigError(ValueError):
    pass


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _set(cfg: dict, key: str, value: Any) -> None:
    *path, leaf = key.split(".")
    node = cfg
    for p in path:
        node = node[p]
    node[leaf] = value


def _read(path: str, seen: tuple = ()) -> list[tuple[str, Any, str]]:
    """Flattened (key, value, origin) of a file and its bases, bases first."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"config: _base_ cycle through {path}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    items: list = []
    base = data.pop("_base_", None)
    if base:
        items += _read(os.path.join(os.path.dirname(path), base), seen + (path,))
    for section, body in data.items():
        if not isinstance(body, dict):  # a leaf at the top level: _check reports it as unknown
            items.append((str(section), body, os.path.basename(path)))
            continue
        items += [(k, v, os.path.basename(path)) for k, v in _flat(body, f"{section}.").items()]
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


# Pre-training's schema; fine-tuning builds its own Schema over its defaults and choices.
PRETRAIN = Schema(DEFAULTS, CHOICES)


def load_config(path: str | None = None, overrides: Iterable[str] = ()) -> dict:
    """Pre-training config: defaults <- file (and its ``_base_`` chain) <- ``key=value`` overrides."""
    return PRETRAIN.load(path, overrides)


def dump_config(cfg: dict, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.replace(tmp, path)

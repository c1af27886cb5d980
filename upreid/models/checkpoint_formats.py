"""Recognising the ResNet checkpoints people have and converting them to a trunk state dict with
torchvision keys (``conv1.weight``, ``layer1.0.conv1.weight``, ...; IBN keys ``bn1.IN.*`` /
``bn1.BN.*``).

Formats, tried in this order (the first that matches wins; detection reads the keys, never the
file name):

``moco``         the LUPerson MoCo v2 release and anything ``main_moco.py`` writes: ``state_dict``
                 with ``module.encoder_q.*`` (or ``encoder_q.*``); the projection MLP ``fc.*``, the
                 key encoder and the queue are dropped
``fastreid``     a fast-reid ``model_final.pth``: ``model`` with ``backbone.*``; the heads
                 (``heads.*``) and the pixel mean / std are dropped
``torchreid``    a torchreid checkpoint: ``state_dict`` (keys possibly ``module.``-prefixed) beside
                 ``epoch`` / ``rank1``, or a state dict with a ``classifier.*``; ``classifier.*`` and
                 the embedding ``fc.*`` are dropped
``torchvision``  a plain ResNet state dict, bare or under ``state_dict`` / ``model``, with or without
                 ``module.``; ``fc.*`` is dropped

upreid's own files carry a ``format`` key and are read by :mod:`upreid.engine.init_weights`.
"""
from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch

log = logging.getLogger("upreid.checkpoint")


class CheckpointFormatError(ValueError):
    """A file that matches none of the known checkpoint layouts."""


class Format(NamedTuple):
    name: str
    layout: str                                   # what the file looks like, for messages
    convert: Callable[[dict], "dict | None"]      # the trunk state dict, or None if not this format


def _is_state(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _unwrap(state: dict) -> dict:
    """Drop a ``module.`` prefix (DataParallel / DDP) carried by every key."""
    return _strip(state, "module.") if all(k.startswith("module.") for k in state) else state


def _drop(state: dict, prefixes: tuple) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(prefixes)}


def _trunk(state: dict) -> dict | None:
    """``state`` if it holds a ResNet trunk (a stem and a first layer), else None."""
    ok = "conv1.weight" in state and any(k.startswith("layer1.") for k in state)
    return state if ok else None


def _containers(obj: dict, keys: tuple) -> list:
    """The state dicts a file may hold: under one of ``keys``, or the file itself."""
    out = [obj[k] for k in keys if _is_state(obj.get(k))]
    return out + ([obj] if _is_state(obj) else [])


def _moco(obj: dict) -> dict | None:
    for sd in _containers(obj, ("state_dict",)):
        for prefix in ("module.encoder_q.", "encoder_q."):
            if any(k.startswith(prefix) for k in sd):
                return _trunk(_drop(_strip(sd, prefix), ("fc.",)))
    return None


def _fastreid(obj: dict) -> dict | None:
    for sd in _containers(obj, ("model",)):
        sd = _unwrap(sd)
        if any(k.startswith("backbone.") for k in sd):
            return _trunk(_strip(sd, "backbone."))
    return None


def _torchreid(obj: dict) -> dict | None:
    nested = _is_state(obj.get("state_dict")) and any(k in obj for k in ("epoch", "rank1"))
    for sd in _containers(obj, ("state_dict",)):
        sd = _unwrap(sd)
        if nested or any(k.startswith("classifier.") for k in sd):
            return _trunk(_drop(sd, ("classifier.", "fc.")))
    return None


def _torchvision(obj: dict) -> dict | None:
    for sd in _containers(obj, ("state_dict", "model")):
        found = _trunk(_drop(_unwrap(sd), ("fc.",)))
        if found:
            return found
    return None


FORMATS = (
    Format("moco", "state_dict with module.encoder_q.* keys (LUPerson MoCo v2, main_moco.py)", _moco),
    Format("fastreid", "model with backbone.* keys (fast-reid model_final.pth)", _fastreid),
    Format("torchreid", "state_dict beside epoch/rank1, or classifier.* keys (torchreid)", _torchreid),
    Format("torchvision", "conv1.weight, layer1.0.* ... bare or under state_dict/model (torchvision)",
           _torchvision),
)


def first_keys(obj, n: int = 8) -> list:
    """The first keys of a file, and of the dict under ``state_dict`` / ``model`` when there is one."""
    if not isinstance(obj, dict):
        return []
    keys = list(obj)[:n]
    for k in ("state_dict", "model"):
        if isinstance(obj.get(k), dict):
            keys += [f"{k}.{sub}" for sub in list(obj[k])[:n]]
    return keys


def convert(obj, path: str, tried: tuple = (), context: str = "checkpoint") -> tuple[str, dict]:
    """``(format name, trunk state dict with torchvision keys)`` of a loaded file ``obj``.

    Raises :class:`CheckpointFormatError` naming ``path`` (after ``context``), every format tried
    (``tried`` lists formats the caller checked before) and the first keys found."""
    if isinstance(obj, dict):
        for fmt in FORMATS:
            state = fmt.convert(obj)
            if state:
                log.info("%s %s: recognised as a %s checkpoint (%s)", context, path, fmt.name, fmt.layout)
                return fmt.name, state
    names = list(tried) + [f"{f.name} ({f.layout})" for f in FORMATS]
    what = f"a {type(obj).__name__}" if not isinstance(obj, dict) else f"first keys {first_keys(obj)}"
    raise CheckpointFormatError(f"{context} {path!r}: not a ResNet checkpoint in any format upreid reads; tried: "
                                + "; ".join(names) + f". Found {what}")

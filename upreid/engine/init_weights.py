"""Initialising a fine-tuning trunk from the files people have.

Supported (detected from the file's content, not its name):

``upreid-pretrain``   a checkpoint of ``upreid pretrain`` (the query trunk, ``encoder_q.trunk.*``)
``upreid-backbone``   a file of ``upreid export-backbone`` (``state_dict`` + ``arch``)
``upreid-finetune``   a fine-tuning checkpoint of this engine (its ``trunk.*``)
``moco``, ``fastreid``, ``torchreid``, ``torchvision``
                      the files of other tools, recognised by :mod:`upreid.models.checkpoint_formats`

A file whose trunk is another depth or another normalisation (IBN or not) than the config's is refused
with an error naming both; shape mismatches likewise. Keys the file lacks (``missing``) and keys it has
that the trunk does not (``unexpected``) are reported and logged.
"""
from __future__ import annotations

import logging
import re

from upreid.engine.checkpoint import BACKBONE_FORMAT, FORMAT as PRETRAIN_FORMAT, CheckpointError, load
from upreid.engine.ema import evaluated_state
from upreid.engine.schema import TRUNK_PARTS, trunk_parts
from upreid.models.checkpoint_formats import CheckpointFormatError, convert
from upreid.models.resnet import ARCHS, ResNet

log = logging.getLogger("upreid.finetune")
FINETUNE_FORMAT = "upreid-finetune"
_OWN = f"{PRETRAIN_FORMAT}, {BACKBONE_FORMAT}, {FINETUNE_FORMAT} (a 'format' key)"


def infer_arch(state: dict) -> dict:
    """Depth and IBN of a ResNet state dict with torchvision keys (from its block counts)."""
    blocks = []
    for layer in range(1, 5):
        idx = {int(m.group(1)) for k in state for m in [re.match(rf"layer{layer}\.(\d+)\.", k)] if m}
        blocks.append(max(idx) + 1 if idx else 0)
    kind = "bottleneck" if any(k.endswith("conv3.weight") for k in state) else "basic"
    depth = next((d for d, (kd, layers) in ARCHS.items() if kd == kind and tuple(blocks) == layers), None)
    ibn = any(".bn1.IN." in k for k in state)
    stem = state.get("conv1.weight")
    width = int(stem.shape[0]) if stem is not None and hasattr(stem, "shape") else None
    return {"depth": depth, "ibn": ibn, "width": width, "blocks": blocks, "kind": kind}


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_trunk_state(path: str) -> tuple[str, dict, dict]:
    """(format, trunk state dict with torchvision keys, info such as ``arch`` and ``step``)."""
    obj = load(path, expect=None)
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt == PRETRAIN_FORMAT:
        m = obj.get("config", {}).get("model", {})
        return fmt, _strip(obj["model"], "encoder_q.trunk."), {
            "arch": {"depth": m.get("depth"), "ibn": m.get("ibn"), "width": m.get("width", 64),
                     "last_stride": m.get("last_stride")},
            "step": obj.get("step")}
    if fmt == BACKBONE_FORMAT:
        return fmt, dict(obj["state_dict"]), {"arch": {"width": 64, **obj["arch"]}, "step": obj.get("step")}
    if fmt == FINETUNE_FORMAT:
        m = obj["config"]["model"]
        return fmt, _strip(evaluated_state(obj), "trunk."), {"arch": {"depth": m["depth"], "ibn": m["ibn"],
                                                                "width": m.get("width", 64)},
                                                       "step": obj.get("step")}
    if fmt is not None:
        raise CheckpointError(f"init {path!r}: unsupported checkpoint format {fmt!r}")
    try:
        fmt, state = convert(obj, path, tried=(_OWN,), context="init")
    except CheckpointFormatError as e:
        raise CheckpointError(str(e)) from None
    return fmt, state, {"arch": infer_arch(state)}


def trunk_part(key: str) -> str:
    """The part of a ResNet trunk a state-dict key belongs to: ``stem`` (conv1, bn1) or ``layer1``-``layer4``."""
    head = key.split(".", 1)[0]
    return head if head.startswith("layer") else "stem"


def load_trunk(trunk: ResNet, path: str, layers=None) -> dict:
    """Load ``path`` into ``trunk``; returns a report (format, loaded, missing, unexpected, arch,
    step, and with ``layers`` the parts kept at their random initialisation, ``random_layers``).
    ``layers`` (default all) names the parts taken from the file (:data:`TRUNK_PARTS`); the file's
    other tensors are left out on purpose, not counted as missing. Raises :class:`CheckpointError`
    for another architecture, whatever ``layers`` says, and ``ValueError`` for a ``layers`` that
    config key ``init_layers`` would refuse."""
    fmt, state, info = read_trunk_state(path)
    arch = info["arch"]
    want = {"depth": trunk.depth, "ibn": trunk.ibn, "width": getattr(trunk, "width", 64)}
    if arch.get("depth") is None:
        raise CheckpointError(f"init {path!r} ({fmt}): not a ResNet 18/34/50/101 trunk "
                              f"(blocks per layer {arch.get('blocks')}, {arch.get('kind')} blocks)")
    wrong = [f"{k}: file {arch.get(k)!r}, config model.{k}={want[k]!r}" for k in want if arch.get(k) != want[k]]
    if wrong:
        raise CheckpointError(f"init {path!r} ({fmt}) holds another architecture: " + "; ".join(wrong)
                              + ". Set the config to match the file, or pick a file for this model.")
    own = trunk.state_dict()
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError(f"init {path!r} ({fmt}): shape mismatch (key, file, model) {bad[:5]}")
    unexpected = sorted(set(state) - set(own))
    if len(state) == len(unexpected):
        raise CheckpointError(f"init {path!r} ({fmt}): none of its keys belongs to the trunk")
    # the config's own rule for init_layers (a ConfigError, i.e. a ValueError, naming the value)
    parts = list(TRUNK_PARTS) if layers is None else trunk_parts().check("init_layers", layers, "load_trunk")
    skipped = [p for p in TRUNK_PARTS if p not in parts]
    take = {k: v for k, v in state.items() if k in own and trunk_part(k) in parts}
    res = trunk.load_state_dict(take, strict=False)
    missing = sorted(k for k in res.missing_keys if trunk_part(k) in parts)
    loaded = len(take)
    report = {"path": path, "format": fmt, "loaded": loaded, "missing": missing, "unexpected": unexpected,
              "arch": {k: v for k, v in arch.items() if k in ("depth", "width", "ibn", "last_stride")},
              "step": info.get("step")}
    if skipped:
        report["random_layers"] = skipped
    log.info("init from %s (%s): %d tensors loaded, %d missing, %d unexpected%s", path, fmt, loaded,
             len(missing), len(unexpected), f"; kept at random init (init_layers): {', '.join(skipped)}"
             if skipped else "")
    if missing:
        log.warning("init: keys the file lacks (left at their random init): %s%s", missing[:8],
                    " ..." if len(missing) > 8 else "")
    if unexpected:
        log.warning("init: keys in the file the trunk does not have (ignored): %s%s", unexpected[:8],
                    " ..." if len(unexpected) > 8 else "")
    return report

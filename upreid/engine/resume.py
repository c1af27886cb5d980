"""What may change between a checkpoint and the run that resumes it.

Settings that define the model's shape or the run's data stream are refused with the list of what
changed (resuming would not continue the same run); every other change is applied and listed in a
warning, so nothing is silently ignored.
"""
from __future__ import annotations

import logging
from typing import Mapping

from upreid.engine.checkpoint import CheckpointError
from upreid.engine.config import defaults, flatten

log = logging.getLogger("upreid.trainer")

# Keys whose change makes the checkpoint another model.
MODEL = {
    "pretrain": ("model.depth", "model.width", "model.last_stride", "model.ibn", "model.dim", "model.hidden_dim",
                 "model.patch_dim", "model.queue_size"),
    "finetune": ("model.arch", "model.depth", "model.width", "model.ibn", "model.neck", "model.mgn_dim",
                 "model.pooling", "model.camera_bn"),
}
# Keys whose change makes the resumed run see other data than the interrupted one would have: every
# data.* key but these, the seed, and fine-tuning's init and epoch length (the position in the data is
# recomputed from the step with it: another length puts the run at another epoch and batch).
DATA_FREE = ("data.workers", "data.on_bad_image", "data.eval_batch_size", "data.flip_test")
# Keys that shape the data only while a switch is on: at data.color_p = 0 no colour jitter is drawn
# (docs/data.md), so its ranges change nothing in the data stream and are applied like other settings.
INERT_WHEN_OFF = {"data.color_p": ("data.color_gain", "data.color_brightness", "data.color_contrast")}
OTHER_DATA = {"pretrain": ("train.seed",), "finetune": ("init", "init_layers", "train.seed", "train.max_steps_per_epoch")}
# Settings added with a default other than the behaviour the code had before them: a checkpoint that
# lacks one ran as this value (data.crop_attempts: one clamped draw per crop until it was added).
BEFORE_ADDED = {"pretrain": {"data.crop_attempts": 1}}
# Keys of no consequence for the state of a run.
FREE = ("train.output", "train.progress")


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def _diff(saved: Mapping, now: Mapping, keys) -> list:
    return [f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}" for k in keys
            if _norm(saved.get(k)) != _norm(now.get(k))]


def check_resume(task: str, state: dict, cfg, path: str) -> list:
    """Raise :class:`CheckpointError` for a change of model or data; return (and log) the other
    settings that changed, which the resumed run applies."""
    saved = flatten(state.get("config", {}))
    now = flatten(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    # A key the checkpoint's config lacks was added to upreid after it was written; a new key's default
    # is the behaviour the code had before it (model.width 64: the published ResNet), so compare that,
    # or the behaviour of BEFORE_ADDED where the default is another.
    added = {k: BEFORE_ADDED.get(task, {}).get(k, v) for k, v in defaults(task).items() if k not in saved}
    if added:
        log.info("the checkpoint predates the settings %s; taken as %s", ", ".join(sorted(added)),
                 ", ".join(f"{k}={v!r}" for k, v in sorted(added.items())))
        saved.update(added)
    model = _diff(saved, now, MODEL[task])
    if task == "pretrain" and (saved.get("model.ic") == "off") != (now.get("model.ic") == "off"):
        model.append(f"model.ic: checkpoint {saved.get('model.ic')!r}, config {now.get('model.ic')!r} "
                     "(the patch head exists only when ic is on)")
    if task == "finetune" and now.get("model.pooling") == "gem" and saved.get("model.gem_p") != now.get("model.gem_p"):
        model.append(f"model.gem_p: checkpoint {saved.get('model.gem_p')!r}, config {now.get('model.gem_p')!r} "
                     "(GeM's p is a parameter saved in the checkpoint: loading it would override the new setting)")
    if model:
        raise CheckpointError(f"checkpoint {path!r} is from another model: " + "; ".join(model))
    if task == "finetune" and (float(saved.get("optim.trunk_lr_mult", 1.0)) == 1.0) != (
            float(now.get("optim.trunk_lr_mult", 1.0)) == 1.0):
        raise CheckpointError(
            f"checkpoint {path!r} has another optimizer layout: optim.trunk_lr_mult: checkpoint "
            f"{saved.get('optim.trunk_lr_mult')!r}, config {now.get('optim.trunk_lr_mult')!r} (at 1 the trunk and "
            "the heads share the optimizer's parameter groups, otherwise they have their own). Restore the "
            "setting, or start a new run (--overwrite, or another train.output)")
    inert = {k for switch, keys in INERT_WHEN_OFF.items()
             if float(saved.get(switch) or 0) == 0 and float(now.get(switch) or 0) == 0 for k in keys}
    data_keys = sorted(k for k in set(saved) | set(now)
                       if k.startswith("data.") and k not in DATA_FREE and k not in inert)
    data = _diff(saved, now, data_keys + list(OTHER_DATA[task]))
    if data:
        raise CheckpointError(f"checkpoint {path!r} was written with other data settings: " + "; ".join(data)
                              + ". Resuming would not continue the same run: restore these settings, or start "
                              "a new run (--overwrite, or another train.output)")
    fixed = set(MODEL[task]) | set(data_keys) | set(OTHER_DATA[task]) | set(FREE)
    applied = [d for d in _diff(saved, now, sorted(set(saved) | set(now))) if d.split(":")[0] not in fixed]
    if applied:
        log.warning("resuming with changed settings (applied from here on): %s", "; ".join(applied))
    return applied

"""What every config key of the two tasks accepts (types, ranges, choices) and the checks between keys.

The defaults are not here: they are in ``configs/<task>/base.yaml``, the one source. A value is
converted where YAML's reading differs from the intent: ``1e-3`` (a string in YAML 1.1) is a number,
``1e3`` an integer where one is expected, a bare ``off`` (false in YAML 1.1) the choice ``off``.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Callable, Mapping

from upreid.data.augment import MAX_CROP_ATTEMPTS


class ConfigError(ValueError):
    """A bad config: the message names the key, the value, where it came from and what is allowed."""


class _Reject(Exception):
    """A value a rule refuses; an argument, if given, is a hint appended to the error (a suggestion)."""


class Setting:
    """One key's rule: ``allowed`` says it in words, ``convert`` returns the value or raises _Reject."""

    def __init__(self, allowed: str, convert: Callable[[Any], Any]):
        self.allowed, self.convert = allowed, convert

    def check(self, key: str, value: Any, origin: str) -> Any:
        try:
            return self.convert(value)
        except _Reject as e:
            hint = e.args[0] if e.args else ""
            raise ConfigError(f"{key}={value!r} (from {origin}): must be {self.allowed}{hint}") from None


def _num(v) -> float | int:
    if isinstance(v, bool):
        raise _Reject
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return float(v)          # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            raise _Reject from None
    raise _Reject


def _bounds(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    return " and ".join(parts)


def _in(x, lo, hi, lo_open, hi_open) -> bool:
    return ((lo is None or (x > lo if lo_open else x >= lo)) and
            (hi is None or (x < hi if hi_open else x <= hi)))


def integer(lo=None, hi=None) -> Setting:
    def convert(v):
        x = _num(v)
        if isinstance(x, float):
            if not x.is_integer():
                raise _Reject
            x = int(x)
        if not _in(x, lo, hi, False, False):
            raise _Reject
        return x
    b = _bounds(lo, hi, False, False)
    return Setting("an integer" + (f" {b}" if b else ""), convert)


def real(lo=None, hi=None, lo_open=False, hi_open=False) -> Setting:
    def convert(v):
        x = float(_num(v))
        if not math.isfinite(x) or not _in(x, lo, hi, lo_open, hi_open):
            raise _Reject
        return x
    b = _bounds(lo, hi, lo_open, hi_open)
    return Setting("a number" + (f" {b}" if b else ""), convert)


def prob() -> Setting:
    return real(0.0, 1.0)


def boolean() -> Setting:
    def convert(v):
        if not isinstance(v, bool):
            raise _Reject
        return v
    return Setting("true or false", convert)


def one_of(*choices) -> Setting:
    def convert(v):
        if isinstance(v, bool) and not any(isinstance(c, bool) for c in choices):
            v = "off" if v is False else "on"          # YAML 1.1: a bare off / on is a bool
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        for c in choices:
            if type(c) is type(v) and c == v:
                return c
        raise _Reject
    return Setting(f"one of {list(choices)}", convert)


def dataset_name(*choices) -> Setting:
    """A dataset name as :func:`upreid.data.build_dataset` reads it (any case, '_' for '-'), with a
    suggestion for a near miss."""
    def convert(v):
        if not isinstance(v, str):
            raise _Reject
        key = v.lower().replace("_", "-")
        if key in choices:
            return key
        if key.startswith("msmt17"):
            raise _Reject("; MSMT17 V1 and V2 are both data.dataset=msmt17 (the version is told from the folders)")
        close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
        raise _Reject(f"; did you mean {close[0]!r}?" if close else "")
    return Setting(f"one of {list(choices)}", convert)


def text() -> Setting:
    def convert(v):
        if isinstance(v, bool) or not isinstance(v, (str, int, float)) or str(v) == "":
            raise _Reject
        return str(v)                  # a path like 2024 is read by YAML as a number
    return Setting("a non-empty string", convert)


def optional(inner: Setting) -> Setting:
    return Setting(f"null or {inner.allowed}", lambda v: None if v is None else inner.convert(v))


def numbers(n: int, lo=None, lo_open=False) -> Setting:
    item = real(lo, lo_open=lo_open)

    def convert(v):
        if not isinstance(v, (list, tuple)) or len(v) != n:
            raise _Reject
        return [item.convert(x) for x in v]
    b = _bounds(lo, None, lo_open, False)
    return Setting(f"a list of {n} numbers" + (f", each {b}" if b else ""), convert)


def pair(lo: float, hi: float | None) -> Setting:
    """[a, b] with lo < a <= b (<= hi)."""
    def convert(v):
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise _Reject
        a, b = (float(_num(x)) for x in v)
        if not (lo < a <= b and (hi is None or b <= hi)):
            raise _Reject
        return [a, b]
    return Setting(f"a list [min, max] with {lo:g} < min <= max" + (f" <= {hi:g}" if hi is not None else ""),
                   convert)


def increasing_ints(lo: int) -> Setting:
    def convert(v):
        if not isinstance(v, (list, tuple)):
            raise _Reject
        out = [integer(lo).convert(x) for x in v]
        if out != sorted(set(out)):
            raise _Reject
        return out
    return Setting(f"a list of increasing integers >= {lo} (may be empty)", convert)


TRUNK_PARTS = ("stem", "layer1", "layer2", "layer3", "layer4")


def trunk_parts() -> Setting:
    """A non-empty list of distinct ResNet trunk parts, in any order."""
    def convert(v):
        if not isinstance(v, (list, tuple)) or not v or any(not isinstance(x, str) or x not in TRUNK_PARTS for x in v) \
                or len(set(v)) != len(v):
            raise _Reject
        return [x for x in TRUNK_PARTS if x in v]
    return Setting(f"a non-empty list of distinct parts from {list(TRUNK_PARTS)}", convert)


def device() -> Setting:
    def convert(v):
        if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise _Reject
        return v
    return Setting("one of 'auto', 'cpu', 'cuda', 'cuda:N'", convert)


DEPTHS = (18, 34, 50, 101)
BAD_IMAGE = one_of("error", "skip")
AMP = one_of("auto", "bf16", "fp16", "off")
BACKEND = one_of("auto", "dali", "torch")
POSITIVE = real(0.0, lo_open=True)
NONNEG = real(0.0)

_DATA_COMMON = {
    "data.root": optional(text()), "data.backend": BACKEND, "data.height": integer(1), "data.width": integer(1),
    "data.workers": integer(0), "data.flip_p": prob(), "data.erasing_p": prob(),
    "data.erasing_area": pair(0.0, 1.0), "data.mean": numbers(3), "data.std": numbers(3, 0.0, lo_open=True),
    "data.on_bad_image": BAD_IMAGE, "data.color_p": prob(), "data.color_gain": pair(0.0, None),
    "data.color_brightness": pair(0.0, None), "data.color_contrast": pair(0.0, None),
}
_TRAIN_COMMON = {
    "train.epochs": integer(1), "train.seed": integer(0), "train.device": device(), "train.amp": AMP,
    "train.channels_last": one_of("auto", True, False), "train.output": text(),
    "train.checkpoint_every": integer(1), "train.log_every": integer(1), "train.progress": boolean(),
    "train.deterministic": boolean(),
}

PRETRAIN = {
    "model.depth": one_of(*DEPTHS), "model.width": integer(2), "model.last_stride": one_of(1, 2), "model.ibn": boolean(),
    "model.dim": integer(1), "model.hidden_dim": integer(1), "model.patch_dim": integer(1),
    "model.queue_size": integer(1), "model.momentum": prob(), "model.temperature": POSITIVE,
    "model.symmetric": boolean(), "model.gc": one_of("bank_kl", "cosine", "off"),
    "model.gc_tau_student": optional(POSITIVE), "model.gc_tau_teacher": optional(POSITIVE),
    "model.lambda_gc": NONNEG, "model.ic": one_of("aligned", "unaligned", "off"),
    "model.ic_negatives": one_of("image", "batch"), "model.ic_temperature": optional(POSITIVE),
    "model.lambda_ic": NONNEG, "model.stripes": integer(1), "model.roi_samples": integer(1),
    "model.loss_impl": one_of("fused", "reference"), "model.shuffle_bn": boolean(),
    "model.bn_groups": integer(1),
    **_DATA_COMMON,
    "data.batch_size": integer(1), "data.crop_scale_min": real(0.0, 1.0, lo_open=True), "data.crop_attempts": integer(1, MAX_CROP_ATTEMPTS),
    "data.grayscale_p": prob(), "data.blur_p": prob(), "data.blur_sigma": pair(0.0, None),
    "optim.lr": POSITIVE, "optim.momentum": real(0.0, 1.0, hi_open=True), "optim.weight_decay": NONNEG,
    "optim.warmup_steps": integer(0), "optim.warmup_epochs": NONNEG, "optim.min_lr": NONNEG,
    "optim.grad_clip": optional(POSITIVE),
    **_TRAIN_COMMON,
    "train.steps": optional(integer(1)), "train.compile": boolean(),
}

FINETUNE_DATASETS = ("market1501", "cuhk03-np", "cuhk03-np/detected", "cuhk03-np/labeled", "msmt17", "personx",
                     "market-style", "synth")
FINETUNE = {
    "init": optional(text()), "init_layers": trunk_parts(),
    "model.arch": one_of("bot", "mgn"), "model.depth": one_of(*DEPTHS), "model.width": integer(2), "model.last_stride": one_of(1, 2),
    "model.ibn": boolean(), "model.neck": boolean(), "model.pooling": one_of("avg", "max", "gem"),
    "model.gem_p": POSITIVE, "model.test_feature": one_of("bn", "pre"), "model.mgn_dim": integer(1),
    "model.camera_bn": boolean(),
    **_DATA_COMMON,
    "data.dataset": dataset_name(*FINETUNE_DATASETS), "data.p": integer(2), "data.k": integer(2),
    "data.pad": integer(0), "data.eval_batch_size": integer(1), "data.flip_test": boolean(),
    "loss.id_weight": NONNEG, "loss.label_smoothing": real(0.0, 1.0, hi_open=True),
    "loss.triplet_weight": NONNEG, "loss.margin": optional(real(0.0, lo_open=True)),
    "optim.name": one_of("adam", "sgd"), "optim.lr": POSITIVE, "optim.weight_decay": NONNEG,
    "optim.trunk_lr_mult": NONNEG,
    "optim.momentum": real(0.0, 1.0, hi_open=True), "optim.warmup_epochs": NONNEG,
    "optim.warmup_factor": real(0.0, 1.0, lo_open=True), "optim.milestones": increasing_ints(1),
    "optim.gamma": POSITIVE, "optim.grad_clip": optional(POSITIVE),
    "optim.ema_decay": real(0.0, 1.0, hi_open=True),
    **_TRAIN_COMMON,
    "train.max_steps_per_epoch": optional(integer(1)),
    "eval.every": integer(0), "eval.rerank": boolean(), "eval.metric": one_of("cosine", "euclidean"),
    "eval.k1": integer(1), "eval.k2": integer(1), "eval.lambda_value": prob(), "eval.camera_bn": boolean(),
    "eval.ranklist_queries": integer(0), "eval.ranklist_top": integer(1),
}

SPECS = {"pretrain": PRETRAIN, "finetune": FINETUNE}


# ------------------------------------------------------------------------------ checks between keys
def layer4_rows(height: int, last_stride: int) -> int:
    """Rows of the ResNet layer-4 map for an input ``height`` (stem /4, layers 2-3 /2 each, layer 4
    /last_stride; every stride-2 stage rounds up)."""
    h = height
    for _ in range(4 + (last_stride == 2)):
        h = (h + 1) // 2
    return h


def _where(origins: Mapping, *keys) -> str:
    return ", ".join(f"{k} from {origins[k]}" for k in keys)


def check_relations(task: str, v: Mapping, origins: Mapping) -> None:
    if v["model.width"] % 2:
        raise ConfigError(f"model.width={v['model.width']!r} ({_where(origins, 'model.width')}) must be even "
                          "(IBN-a splits the channels in halves); 64 is the published ResNet")
    if task == "finetune" and v["init"] in (None, "random") and v["init_layers"] != list(TRUNK_PARTS):
        raise ConfigError(f"init_layers={v['init_layers']!r} ({_where(origins, 'init_layers', 'init')}) selects "
                          f"parts of an init file, but init is {v['init']!r}: set init=FILE, or leave "
                          f"init_layers at {list(TRUNK_PARTS)}")
    if task == "finetune" and v["eval.rerank"] and v["eval.k2"] > v["eval.k1"] + 1:
        raise ConfigError(f"eval.k2={v['eval.k2']} is above eval.k1 + 1 = {v['eval.k1'] + 1} "
                          f"({_where(origins, 'eval.k2', 'eval.k1')}): re-ranking expands each query over its "
                          "k2 nearest neighbours among the k1 + 1 it keeps; use eval.k2 <= eval.k1 + 1 "
                          "(docs/evaluation.md says how to pick them)")
    if task == "finetune" and v["model.camera_bn"] and not v["eval.camera_bn"]:
        raise ConfigError(f"model.camera_bn=true with eval.camera_bn=false ({_where(origins, 'model.camera_bn', 'eval.camera_bn')}): "
                          "a model trained on each camera's own BatchNorm statistics must be evaluated the same "
                          "way; set eval.camera_bn=true")
    if task == "pretrain":
        rows = layer4_rows(v["data.height"], v["model.last_stride"])
        if v["model.ic"] != "off" and v["model.stripes"] > rows:
            raise ConfigError(
                f"model.stripes={v['model.stripes']} does not fit the layer-4 feature map, which has {rows} rows "
                f"at data.height={v['data.height']} and model.last_stride={v['model.last_stride']} "
                f"({_where(origins, 'model.stripes', 'data.height', 'model.last_stride')}): use at most {rows} "
                "stripes, a larger data.height, " + ("model.last_stride=1, " if v["model.last_stride"] == 2 else "")
                + "or model.ic=off")
        if v["data.batch_size"] % v["model.bn_groups"]:
            raise ConfigError(
                f"model.bn_groups={v['model.bn_groups']} does not divide data.batch_size={v['data.batch_size']} "
                f"({_where(origins, 'model.bn_groups', 'data.batch_size')}): the batch (per rank) is cut into "
                "bn_groups BatchNorm groups of equal size; use a batch size divisible by it, or another bn_groups "
                "(1 = plain BatchNorm)")
        if v["optim.min_lr"] > v["optim.lr"]:
            raise ConfigError(f"optim.min_lr={v['optim.min_lr']!r} is above optim.lr={v['optim.lr']!r} "
                              f"({_where(origins, 'optim.min_lr', 'optim.lr')}): the cosine schedule decays "
                              "from optim.lr to optim.min_lr")

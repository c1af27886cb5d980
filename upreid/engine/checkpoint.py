"""Checkpoints: atomic writes, ``weights_only`` loads, clear errors, RNG state capture.

A pre-training checkpoint is a plain dict of tensors and Python primitives (so that
``torch.load(weights_only=True)`` reads it): ``format``, ``version``, ``step``, ``config``,
``model`` (query and momentum encoders, queue and pointer), ``optimizer``, ``scheduler``, ``scaler``,
``rng`` (one entry per rank) and ``world_size``.
"""
from __future__ import annotations

import os
import pickle
import random
import zipfile

import numpy as np
import torch

FORMAT = "upreid-pretrain"
BACKBONE_FORMAT = "upreid-backbone"
VERSION = 1
# Model keys whose change makes a checkpoint a different model (the rest may change on resume).
STRUCTURAL = ("depth", "last_stride", "ibn", "dim", "hidden_dim", "patch_dim", "queue_size")


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj: dict, path: str) -> None:
    """Write to ``path.tmp`` in the same folder, fsync, then ``os.replace``: a reader (or a crash)
    sees the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str, expect: str | None = FORMAT) -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file and say what is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path!r} cannot be read (corrupt, truncated or not a "
                              f"PyTorch file): {first}") from None
    if expect is not None:
        fmt = obj.get("format") if isinstance(obj, dict) else None
        if fmt != expect:
            raise CheckpointError(f"checkpoint {path!r} is not an {expect} checkpoint "
                                  f"(format={fmt!r}); it was written by something else")
        if obj.get("version", 0) > VERSION:
            raise CheckpointError(f"checkpoint {path!r} has version {obj['version']}, newer than this "
                                  f"upreid understands ({VERSION}); upgrade upreid")
    return obj


def check_compatible(ckpt: dict, model_cfg: dict, path: str) -> list[str]:
    """Raise when the checkpoint holds another model; return the non-structural keys that differ."""
    saved = ckpt.get("config", {}).get("model", {})
    structural = [f"model.{k}: checkpoint {saved.get(k)!r}, config {model_cfg.get(k)!r}"
                  for k in STRUCTURAL if saved.get(k) != model_cfg.get(k)]
    if (saved.get("ic") == "off") != (model_cfg.get("ic") == "off"):
        structural.append(f"model.ic: checkpoint {saved.get('ic')!r}, config {model_cfg.get('ic')!r} "
                          "(the patch head exists only when ic is on)")
    if structural:
        raise CheckpointError(f"checkpoint {path!r} is from another model: " + "; ".join(structural))
    return [k for k in model_cfg if k not in STRUCTURAL and saved.get(k) != model_cfg.get(k)]


# ------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x

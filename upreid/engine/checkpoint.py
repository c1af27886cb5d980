"""Checkpoints: atomic writes, an integrity check verified on load, ``weights_only`` loads, clear
errors, RNG state capture.

A checkpoint is a plain dict of tensors and Python primitives (so that ``torch.load(weights_only=True)``
reads it) with ``format`` and ``version``; the trainer's hold ``step``, ``epoch``, ``batch``,
``config``, ``world_size``, ``threads``, ``model``, ``optimizer``, ``scaler``, ``rng`` (one entry per
rank) and the task's own entries. Every file written here carries ``integrity``: the SHA-256 of its
contents (tensor bytes, dtypes, shapes and every other value), recomputed and compared on load, so
flipped bytes inside tensor data are an error rather than a silently different weight. A training
checkpoint keeps its predecessor as ``<name>.prev``: the last good state survives a corrupt write.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import shutil
import zipfile

import numpy as np
import torch

log = logging.getLogger("upreid.checkpoint")

FORMAT = "upreid-pretrain"
BACKBONE_FORMAT = "upreid-backbone"
VERSION = 2          # 2: the integrity entry; version 1 files (without it) still load
INTEGRITY = "integrity"


class CheckpointError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------ digest
def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())   # lists and tuples alike: a save/load may turn one into the other
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{type(obj).__name__}:{obj!r}".encode())


def digest(obj: dict) -> str:
    """SHA-256 of everything in ``obj`` but its ``integrity`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != INTEGRITY})
    return h.hexdigest()


# ------------------------------------------------------------------------------------- save / load
def previous_path(path: str) -> str:
    return f"{path}.prev"


def save_atomic(obj: dict, path: str, keep_previous: bool = False) -> None:
    """Write ``obj`` (with its integrity entry) to ``path.tmp`` in the same folder, fsync, then
    ``os.replace``: a reader (or a crash) sees the old file or the new one, never half of one. With
    ``keep_previous`` the file being replaced stays as ``path.prev`` (a hard link where possible)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    obj = {**obj, INTEGRITY: {"algorithm": "sha256", "digest": digest(obj)}}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.isfile(path):
            prev, prev_tmp = previous_path(path), f"{previous_path(path)}.tmp"
            if os.path.exists(prev_tmp):
                os.remove(prev_tmp)
            try:
                os.link(path, prev_tmp)
            except OSError:           # no hard links on this file system
                shutil.copyfile(path, prev_tmp)
            os.replace(prev_tmp, prev)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_backbone(path: str, state_dict: dict, *, depth: int, last_stride: int, width: int = 64,
                  ibn: bool = False, step: int = 0) -> dict:
    """Write a backbone file (what ``upreid export-backbone`` writes and fine-tuning loads): the trunk's
    torchvision-style ``state_dict`` and its architecture, atomically. Returns the ``arch`` entry."""
    arch = {"depth": depth, "width": width, "last_stride": last_stride, "ibn": ibn}
    save_atomic({"format": BACKBONE_FORMAT, "version": VERSION, "arch": arch, "step": step,
                 "state_dict": state_dict}, path)
    return arch


def _read(path: str):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _pickled(path):
            raise CheckpointError(f"checkpoint {path!r} cannot be read: it is not a PyTorch file (neither the zip "
                                  "archive nor the legacy pickle torch.save writes: some other file, or a damaged "
                                  "one)") from None
        # torch's text advises weights_only=False, i.e. running the file's pickled code: not ours to give
        raise CheckpointError(f"checkpoint {path!r} cannot be read: it holds Python objects besides tensors and "
                              "plain containers, which upreid does not load (unpickling them could run code from "
                              "the file). If it comes from a source you trust, load it in Python, keep its "
                              f"state_dict, and torch.save that ({_last_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as e:
        # (KeyError, IndexError: what the legacy unpickler raises on some text or random bytes)
        text = "" if isinstance(e, (KeyError, IndexError)) else str(e).strip()   # a bare key says nothing
        first = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"checkpoint {path!r} cannot be read (corrupt, truncated or not a "
                              f"PyTorch file): {first}") from None


def _pickled(path: str) -> bool:
    """A torch.save file: a zip archive, or the legacy format, which starts with a pickle protocol mark."""
    with open(path, "rb") as f:
        return zipfile.is_zipfile(path) or f.read(1) == b"\x80"


def _last_line(e: Exception) -> str:
    """The specific part of torch's weights-only refusal (e.g. the unsupported global), without its advice."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip() and "weights_only" not in x
             and "Weights only" not in x and "documentation" not in x and "file an issue" not in x]
    return lines[-1] if lines else type(e).__name__


def verify(obj, path: str) -> None:
    """Raise :class:`CheckpointError` when ``obj`` carries an integrity entry its contents do not match."""
    if not isinstance(obj, dict) or INTEGRITY not in obj:
        return
    want = obj[INTEGRITY].get("digest") if isinstance(obj[INTEGRITY], dict) else None
    if want != digest(obj):
        raise CheckpointError(f"checkpoint {path!r} is corrupt: its contents do not match the SHA-256 "
                              f"recorded when it was written{_previous_hint(path)}")


def _previous_hint(path: str) -> str:
    prev = previous_path(path)
    if not os.path.isfile(prev):
        return ""
    try:
        obj = _read(prev)
        verify(obj, prev)
    except CheckpointError:
        return f"; the previous checkpoint {prev!r} is damaged too"
    return (f"; the previous checkpoint {prev!r} (step {obj.get('step')}) is intact: use it instead (a "
            f"training run continues from it with --resume-from {prev})")


def load(path: str, expect: str | None = FORMAT) -> dict:
    """``torch.load(weights_only=True)``, the integrity check, and the format check, with errors that
    name the file and say what is wrong."""
    obj = _read(path)
    verify(obj, path)
    if expect is not None:
        fmt = obj.get("format") if isinstance(obj, dict) else None
        if fmt != expect:
            raise CheckpointError(f"checkpoint {path!r} is not an {expect} checkpoint "
                                  f"(format={fmt!r}); it was written by something else")
        if obj.get("version", 0) > VERSION:
            raise CheckpointError(f"checkpoint {path!r} has version {obj['version']}, newer than this "
                                  f"upreid understands ({VERSION}); upgrade upreid")
        if INTEGRITY not in obj:
            log.warning("checkpoint %s has no integrity entry (written by an older upreid): not verified", path)
    return obj


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x

"""Checks of command-line arguments made before any work: the ``*_problem`` functions return the
problem as one line naming the option, or None."""
from __future__ import annotations

import os


def device_problem(spec: str, option: str = "--device") -> str | None:
    """``spec`` must be cpu or an available cuda[:i]."""
    import torch
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        return f"{option} {spec!r} is not a device; use cpu or cuda[:i]"
    if dev.type not in ("cpu", "cuda"):
        return f"{option} {spec!r}: only cpu and cuda are supported"
    if dev.type == "cuda" and not torch.cuda.is_available():
        return f"{option} {spec!r}: no CUDA device is available here (torch {torch.__version__})"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"{option} {spec!r}: there are {torch.cuda.device_count()} CUDA devices"
    return None


def output_file_problem(path: str, option: str, create_folder: bool = False) -> str | None:
    """``path`` must name a file (not a folder) in a writable folder, which must exist unless
    ``create_folder`` (then the nearest existing folder above it must be writable: the caller creates it)."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        return f"{option} {path!r} is a folder; give a file name"
    if create_folder:
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
        if not os.path.isdir(folder):
            return f"{option} {path!r}: {folder!r} is a file, not a folder"
    elif not os.path.isdir(folder):
        return f"{option} {path!r}: the folder {folder!r} does not exist"
    if not os.access(folder, os.W_OK):
        return f"{option} {path!r}: the folder {folder!r} is not writable"
    return None


def check_image_size(op: str, height: int | None, width: int | None) -> None:
    """A requested input size must be at least 1 pixel each way (None: the checkpoint's); ValueError."""
    for name, v in (("height", height), ("width", width)):
        if v is not None and v < 1:
            raise ValueError(f"{op}: '{name}' must be at least 1 pixel (leave it out for the checkpoint's), got {v}")


def say_error(command: str, message) -> None:
    """Print ``upreid COMMAND: message`` to stderr, without the library's own ``COMMAND:`` prefix
    where the message already starts with it (``upreid evaluate: evaluate: ...``)."""
    import sys
    text = str(message)
    if text.startswith(f"{command}: "):
        text = text[len(command) + 2:]
    print(f"upreid {command}: {text}", file=sys.stderr)

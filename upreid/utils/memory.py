"""Peak-memory measurement of a callable, on CPU (resident set high-water mark) and CUDA.

CPU: Linux lets a process reset its peak resident set size (``VmHWM``) by writing 5 to
``/proc/self/clear_refs``; the peak of a call is then ``VmHWM`` after it minus ``VmRSS`` before it.
This counts every allocation the call touches (ATen, BLAS workspaces, Python), which is what a user
running out of memory experiences. Run it in a fresh process for numbers free of earlier history.
"""
from __future__ import annotations

from typing import Callable

import torch


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except OSError:
        return False


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak resident bytes added while ``fn()`` runs (Linux only)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device | str = "cuda") -> int:
    """Peak bytes allocated by the caching allocator above what was allocated before ``fn()``."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    return cuda_peak_bytes(fn, device) if torch.device(device).type == "cuda" else cpu_peak_bytes(fn)

"""Where a result was obtained: the commit of this source tree and the device's name, for the rows of
benchmarks and the demo's summary."""
from __future__ import annotations

import os
import platform
import subprocess

import torch


RESULTS = ("benchmarks/results",)   # what the benchmarks write: not a change of the source


def git_commit(cwd: str | None = None, ignore=RESULTS) -> str:
    """Short commit of the checkout this package runs from (or ``cwd``'s), with ``-dirty`` when tracked
    files have uncommitted changes outside ``ignore`` (folders relative to the top of the checkout:
    by default the benchmarks' results, which a run appending its own rows changes itself);
    ``unknown`` outside a git checkout."""
    here = cwd or os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        spec = [":(top)"] + [f":(top,exclude){p}" for p in ignore]
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *spec], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device) -> str:
    """The GPU's name, or ``CPU <model> x<cores>, <ISA>``: the vector instruction set torch's own CPU
    kernels dispatch to (``AVX2``, ``AVX512``, ...). Two CPUs of one model name can differ in it, and a
    training run's rounding with it. It is a necessary condition for reproducing a CPU run bit for bit,
    not a sufficient one: oneDNN picks its convolution kernels by its own reading of the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        isa = "ISA unknown"
    return f"CPU {cpu} x{os.cpu_count()}, {isa}"

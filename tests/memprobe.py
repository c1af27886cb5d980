"""Peak heap bytes of one call, measured in a fresh process with a fixed thread count.

The child runs with ``malloc_count.c`` preloaded: every malloc-family call is counted by its block
size, so the peak is that of the live allocations the call makes (tensors, std::vector, NumPy
arrays), independent of resident pages, allocator caching, page reuse and machine load. Per-thread
buffers scale with the thread count, which is fixed at ``THREADS``.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import textwrap

import pytest

THREADS = 2
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "malloc_count.c")

PRELUDE = textwrap.dedent(f"""
    import ctypes, json, sys
    import torch
    torch.set_num_threads({THREADS})
    _heap = ctypes.CDLL(None)

    def heap_peak(fn):
        '''Peak live heap bytes during fn() above the live bytes before it.'''
        if not hasattr(_heap, "memcount_peak"):
            raise RuntimeError("heap_peak needs malloc_count preloaded: run_probe(counter=...)")
        _heap.memcount_live.restype = _heap.memcount_peak.restype = ctypes.c_int64
        _heap.memcount_reset()
        base = _heap.memcount_live()
        fn()
        return _heap.memcount_peak() - base
""")


@pytest.fixture(scope="session")
def heap_counter(tmp_path_factory) -> str:
    """Path of the compiled counter (skips where it cannot be built: not Linux/glibc, no compiler)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or cc is None:
        pytest.skip("the heap counter needs Linux, glibc and a C compiler")
    lib = str(tmp_path_factory.mktemp("malloc_count") / "malloc_count.so")
    build = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", lib, SOURCE], capture_output=True, text=True)
    assert build.returncode == 0, f"compiling {SOURCE} failed:\n{build.stderr}"
    return lib


def run_probe(counter: str | None, code: str, *args, timeout: float = 900):
    """Run ``code`` (which prints one JSON line last) in a fresh process at ``THREADS`` threads, with
    the counter preloaded where one is given (``heap_peak(fn)`` needs it); returns that JSON. The
    timeout is only a safety net."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    if counter is not None:
        env["LD_PRELOAD"] = counter
    res = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])

"""The CUDA emulation harness: builds upreid's torch-free CUDA kernel sources with the host compiler
against the stand-in headers in ``include/`` and runs them on the CPU (see README.md here).

``load(op)`` gives the functional library of one operator (fibers, in this process, through ctypes);
``run_race(op, args)`` runs a case in the ThreadSanitizer build (a separate executable: TSan must
own the process from its start). Builds are cached by a hash of every input file, the flags and the
compiler, so an edit of a kernel is picked up by the next test run without a reinstall.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CSRC = ROOT / "csrc"
OPS = ("info_nce", "bank_kl", "rank", "rerank", "selftest")  # selftest: the harness's own checks
CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ["-std=gnu++17", "-g0", "-fno-strict-aliasing", "-fno-gnu-unique", "-D__CUDACC__", "-DUPREID_CUDA_EMU=1",
              f"-I{HERE / 'include'}", f"-I{HERE / 'drivers'}"]
MODES = {
    # functional: fibers, optimised; race: one OS thread per CUDA thread under ThreadSanitizer
    "functional": ["-O2", "-fPIC"],
    "race": ["-O1", "-fsanitize=thread", "-DUPREID_EMU_RACE=1", "-fno-omit-frame-pointer"],
}


def cache_dir() -> Path:
    d = os.environ.get("UPREID_EMU_CACHE")
    if d:
        return Path(d)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "upreid" / "emu"


def _compiler_id() -> str:
    out = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0]


def _csrc(op: str, csrc: Path | None) -> Path:
    if csrc is not None:
        return Path(csrc)
    return HERE if op == "selftest" else CSRC


def _inputs(op: str, csrc: Path) -> list[Path]:
    files = sorted((CSRC / "common").glob("*.cuh")) + sorted((csrc / "common").glob("*.cuh"))
    files += sorted((csrc / op).glob("*_kernel.cu*"))
    files += sorted((HERE / "include").glob("*.h")) + sorted((HERE / "drivers").glob("*"))
    files += [HERE / "runtime.cpp", HERE / "race_main.cpp"]
    return files


def _digest(op: str, mode: str, csrc: Path) -> str:
    h = hashlib.sha256()
    h.update(_compiler_id().encode())
    h.update(" ".join(BASE_FLAGS[:6] + MODES[mode]).encode())
    for f in _inputs(op, csrc):
        h.update(str(f.relative_to(f.parents[1])).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:20]


def _compile(args: list[str], what: str) -> None:
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"emulation build of {what} failed:\n{' '.join(args)}\n{res.stderr[-6000:]}")


def build(op: str, mode: str = "functional", csrc: Path | None = None) -> Path:
    """Builds (or finds in the cache) the library (functional) or executable (race) of `op` from the
    kernel sources under `csrc` (default: the checkout's csrc/). Returns its path."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    csrc = _csrc(op, csrc)
    out_dir = cache_dir() / f"{op}-{mode}-{_digest(op, mode, csrc)}"
    target = out_dir / (f"lib{op}.so" if mode == "functional" else f"race_{op}")
    if target.exists():
        return target
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{op}-{mode}-", dir=cache_dir()))
    flags = BASE_FLAGS + [f"-I{csrc}", f"-I{CSRC}"] + MODES[mode]
    units = [(csrc / op / f"{op}_kernel.cu", ["-x", "c++"]), (HERE / "drivers" / f"{op}.cpp", []),
             (HERE / "runtime.cpp", [])]
    if mode == "race":
        units.append((HERE / "race_main.cpp", [f"-DUPREID_EMU_OP_{op.upper()}=1"]))
    objs = [tmp / f"{i}.o" for i in range(len(units))]
    with ThreadPoolExecutor(max_workers=max(1, min(len(units), os.cpu_count() or 1))) as pool:
        list(pool.map(lambda u: _compile([CXX, *flags, "-c", *u[0][1], str(u[0][0]), "-o", str(u[1])],
                                         f"{op} ({mode}): {u[0][0].name}"), zip(units, objs)))
    link = [CXX, *MODES[mode], *(["-shared"] if mode == "functional" else []), *map(str, objs),
            "-o", str(tmp / target.name), "-ldl", "-lpthread"]
    _compile(link, f"{op} ({mode}): link")
    try:
        tmp.rename(out_dir)  # atomic: a concurrent build of the same digest keeps the first one
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def static_shared(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every static __shared__ variable in a built library: the function-local
    statics of namespace upreid::cuda (CUDA device code has no other function-local statics)."""
    out = subprocess.run(["nm", "-S", "--defined-only", str(path)], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[3].startswith("_ZZN6upreid4cuda") and parts[2] in "bBdDuV":
            found.append((int(parts[0], 16), int(parts[1], 16)))
    return found


class Emu:
    """A loaded functional library: the driver entry points and the emulator's controls."""

    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        smem = static_shared(path)
        offs = (ctypes.c_uint64 * max(1, len(smem)))(*[o for o, _ in smem])
        sizes = (ctypes.c_uint64 * max(1, len(smem)))(*[s for _, s in smem])
        self.lib.emu_register_static_smem(offs, sizes, len(smem))
        self.num_static_shared = len(smem)
        self._names: dict[int, str] | None = None
        self.lib.emu_configure.argtypes = [ctypes.c_int] * 5
        self.configure()

    def configure(self, major: int = 9, minor: int = 0, sms: int = 132, smem_optin: int = 232448,
                  binary_arch: int | None = None) -> None:
        """The emulated device (default: an H100-class sm_90 part with 132 SMs)."""
        self.lib.emu_configure(major, minor, sms, smem_optin,
                               binary_arch if binary_arch is not None else 10 * major + minor)
        if hasattr(self.lib, "emu_set_fp32_precision"):
            self.set_fp32_precision("highest")

    def set_fp32_precision(self, mode: str) -> None:
        """What the glue passes for torch.get_float32_matmul_precision(): highest, high, medium."""
        self.lib.emu_set_fp32_precision({"highest": 0, "high": 1, "medium": 2}[mode])

    def _log(self, fn) -> str:
        f = getattr(self.lib, fn)
        f.restype = ctypes.c_size_t
        n = f(None, ctypes.c_size_t(0))
        buf = ctypes.create_string_buffer(n + 1)
        f(buf, ctypes.c_size_t(n + 1))
        return buf.value.decode()

    def errors(self) -> str:
        return self._log("emu_error_log")

    def counts(self) -> tuple[int, int]:
        """(completed block barriers, warp mma_sync calls) since the last clear: how often a kernel
        stages tiles and forms tensor-core products."""
        self.lib.emu_barrier_count.restype = ctypes.c_int64
        self.lib.emu_mma_count.restype = ctypes.c_int64
        return self.lib.emu_barrier_count(), self.lib.emu_mma_count()

    def async_copies(self) -> int:
        """cp.async copies issued since the last clear (the pipelined column-tile loads)."""
        self.lib.emu_async_copy_count.restype = ctypes.c_int64
        return self.lib.emu_async_copy_count()

    def launches(self) -> list[str]:
        """One line per launch since the last clear: "kernel<...> grid=x,y,z block=x,y,z smem=B"."""
        if self._names is None:
            self.lib.emu_base.restype = ctypes.c_uint64
            base = self.lib.emu_base()
            out = subprocess.run(["nm", "-C", "--defined-only", str(self.path)], capture_output=True,
                                 text=True, check=True).stdout
            self._names = {}
            for line in out.splitlines():
                parts = line.split(" ", 2)
                if len(parts) == 3 and parts[1] in "tTW":
                    self._names[base + int(parts[0], 16)] = _strip_params(parts[2])
        lines = []
        for line in self._log("emu_launch_log").splitlines():
            head, _, rest = line.partition(" ")
            if head.startswith("kernel@"):
                head = self._names.get(int(head[7:], 16), head)
            lines.append(f"{head} {rest}")
        return lines

    def clear(self) -> None:
        self.lib.emu_clear_log()


def _strip_params(sig: str) -> str:
    """"void ns::k<T>(Args)" -> "ns::k<T>" (the name of a demangled function signature)."""
    if sig.endswith(")"):
        depth = 0
        for i in range(len(sig) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(sig[i], 0)
            if depth == 0:
                sig = sig[:i]
                break
    return sig[5:] if sig.startswith("void ") else sig


_LOADED: dict[tuple[str, str], Emu] = {}


def load(op: str, csrc: Path | None = None) -> Emu:
    """The functional library of `op`, built from `csrc` (default: the checkout's), loaded once."""
    path = build(op, "functional", csrc)
    key = (op, str(path))
    if key not in _LOADED:
        _LOADED[key] = Emu(path)
    return _LOADED[key]


def run_race(op: str, args: list[str], csrc: Path | None = None, timeout: float = 600) -> tuple[int, int, str, str]:
    """Runs one case of the race build. Returns (exit code, TSan data-race reports, emulator
    errors, full stderr)."""
    exe = build(op, "race", csrc)
    smem = ",".join(f"{o:#x}:{s}" for o, s in static_shared(exe))
    if smem:
        args = [*args, f"smem={smem}"]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=0 report_signal_unsafe=0 history_size=4")
    res = subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=timeout)
    races = res.stderr.count("WARNING: ThreadSanitizer: data race")
    return res.returncode, races, res.stdout, res.stderr


def available() -> str | None:
    """None when the harness can build here, else why not."""
    if shutil.which(CXX) is None:
        return f"no host C++ compiler ({CXX})"
    if shutil.which("nm") is None:
        return "no nm (binutils)"
    if sys.platform != "linux":
        return "the emulator needs Linux (ucontext fibers, ELF symbol tables)"
    return None

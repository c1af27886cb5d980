"""Build of the `upreid._C` extension.

C++ CPU kernels are always built. CUDA kernels are built when the installed torch has CUDA and a
CUDA toolkit is found; `UPREID_CUDA=1` forces them (and fails loudly if impossible), `UPREID_CUDA=0`
skips them. Install with `pip install --no-build-isolation -e .` after installing torch.
`UPREID_NVCC_FLAGS` adds flags to every nvcc call (for example `-DUPREID_SIMT_F32_MIN_BLOCKS=0`, the
occupancy knob of the CUDA-core tile kernels, to compare builds on a GPU).
"""
import glob
import os
import shlex

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _want_cuda(torch, cuda_home):
    mode = os.environ.get("UPREID_CUDA", "auto").lower()
    available = torch.version.cuda is not None and cuda_home is not None
    if mode in ("0", "false", "off", "no"):
        return False
    if mode in ("1", "true", "on", "yes"):
        if not available:
            raise RuntimeError(
                "UPREID_CUDA=1 but CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={cuda_home!r}"
            )
        return True
    return available


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = ["csrc/upreid.cpp"] + [
        s for s in _sources("*/*.cpp") if not s.endswith("_cuda.cpp")
    ]
    cxx = ["-O3", "-g0", "-fopenmp", "-fvisibility=hidden"]
    common = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda(torch, CUDA_HOME):
        sources = cpu_sources + _sources("*/*_cuda.cpp") + _sources("*/*_kernel.cu")
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
        nvcc += shlex.split(os.environ.get("UPREID_NVCC_FLAGS", ""))
        ext = CUDAExtension(
            "upreid._C",
            sources,
            define_macros=[("UPREID_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **common,
        )
    else:
        ext = CppExtension("upreid._C", cpu_sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

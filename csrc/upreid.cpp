// The `upreid._C` module. It holds no Python bindings: importing it runs the static registrations of
// every operator (TORCH_LIBRARY_FRAGMENT in csrc/<op>/<op>.cpp, TORCH_LIBRARY_IMPL in the
// _cpu.cpp/_cuda.cpp files), after which they are reachable as torch.ops.upreid.<name>.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(upreid, m) {
  // True when the CUDA kernels were compiled into this build.
  m.def("_built_with_cuda() -> bool", []() {
#ifdef UPREID_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

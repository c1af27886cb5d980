// Shared by the emulation drivers: a poisoned device-style buffer (the glue allocates workspace with
// at::empty, which is uninitialised: the kernels must not rely on its contents).
#pragma once

#include <cstdlib>
#include <cstring>
#include <memory>

namespace upreid_emu_driver {

struct Buffer {
  std::unique_ptr<unsigned char, void (*)(void*)> p{nullptr, std::free};
  explicit Buffer(size_t bytes, int fill = 0xff) {
    if (bytes == 0) return;
    void* m = nullptr;
    if (posix_memalign(&m, 256, bytes) != 0) std::abort();
    std::memset(m, fill, bytes);
    p.reset(static_cast<unsigned char*>(m));
  }
  void* get() const { return p.get(); }
};

// torch.get_float32_matmul_precision() as the glue would pass it (Fp32Precision: 0 highest,
// 1 high, 2 medium); set by the harness.
inline int g_fp32_precision = 0;

}  // namespace upreid_emu_driver

// Defined here, in the one driver file each emulation library has.
extern "C" void emu_set_fp32_precision(int v) { upreid_emu_driver::g_fp32_precision = v; }

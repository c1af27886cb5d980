// Torch-free: how the CUDA kernels multiply fp32 features, following PyTorch's
// torch.get_float32_matmul_precision() (read by the glue at every call, as cuBLAS does). Ignored
// for fp16 and bf16 (tensor cores on sm_80+, fp32 accumulation) and fp64 (always exact).
#pragma once

namespace upreid {
namespace cuda {

enum class Fp32Precision : int {
  kHighest = 0,  // "highest": fp32-accurate products (CUDA-core FMAs, or 3xTF32 on tensor cores)
  kHigh = 1,     // "high": split-bf16 on bf16 tensor cores (hi + lo parts, three products; more
                 // accurate than TF32)
  kMedium = 2,   // "medium": operands rounded to bf16, bf16 tensor cores, fp32 accumulation
};

}  // namespace cuda
}  // namespace upreid

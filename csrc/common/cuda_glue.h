// Torch-side helpers shared by the CUDA glue files (<op>_cuda.cpp): the kernels' dtype tag of an ATen
// dtype, turning a launcher's cudaError_t into an error that names the operator and the step, the
// fp32 matmul precision the kernels are asked for, and optional fields of the kernels' params
// structs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <cuda_runtime_api.h>

#include <type_traits>
#include <utility>

#include "common/cuda_utils.cuh"
#include "common/precision.h"

namespace upreid {

inline cuda::DType kernel_dtype(at::ScalarType s) {
  switch (s) {
    case at::kHalf:
      return cuda::DType::kF16;
    case at::kBFloat16:
      return cuda::DType::kBF16;
    case at::kDouble:
      return cuda::DType::kF64;
    default:
      return cuda::DType::kF32;
  }
}

inline void check_cuda(cudaError_t e, const char* op, const char* what) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA ", what, " failed: ", cudaGetErrorString(e));
}

// torch.get_float32_matmul_precision() as a kernel policy. When the legacy setter and the
// per-backend one (torch.backends.cuda.matmul.fp32_precision) were mixed, PyTorch refuses to answer
// the legacy question; the CUDA matmul backend's own setting then decides (ieee or tf32).
inline cuda::Fp32Precision fp32_matmul_precision() {
  auto& ctx = at::globalContext();
  try {
    switch (ctx.float32MatmulPrecision()) {
      case at::Float32MatmulPrecision::HIGHEST:
        return cuda::Fp32Precision::kHighest;
      case at::Float32MatmulPrecision::HIGH:
        return cuda::Fp32Precision::kHigh;
      case at::Float32MatmulPrecision::MEDIUM:
        return cuda::Fp32Precision::kMedium;
    }
  } catch (const c10::Error&) {
  }
  return ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                 at::Float32Precision::IEEE
             ? cuda::Fp32Precision::kHighest
             : cuda::Fp32Precision::kHigh;
}

// Optional fields of a kernel params struct. The kernel side adds a field when it learns to honour
// it; until then set_<field>() is a no-op that returns false, so the glue can request a behaviour
// (and keep a fallback) without the two sides having to change in one commit.
#define UPREID_OPTIONAL_FIELD(field)                                                          \
  template <class P, class = void>                                                            \
  struct has_##field : std::false_type {};                                                    \
  template <class P>                                                                          \
  struct has_##field<P, std::void_t<decltype(std::declval<P&>().field)>> : std::true_type {}; \
  template <class P, class V>                                                                 \
  bool set_##field(P& p, V v) {                                                               \
    if constexpr (has_##field<P>::value) {                                                    \
      p.field = static_cast<decltype(p.field)>(v);                                            \
      return true;                                                                            \
    } else {                                                                                  \
      (void)p;                                                                                \
      (void)v;                                                                                \
      return false;                                                                           \
    }                                                                                         \
  }

UPREID_OPTIONAL_FIELD(fp32_precision)   // cuda::Fp32Precision (as int or the enum)
UPREID_OPTIONAL_FIELD(need_grad_query)  // bool: false = grad_query is not written (may be nullptr)
UPREID_OPTIONAL_FIELD(need_grad_keys)   // bool: false = grad_keys is not written (may be nullptr)

#undef UPREID_OPTIONAL_FIELD

}  // namespace upreid

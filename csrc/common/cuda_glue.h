// Torch-side helpers shared by the CUDA glue files (<op>_cuda.cpp): the kernels' dtype tag of an ATen
// dtype, and turning a launcher's cudaError_t into an error that names the operator and the step.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "common/cuda_utils.cuh"

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

}  // namespace upreid

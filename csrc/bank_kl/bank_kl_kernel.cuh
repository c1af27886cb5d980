// bank_kl CUDA kernels: torch-free interface (plain params struct, raw pointers, host launchers).
// Semantics are those of bank_kl_cpu.cpp; the tiling is described in bank_kl_kernel.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda_utils.cuh"

namespace upreid {
namespace cuda {

// student, teacher and bank have the element type given by the DType argument; every other floating
// pointer is of the accumulation type (float, or double for DType::kF64). Contiguous row-major.
struct BankKlParams {
  const void* student = nullptr;  // [M, D]
  const void* teacher = nullptr;  // [M, D]
  const void* bank = nullptr;     // [K, D], K > 0 when M > 0
  int64_t M = 0, K = 0, D = 0;
  double tau_student = 1.0, tau_teacher = 1.0;
  int fp32_precision = 0;         // Fp32Precision (common/precision.h), fp32 inputs only

  // forward outputs (accumulation type)
  void* kl = nullptr;             // [M]
  void* lse_student = nullptr;    // [M]
  void* lse_teacher = nullptr;    // [M]

  // backward inputs (accumulation type) and output
  const void* grad_kl = nullptr;           // [M]
  const void* grad_lse_student = nullptr;  // [M]
  const void* lse_student_in = nullptr;    // [M]
  const void* lse_teacher_in = nullptr;    // [M]
  void* grad_student = nullptr;            // [M, D] (accumulation type)

  // training forward outputs (accumulation type): the expected bank vectors E_r[b], E_p[b]
  void* mean_student = nullptr;  // [M, D]
  void* mean_teacher = nullptr;  // [M, D]

  void* workspace = nullptr;  // from *_workspace(); alive until the kernels have run
  size_t workspace_bytes = 0;
};

cudaError_t bank_kl_forward_workspace(const BankKlParams& p, DType dtype, size_t* bytes);
cudaError_t bank_kl_backward_workspace(const BankKlParams& p, DType dtype, size_t* bytes);

// Training forward (_bank_kl_train): kl, both logsumexps and mean_student / mean_teacher.
cudaError_t bank_kl_train_forward_workspace(const BankKlParams& p, DType dtype, size_t* bytes);

// Launch on `stream` (asynchronous).
cudaError_t bank_kl_forward(const BankKlParams& p, DType dtype, cudaStream_t stream);
cudaError_t bank_kl_backward(const BankKlParams& p, DType dtype, cudaStream_t stream);
cudaError_t bank_kl_train_forward(const BankKlParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace upreid

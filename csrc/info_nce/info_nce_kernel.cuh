// info_nce CUDA kernels: torch-free interface (plain params struct, raw pointers, host launchers).
// Semantics are those of info_nce_cpu.cpp; the tiling is described in info_nce_kernel.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda_utils.cuh"

namespace upreid {
namespace cuda {

// Feature pointers (query, keys, bank) have the element type given by the DType argument; every
// other floating pointer is of the accumulation type (float, or double for DType::kF64). All
// matrices are contiguous row-major.
struct InfoNceParams {
  const void* query = nullptr;       // [M, D]
  const void* keys = nullptr;        // [N, D]
  const int64_t* positive = nullptr; // [M], values in [0, N)
  const void* bank = nullptr;        // [K, D] (K may be 0)
  int64_t M = 0, N = 0, K = 0, D = 0;
  int64_t group_size = 0;            // 0: all keys; g >= 1: keys j with j / g == positive[i] / g
  double temperature = 1.0;
  int fp32_precision = 0;            // Fp32Precision (common/precision.h), fp32 inputs only

  // forward outputs (accumulation type)
  void* loss = nullptr;              // [M]
  void* lse = nullptr;               // [M]
  // info_nce_train_forward only: sum_k softmax_ik bank_k over the bank columns (accumulation type)
  void* bank_mean = nullptr;         // [M, D]

  // backward inputs (accumulation type)
  const void* grad_loss = nullptr;   // [M]
  const void* grad_lse = nullptr;    // [M]
  const void* lse_in = nullptr;      // [M], the forward's lse
  // info_nce_train_backward only: the forward's bank_mean (accumulation type); the bank is not read
  const void* bank_mean_in = nullptr;  // [M, D]
  // backward outputs (accumulation type); grad_keys must be zero-filled by the caller
  void* grad_query = nullptr;        // [M, D]
  void* grad_keys = nullptr;         // [N, D]
  // only the gradients asked for: a false flag skips that output's work (the pointer may be null);
  // in all-keys mode grad_keys is a whole second tile pass, skipped when the keys need no gradient
  bool need_grad_query = true;
  bool need_grad_keys = true;

  // scratch from *_workspace(); must stay alive until the launched kernels have run
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Bytes of workspace the launcher needs on the current device (0 is possible).
cudaError_t info_nce_forward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes);
cudaError_t info_nce_backward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes);

// Launch on `stream` (asynchronous). Requires M > 0 and N > 0.
cudaError_t info_nce_forward(const InfoNceParams& p, DType dtype, cudaStream_t stream);
cudaError_t info_nce_backward(const InfoNceParams& p, DType dtype, cudaStream_t stream);

// Training variant (_info_nce_train): the forward also writes bank_mean (in the same pass over the
// bank as the logsumexp); the backward takes bank_mean_in instead of visiting the bank (p.bank and
// p.K are ignored): the bank part of grad_query is (grad_loss + grad_lse)_i bank_mean_i / t.
cudaError_t info_nce_train_forward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes);
cudaError_t info_nce_train_backward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes);
cudaError_t info_nce_train_forward(const InfoNceParams& p, DType dtype, cudaStream_t stream);
cudaError_t info_nce_train_backward(const InfoNceParams& p, DType dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace upreid

// rank_metrics CUDA kernels: torch-free interface (plain params struct, raw pointers, host
// launchers). Semantics are those of rank_cpu.cpp; the design is described in rank_kernel.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda_utils.cuh"

namespace upreid {
namespace cuda {

struct RankParams {
  const void* dist = nullptr;  // [Q, G] row-major, element type given by `dtype`
  DType dtype = DType::kF32;
  int64_t Q = 0, G = 0, max_rank = 1;
  const int64_t* q_pids = nullptr;    // [Q]
  const int64_t* g_pids = nullptr;    // [G]
  const int64_t* q_camids = nullptr;  // [Q]
  const int64_t* g_camids = nullptr;  // [G]

  // outputs
  float* cmc = nullptr;  // [max_rank]
  float* ap = nullptr;   // [Q]
  float* inp = nullptr;  // [Q]
  bool* valid = nullptr; // [Q]

  // workspace (device)
  int32_t* num_pos = nullptr;  // [Q] positives per query (written by rank_count_positives)
  int32_t* stats = nullptr;    // [2] zero-initialised: {max positives, any non-finite distance}
  int64_t* first = nullptr;    // [Q] 0-based rank of the first match, -1 for invalid queries
  int32_t* hist = nullptr;     // [max_rank + 1] zero-initialised (last entry: valid queries)
  void* scratch = nullptr;     // rank_scratch_bytes(); only when that is > 0
};

// Pass 1: positives per query, their maximum and the NaN/Inf flag into p.stats (the host reads
// p.stats to size pass 2 and to raise the error).
cudaError_t rank_count_positives(const RankParams& p, cudaStream_t stream);

// Global scratch pass 2 needs for queries with up to `max_pos` positives (0 when the positives of
// a query fit in shared memory).
cudaError_t rank_scratch_bytes(const RankParams& p, int64_t max_pos, size_t* bytes);

// Pass 2: per-query ranks -> ap, inp, valid, first; then the CMC curve.
cudaError_t rank_metrics_run(const RankParams& p, int64_t max_pos, cudaStream_t stream);

}  // namespace cuda
}  // namespace upreid

// k_reciprocal_rerank CUDA kernels: torch-free interface (plain params struct, raw pointers,
// host launchers). Semantics are those of rerank_cpu.cpp / rerank_sparse_cpu.h; the stages are
// described in rerank_kernel.cu. The glue runs the stages in order and allocates the CSR arrays
// between them (their sizes are read back: one scalar per CSR).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda_utils.cuh"

namespace upreid {
namespace cuda {

// "T" below is float for DType::kF32 and double for DType::kF64 (the glue converts fp16/bf16 to
// fp32 first, as the CPU path does). All arrays are device memory, contiguous, row-major.
struct RerankParams {
  DType dtype = DType::kF32;  // kF32 or kF64
  int64_t N = 0, Q = 0, D = 0;  // N = Q + G items (queries first); D features (features path)
  int64_t K = 1;      // min(k1 + 1, N): neighbours per row
  int64_t hk = 1;     // min(rerank_half_k(k1), N): neighbours of the expansion rule
  int64_t kq = 1;     // min(k2, N): rows of the local query expansion
  int64_t k2 = 1;     // k2 == 1 skips the query expansion (as the original does)
  double lambda = 0.3;
  // features path, fp32: torch.get_float32_matmul_precision() as Fp32Precision (precision.h).
  // "highest": the distance tiles on the CUDA cores (fp32 FMAs); "high" and "medium": split-bf16 on
  // the tensor cores (sm_80+ code on an sm_80+ device), three bf16 products per tile product.
  int fp32_precision = 0;

  // inputs: either the features path (x) or the dense path (q_g, q_q, g_g), all of type T
  const void* x = nullptr;    // [N, D]
  const void* q_g = nullptr;  // [Q, G]
  const void* q_q = nullptr;  // [Q, Q]
  const void* g_g = nullptr;  // [G, G]

  float* out = nullptr;  // [Q, G] fp32: raw squared distances after stage 1, the result at the end

  // stage 1
  void* sq = nullptr;          // [N] T, squared norms (features path)
  int32_t* nbr = nullptr;      // [N, K] neighbours, ascending (d2, index)
  void* nbr_d2 = nullptr;      // [N, K] T, their squared distances
  void* rowmax = nullptr;      // [N] T, row maximum of the squared distance
  // stage 2
  int32_t* rh = nullptr;       // [N, hk] half-size reciprocal sets
  int32_t* rh_len = nullptr;   // [N]
  int64_t* v_ptr = nullptr;    // [N + 1] zero-initialised; V rows (expanded sets, weights)
  int32_t* v_col = nullptr;    // [v_ptr[N]]
  void* v_val = nullptr;       // [v_ptr[N]] T
  // stage 3 (only when k2 != 1)
  int64_t* e_ptr = nullptr;    // [N + 1] zero-initialised; query-expanded rows
  int32_t* e_col = nullptr;
  void* e_val = nullptr;
  // stage 4: inverted index of the final rows (e_* when k2 != 1, else v_*), gallery rows only
  int64_t* i_ptr = nullptr;    // [N + 1] zero-initialised
  int32_t* i_fill = nullptr;   // [N] zero-initialised
  int32_t* i_col = nullptr;    // [final nnz] (gallery index j - Q)
  void* i_val = nullptr;       // [final nnz] T

  void* scratch = nullptr;     // rerank_scratch_bytes()
  size_t scratch_bytes = 0;
};

// The features path's neighbour stage computes each [64 x 64] tile of the upper triangle once, in
// rounds: a round-robin ("circle method") schedule pairs the `panels` row panels so that every
// unordered pair {a, b}, a != b, meets in exactly one of the rounds 0 .. rerank_rounds() - 1, and no
// panel occurs twice in one round (an odd count adds a dummy panel `panels`: a bye). Slot `slot`
// (0 <= slot < rerank_round_slots()) of round `round` is the pair (*a, *b), *a < *b.
__host__ __device__ inline int64_t rerank_round_slots(int64_t panels) { return (panels + 1) / 2; }
__host__ __device__ inline int64_t rerank_rounds(int64_t panels) {
  return panels > 1 ? panels + (panels & 1) - 1 : 0;
}
__host__ __device__ inline void rerank_panel_pair(int64_t panels, int64_t round, int64_t slot, int64_t* a,
                                                  int64_t* b) {
  const int64_t m = panels + (panels & 1) - 1;  // rotating positions; position m stays fixed
  int64_t u = round, v = m;
  if (slot > 0) {
    u = (round + slot) % m;
    v = (round - slot + m) % m;
  }
  *a = u < v ? u : v;
  *b = u < v ? v : u;
}

// Bytes of p.scratch the stages need (per-block buffers that do not fit in shared memory).
cudaError_t rerank_scratch_bytes(const RerankParams& p, size_t* bytes);

// Stage 1: top-K neighbours, row maxima and the raw query-gallery squared distances into p.out.
// Features path (p.x set): distances computed tile by tile from the features, never stored N x N.
// Dense path: from q_g, q_q, g_g (row i of the original's transposed, column-normalised matrix).
cudaError_t rerank_neighbors(const RerankParams& p, cudaStream_t stream);
// Stage 2: half-size sets, then V row lengths into v_ptr (fill = false; v_ptr becomes the CSR row
// pointer) or V columns and Gaussian weights (fill = true, v_col / v_val allocated).
cudaError_t rerank_sets(const RerankParams& p, bool fill, cudaStream_t stream);
// Stage 3: local query expansion, count (e_ptr) then fill (e_col / e_val). Only for k2 != 1.
cudaError_t rerank_expand(const RerankParams& p, bool fill, cudaStream_t stream);
// Stage 4: inverted index (columns -> gallery rows) of the final rows.
cudaError_t rerank_invert(const RerankParams& p, cudaStream_t stream);
// Stage 5: Jaccard distance through the inverted index, blended into p.out.
cudaError_t rerank_jaccard(const RerankParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace upreid

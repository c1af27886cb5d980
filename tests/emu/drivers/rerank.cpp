// Emulation driver of the k_reciprocal_rerank kernels: the stages of rerank_cuda.cpp's run_stages,
// with the CSR arrays allocated between them from the sizes read back.
#include "rerank/rerank_kernel.cuh"

#include "common.h"

using namespace upreid::cuda;
using upreid_emu_driver::Buffer;

// x != nullptr: features path (x [N, D]); otherwise the dense path (q_g, q_q, g_g). T is float
// (dtype 0) or double (dtype 3). K = min(k1 + 1, N), hk = min(half_k(k1), N), kq = min(k2, N).
namespace {
// The sizes and inputs both entry points share (stage 1's).
RerankParams stage1_params(int dtype, int64_t N, int64_t Q, int64_t D, int64_t K, const void* x,
                           const void* q_g, const void* q_q, const void* g_g, float* out) {
  RerankParams p;
  p.dtype = static_cast<DType>(dtype);
  p.N = N;
  p.Q = Q;
  p.D = D;
  p.K = K;
  p.x = x;
  p.q_g = q_g;
  p.q_q = q_q;
  p.g_g = g_g;
  p.out = out;
  p.fp32_precision = upreid_emu_driver::g_fp32_precision;
  return p;
}
}  // namespace

extern "C" int emu_rerank(int dtype, int64_t N, int64_t Q, int64_t D, int64_t K, int64_t hk, int64_t kq,
                          int64_t k2, double lambda, const void* x, const void* q_g, const void* q_q,
                          const void* g_g, float* out, int64_t* used_scratch) {
  RerankParams p = stage1_params(dtype, N, Q, D, K, x, q_g, q_q, g_g, out);
  p.hk = hk;
  p.kq = kq;
  p.k2 = k2;
  p.lambda = lambda;
  const size_t ts = p.dtype == DType::kF64 ? 8 : 4;
  Buffer sq(x != nullptr ? size_t(N) * ts : 0), nbr(size_t(N * K) * 4), nbr_d2(size_t(N * K) * ts),
      rowmax(size_t(N) * ts);
  p.sq = x != nullptr ? sq.get() : nullptr;
  p.nbr = static_cast<int32_t*>(nbr.get());
  p.nbr_d2 = nbr_d2.get();
  p.rowmax = rowmax.get();
  cudaError_t e = rerank_neighbors(p, nullptr);
  if (e != cudaSuccess) return int(e);

  size_t bytes = 0;
  e = rerank_scratch_bytes(p, &bytes);
  if (e != cudaSuccess) return int(e);
  Buffer scratch(bytes);
  p.scratch = bytes > 0 ? scratch.get() : nullptr;
  p.scratch_bytes = bytes;
  *used_scratch = int64_t(bytes);

  Buffer rh(size_t(N * hk) * 4), rh_len(size_t(N) * 4), v_ptr(size_t(N + 1) * 8, 0);
  p.rh = static_cast<int32_t*>(rh.get());
  p.rh_len = static_cast<int32_t*>(rh_len.get());
  p.v_ptr = static_cast<int64_t*>(v_ptr.get());
  if ((e = rerank_sets(p, false, nullptr)) != cudaSuccess) return int(e);
  const int64_t nnz_v = p.v_ptr[N];
  Buffer v_col(size_t(nnz_v) * 4 + 4), v_val(size_t(nnz_v) * ts + 8);
  p.v_col = static_cast<int32_t*>(v_col.get());
  p.v_val = v_val.get();
  if ((e = rerank_sets(p, true, nullptr)) != cudaSuccess) return int(e);

  int64_t nnz = nnz_v;
  Buffer e_ptr(k2 != 1 ? size_t(N + 1) * 8 : 0, 0), e_col(0), e_val(0);
  if (k2 != 1) {
    p.e_ptr = static_cast<int64_t*>(e_ptr.get());
    if ((e = rerank_expand(p, false, nullptr)) != cudaSuccess) return int(e);
    nnz = p.e_ptr[N];
    e_col = Buffer(size_t(nnz) * 4 + 4);
    e_val = Buffer(size_t(nnz) * ts + 8);
    p.e_col = static_cast<int32_t*>(e_col.get());
    p.e_val = e_val.get();
    if ((e = rerank_expand(p, true, nullptr)) != cudaSuccess) return int(e);
  }
  Buffer i_ptr(size_t(N + 1) * 8, 0), i_fill(size_t(N) * 4, 0), i_col(size_t(nnz) * 4 + 4),
      i_val(size_t(nnz) * ts + 8);
  p.i_ptr = static_cast<int64_t*>(i_ptr.get());
  p.i_fill = static_cast<int32_t*>(i_fill.get());
  p.i_col = static_cast<int32_t*>(i_col.get());
  p.i_val = i_val.get();
  if ((e = rerank_invert(p, nullptr)) != cudaSuccess) return int(e);
  return int(rerank_jaccard(p, nullptr));
}

// Stage 1 alone: the neighbour lists [N, K] (int32 indices, T distances), the row maxima [N] (T) and
// the raw query-gallery squared distances `out` [Q, N - Q].
extern "C" int emu_rerank_neighbors(int dtype, int64_t N, int64_t Q, int64_t D, int64_t K, const void* x,
                                    const void* q_g, const void* q_q, const void* g_g, float* out,
                                    int32_t* nbr, void* nbr_d2, void* rowmax) {
  RerankParams p = stage1_params(dtype, N, Q, D, K, x, q_g, q_q, g_g, out);
  const size_t ts = p.dtype == DType::kF64 ? 8 : 4;
  Buffer sq(x != nullptr ? size_t(N) * ts : 0);
  p.sq = x != nullptr ? sq.get() : nullptr;
  p.nbr = nbr;
  p.nbr_d2 = nbr_d2;
  p.rowmax = rowmax;
  return int(rerank_neighbors(p, nullptr));
}

// The features path's round-robin schedule of `panels` panels: pairs[(r * slots + s) * 2 + {0, 1}]
// for every round r and slot s (a second member >= panels is a bye). Returns the number of rounds.
extern "C" int64_t emu_rerank_schedule(int64_t panels, int64_t* pairs) {
  const int64_t rounds = rerank_rounds(panels), slots = rerank_round_slots(panels);
  for (int64_t r = 0; r < rounds; ++r)
    for (int64_t s = 0; s < slots; ++s)
      rerank_panel_pair(panels, r, s, pairs + (r * slots + s) * 2, pairs + (r * slots + s) * 2 + 1);
  return rounds;
}

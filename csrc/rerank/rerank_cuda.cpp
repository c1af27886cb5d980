// CUDA glue of k_reciprocal_rerank and k_reciprocal_rerank_dense (host compiler, torch): the CPU
// path's argument checks, contiguous inputs in the accumulation dtype, device guard, current
// stream, output and workspace allocation, and the stages of rerank_kernel.cu in order. Between
// stages the size of each CSR is read back (one scalar each) to allocate it exactly.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "rerank/rerank.h"
#include "rerank/rerank_kernel.cuh"

namespace upreid {
namespace {

int64_t last_entry(const at::Tensor& ptr) { return ptr[ptr.size(0) - 1].item<int64_t>(); }

// Runs every stage; p has the sizes, the inputs and the output set.
void run_stages(cuda::RerankParams& p, const at::TensorOptions& opts, const char* op) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(opts.device().index()).stream();
  const int64_t N = p.N;
  const auto tdt = p.dtype == cuda::DType::kF64 ? at::kDouble : at::kFloat;
  const auto i32 = opts.dtype(at::kInt), i64 = opts.dtype(at::kLong), tt = opts.dtype(tdt);

  at::Tensor sq = at::empty({p.x != nullptr ? N : 0}, tt);
  at::Tensor nbr = at::empty({N, p.K}, i32), nbr_d2 = at::empty({N, p.K}, tt);
  at::Tensor rowmax = at::empty({N}, tt);
  p.sq = p.x != nullptr ? sq.data_ptr() : nullptr;
  p.nbr = nbr.data_ptr<int32_t>();
  p.nbr_d2 = nbr_d2.data_ptr();
  p.rowmax = rowmax.data_ptr();
  check_cuda(cuda::rerank_neighbors(p, stream), op, "neighbours");

  size_t bytes = 0;
  check_cuda(cuda::rerank_scratch_bytes(p, &bytes), op, "workspace query");
  at::Tensor scratch = at::empty({static_cast<int64_t>(bytes)}, opts.dtype(at::kByte));
  p.scratch = bytes > 0 ? scratch.data_ptr() : nullptr;
  p.scratch_bytes = bytes;

  at::Tensor rh = at::empty({N, p.hk}, i32), rh_len = at::empty({N}, i32);
  at::Tensor v_ptr = at::zeros({N + 1}, i64);
  p.rh = rh.data_ptr<int32_t>();
  p.rh_len = rh_len.data_ptr<int32_t>();
  p.v_ptr = v_ptr.data_ptr<int64_t>();
  check_cuda(cuda::rerank_sets(p, /*fill=*/false, stream), op, "reciprocal sets (count)");
  const int64_t nnz_v = last_entry(v_ptr);
  at::Tensor v_col = at::empty({nnz_v}, i32), v_val = at::empty({nnz_v}, tt);
  p.v_col = v_col.data_ptr<int32_t>();
  p.v_val = v_val.data_ptr();
  check_cuda(cuda::rerank_sets(p, /*fill=*/true, stream), op, "reciprocal sets (fill)");

  int64_t nnz = nnz_v;
  at::Tensor e_ptr, e_col, e_val;
  if (p.k2 != 1) {
    e_ptr = at::zeros({N + 1}, i64);
    p.e_ptr = e_ptr.data_ptr<int64_t>();
    check_cuda(cuda::rerank_expand(p, /*fill=*/false, stream), op, "query expansion (count)");
    nnz = last_entry(e_ptr);
    e_col = at::empty({nnz}, i32);
    e_val = at::empty({nnz}, tt);
    p.e_col = e_col.data_ptr<int32_t>();
    p.e_val = e_val.data_ptr();
    check_cuda(cuda::rerank_expand(p, /*fill=*/true, stream), op, "query expansion (fill)");
    rh = at::Tensor();  // no longer needed
  }

  // The inverted index holds the gallery rows' entries: at most nnz.
  at::Tensor i_ptr = at::zeros({N + 1}, i64), i_fill = at::zeros({N}, i32);
  at::Tensor i_col = at::empty({nnz}, i32), i_val = at::empty({nnz}, tt);
  p.i_ptr = i_ptr.data_ptr<int64_t>();
  p.i_fill = i_fill.data_ptr<int32_t>();
  p.i_col = i_col.data_ptr<int32_t>();
  p.i_val = i_val.data_ptr();
  check_cuda(cuda::rerank_invert(p, stream), op, "inverted index");
  check_cuda(cuda::rerank_jaccard(p, stream), op, "jaccard");
}

void set_sizes(cuda::RerankParams& p, int64_t N, int64_t Q, int64_t k1, int64_t k2, double lambda) {
  p.N = N;
  p.Q = Q;
  p.K = std::min<int64_t>(k1 + 1, N);
  p.hk = std::min<int64_t>(rerank_half_k(k1), N);
  p.kq = std::min<int64_t>(k2, N);
  p.k2 = k2;
  p.lambda = lambda;
}

}  // namespace

at::Tensor k_reciprocal_rerank_cuda(const at::Tensor& features, int64_t num_query, int64_t k1,
                                    int64_t k2, double lambda_value) {
  constexpr const char* op = "upreid::k_reciprocal_rerank";
  at::NoGradGuard no_grad;
  check_rerank_features_args(features, num_query, k1, k2, lambda_value, op);
  const c10::cuda::CUDAGuard guard(features.device());
  const at::Tensor X = features.to(acc_dtype(features.scalar_type())).contiguous();  // [N, D]
  const int64_t N = X.size(0), Q = num_query;
  at::Tensor out = at::empty({Q, N - Q}, X.options().dtype(at::kFloat));
  cuda::RerankParams p;
  p.dtype = X.scalar_type() == at::kDouble ? cuda::DType::kF64 : cuda::DType::kF32;
  set_sizes(p, N, Q, k1, k2, lambda_value);
  p.D = X.size(1);
  p.x = X.data_ptr();
  // fp32 distances at torch.get_float32_matmul_precision(): "high"/"medium" take the tensor cores
  set_fp32_precision(p, static_cast<int>(fp32_matmul_precision()));
  p.out = out.data_ptr<float>();
  run_stages(p, X.options(), op);
  return out;
}

at::Tensor k_reciprocal_rerank_dense_cuda(const at::Tensor& q_g, const at::Tensor& q_q,
                                          const at::Tensor& g_g, int64_t k1, int64_t k2,
                                          double lambda_value) {
  constexpr const char* op = "upreid::k_reciprocal_rerank_dense";
  at::NoGradGuard no_grad;
  check_rerank_dense_args(q_g, q_q, g_g, k1, k2, lambda_value, op, /*check_finite=*/true);
  const c10::cuda::CUDAGuard guard(q_g.device());
  const auto acc = acc_dtype(q_g.scalar_type());
  const at::Tensor qg = q_g.to(acc).contiguous(), qq = q_q.to(acc).contiguous(),
                   gg = g_g.to(acc).contiguous();
  const int64_t Q = qg.size(0), G = qg.size(1);
  at::Tensor out = at::empty({Q, G}, qg.options().dtype(at::kFloat));
  cuda::RerankParams p;
  p.dtype = acc == at::kDouble ? cuda::DType::kF64 : cuda::DType::kF32;
  set_sizes(p, Q + G, Q, k1, k2, lambda_value);
  p.q_g = qg.data_ptr();
  p.q_q = qq.data_ptr();
  p.g_g = gg.data_ptr();
  p.out = out.data_ptr<float>();
  run_stages(p, qg.options(), op);
  return out;
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CUDA, m) {
  m.impl("k_reciprocal_rerank", &upreid::k_reciprocal_rerank_cuda);
  m.impl("k_reciprocal_rerank_dense", &upreid::k_reciprocal_rerank_dense_cuda);
}

// CUDA glue of rank_metrics (host compiler, torch): the CPU path's argument checks, contiguous
// inputs, device guard, current stream, outputs and workspace, launch of rank_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "rank/rank.h"
#include "rank/rank_kernel.cuh"

namespace upreid {
namespace {

constexpr const char* kOp = "upreid::rank_metrics";

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank_metrics_cuda(
    const at::Tensor& distmat, const at::Tensor& q_pids, const at::Tensor& g_pids,
    const at::Tensor& q_camids, const at::Tensor& g_camids, int64_t max_rank) {
  RankArgs a = check_rank_metrics_args(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, kOp);
  const c10::cuda::CUDAGuard guard(a.distmat.device());
  const int64_t Q = a.distmat.size(0), G = a.distmat.size(1);
  TORCH_CHECK(G < (int64_t(1) << 31), kOp, ": at most 2^31 - 1 gallery items, got ", G);
  const auto f32 = a.distmat.options().dtype(at::kFloat);
  const auto i32 = a.distmat.options().dtype(at::kInt);
  at::Tensor cmc = at::empty({max_rank}, f32), ap = at::empty({Q}, f32), inp = at::empty({Q}, f32);
  at::Tensor valid = at::empty({Q}, a.distmat.options().dtype(at::kBool));
  at::Tensor num_pos = at::empty({Q}, i32), stats = at::zeros({2}, i32);
  at::Tensor first = at::empty({Q}, a.distmat.options().dtype(at::kLong));
  at::Tensor hist = at::zeros({max_rank + 1}, i32);

  cuda::RankParams p;
  p.dist = a.distmat.data_ptr();
  p.dtype = kernel_dtype(a.distmat.scalar_type());
  p.Q = Q;
  p.G = G;
  p.max_rank = max_rank;
  p.q_pids = a.q_pids.data_ptr<int64_t>();
  p.g_pids = a.g_pids.data_ptr<int64_t>();
  p.q_camids = a.q_camids.data_ptr<int64_t>();
  p.g_camids = a.g_camids.data_ptr<int64_t>();
  p.cmc = cmc.data_ptr<float>();
  p.ap = ap.data_ptr<float>();
  p.inp = inp.data_ptr<float>();
  p.valid = valid.data_ptr<bool>();
  p.num_pos = num_pos.data_ptr<int32_t>();
  p.stats = stats.data_ptr<int32_t>();
  p.first = first.data_ptr<int64_t>();
  p.hist = hist.data_ptr<int32_t>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.distmat.device().index()).stream();

  int64_t max_pos = 0;
  if (Q > 0) {
    check_cuda(cuda::rank_count_positives(p, stream), kOp, "kernel launch (count positives)");
    const at::Tensor st = stats.cpu();  // one small copy: sizes pass 2, reports NaN/Inf
    TORCH_CHECK(st[1].item<int32_t>() == 0, kOp,
                ": 'distmat' contains NaN or Inf; every distance must be finite");
    max_pos = st[0].item<int32_t>();
  }
  size_t bytes = 0;
  check_cuda(cuda::rank_scratch_bytes(p, max_pos, &bytes), kOp, "workspace query");
  at::Tensor scratch;
  if (bytes > 0) {
    scratch = at::empty({static_cast<int64_t>(bytes)}, a.distmat.options().dtype(at::kByte));
    p.scratch = scratch.data_ptr();
  }
  check_cuda(cuda::rank_metrics_run(p, max_pos, stream), kOp, "kernel launch");
  return {cmc, ap, inp, valid};
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CUDA, m) {
  m.impl("rank_metrics", &upreid::rank_metrics_cuda);
}

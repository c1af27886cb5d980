// CUDA glue of info_nce (host compiler, torch): the same argument checks as the CPU path, contiguous
// inputs, device guard, current stream, output/workspace allocation, launch of the torch-free kernels
// of info_nce_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "info_nce/info_nce.h"
#include "info_nce/info_nce_kernel.cuh"

namespace upreid {
namespace {

cuda::DType kernel_dtype(at::ScalarType s) {
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

void check_cuda(cudaError_t e, const char* op, const char* what) {
  TORCH_CHECK(e == cudaSuccess, op, ": CUDA ", what, " failed: ", cudaGetErrorString(e));
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

cuda::InfoNceParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                const at::Tensor& b, double temperature, int64_t group_size) {
  cuda::InfoNceParams p;
  p.query = q.data_ptr();
  p.keys = k.data_ptr();
  p.positive = pos.data_ptr<int64_t>();
  p.bank = b.numel() > 0 ? b.data_ptr() : nullptr;
  p.M = q.size(0);
  p.N = k.size(0);
  p.K = b.size(0);
  p.D = q.size(1);
  p.group_size = group_size;
  p.temperature = temperature;
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> info_nce_cuda(const at::Tensor& query, const at::Tensor& keys,
                                                 const at::Tensor& positive,
                                                 const std::optional<at::Tensor>& bank,
                                                 double temperature, int64_t group_size) {
  constexpr const char* op = "upreid::info_nce";
  at::NoGradGuard no_grad;
  at::Tensor b = check_info_nce_args(query, keys, positive, bank, temperature, group_size, op);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), pos = positive.contiguous(),
                   bk = b.contiguous();
  const auto opts = query.options().dtype(acc_dtype(query.scalar_type()));
  const int64_t M = q.size(0);
  at::Tensor loss = at::empty({M}, opts), lse = at::empty({M}, opts);
  if (M == 0) return {loss, lse};

  cuda::InfoNceParams p = base_params(q, k, pos, bk, temperature, group_size);
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  const cuda::DType dt = kernel_dtype(q.scalar_type());
  size_t bytes = 0;
  check_cuda(cuda::info_nce_forward_workspace(p, dt, &bytes), op, "workspace query");
  at::Tensor work = workspace(bytes, q);
  p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
  p.workspace_bytes = bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_cuda(cuda::info_nce_forward(p, dt, stream), op, "kernel launch");
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> info_nce_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const std::optional<at::Tensor>& bank,
    const at::Tensor& lse, double temperature, int64_t group_size) {
  constexpr const char* op = "upreid::_info_nce_backward";
  at::NoGradGuard no_grad;
  at::Tensor b = check_info_nce_args(query, keys, positive, bank, temperature, group_size, op);
  const int64_t M = query.size(0), D = query.size(1);
  check_dim(grad_loss, 1, op, "grad_loss", "[M]");
  check_dim(grad_lse, 1, op, "grad_lse", "[M]");
  check_dim(lse, 1, op, "lse", "[M]");
  check_size(grad_loss, 0, M, "grad_loss", "entries", op);
  check_size(grad_lse, 0, M, "grad_lse", "entries", op);
  check_size(lse, 0, M, "lse", "entries", op);
  check_like(grad_loss, "grad_loss", query, "query", op, /*same_dtype=*/false);
  check_like(grad_lse, "grad_lse", query, "query", op, /*same_dtype=*/false);
  check_like(lse, "lse", query, "query", op, /*same_dtype=*/false);
  if (M == 0 || D == 0) return {at::zeros_like(query), at::zeros_like(keys)};

  const c10::cuda::CUDAGuard guard(query.device());
  const auto acc = acc_dtype(query.scalar_type());
  const auto opts = query.options().dtype(acc);
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), pos = positive.contiguous(),
                   bk = b.contiguous();
  const at::Tensor gl = grad_loss.to(acc).contiguous(), gls = grad_lse.to(acc).contiguous(),
                   lse_c = lse.to(acc).contiguous();
  at::Tensor gq = at::empty({M, D}, opts);
  at::Tensor gk = at::zeros({k.size(0), D}, opts);  // group mode accumulates into it atomically

  cuda::InfoNceParams p = base_params(q, k, pos, bk, temperature, group_size);
  p.grad_loss = gl.data_ptr();
  p.grad_lse = gls.data_ptr();
  p.lse_in = lse_c.data_ptr();
  p.grad_query = gq.data_ptr();
  p.grad_keys = gk.data_ptr();
  const cuda::DType dt = kernel_dtype(q.scalar_type());
  size_t bytes = 0;
  check_cuda(cuda::info_nce_backward_workspace(p, dt, &bytes), op, "workspace query");
  at::Tensor work = workspace(bytes, q);
  p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
  p.workspace_bytes = bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_cuda(cuda::info_nce_backward(p, dt, stream), op, "kernel launch");
  return {gq.to(query.scalar_type()), gk.to(keys.scalar_type())};
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CUDA, m) {
  m.impl("info_nce", &upreid::info_nce_cuda);
  m.impl("_info_nce_backward", &upreid::info_nce_backward_cuda);
}

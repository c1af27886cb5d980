// CUDA glue of info_nce (host compiler, torch): the same argument checks as the CPU path, contiguous
// inputs, device guard, current stream, output/workspace allocation, launch of the torch-free kernels
// of info_nce_kernel.cu. Also the training variant (_info_nce_train: the forward returns bank_mean;
// _info_nce_train_backward: the bank is not visited, its part of grad_query is coef_i bank_mean_i).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_glue.h"
#include "info_nce/info_nce.h"
#include "info_nce/info_nce_kernel.cuh"

namespace upreid {
namespace {

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
  set_fp32_precision(p, static_cast<int>(fp32_matmul_precision()));
  return p;
}

// Forward of info_nce (train = false) and _info_nce_train (train = true: also bank_mean [M, D]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const char* op, bool train, const at::Tensor& query, const at::Tensor& keys,
    const at::Tensor& positive, const std::optional<at::Tensor>& bank, double temperature,
    int64_t group_size) {
  at::NoGradGuard no_grad;
  at::Tensor b = check_info_nce_args(query, keys, positive, bank, temperature, group_size, op);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), pos = positive.contiguous(),
                   bk = b.contiguous();
  const auto opts = query.options().dtype(acc_dtype(query.scalar_type()));
  const int64_t M = q.size(0), D = q.size(1);
  at::Tensor loss = at::empty({M}, opts), lse = at::empty({M}, opts);
  // the kernels write every element of bank_mean (zeros without a bank); D = 0 has none
  at::Tensor bank_mean = train ? at::empty({M, D}, opts) : at::Tensor();
  if (M == 0) return {loss, lse, bank_mean};

  cuda::InfoNceParams p = base_params(q, k, pos, bk, temperature, group_size);
  p.loss = loss.data_ptr();
  p.lse = lse.data_ptr();
  p.bank_mean = train && D > 0 ? bank_mean.data_ptr() : nullptr;
  const cuda::DType dt = kernel_dtype(q.scalar_type());
  size_t bytes = 0;
  check_cuda(train ? cuda::info_nce_train_forward_workspace(p, dt, &bytes)
                   : cuda::info_nce_forward_workspace(p, dt, &bytes),
             op, "workspace query");
  at::Tensor work = workspace(bytes, q);
  p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
  p.workspace_bytes = bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_cuda(train ? cuda::info_nce_train_forward(p, dt, stream) : cuda::info_nce_forward(p, dt, stream),
             op, "kernel launch");
  return {loss, lse, bank_mean};
}

// Backward of info_nce (bank_mean undefined: the bank is visited) and of _info_nce_train (the bank
// part of grad_query comes from bank_mean; `bank` is absent).
std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const std::optional<at::Tensor>& bank,
    const at::Tensor& lse, const at::Tensor& bank_mean, double temperature, int64_t group_size,
    bool need_gq, bool need_gk);

}  // namespace

std::tuple<at::Tensor, at::Tensor> info_nce_cuda(const at::Tensor& query, const at::Tensor& keys,
                                                 const at::Tensor& positive,
                                                 const std::optional<at::Tensor>& bank,
                                                 double temperature, int64_t group_size) {
  auto out = forward_cuda("upreid::info_nce", false, query, keys, positive, bank, temperature,
                          group_size);
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_train_cuda(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positive,
    const std::optional<at::Tensor>& bank, double temperature, int64_t group_size) {
  return forward_cuda("upreid::info_nce", true, query, keys, positive, bank, temperature,
                      group_size);
}

namespace {

// Only the gradients asked for: a kernel that knows need_grad_query/need_grad_keys gets nullptr for
// the skipped output; with an older kernel both are computed and the skipped one is dropped.
std::tuple<at::Tensor, at::Tensor> backward_cuda(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const std::optional<at::Tensor>& bank,
    const at::Tensor& lse, const at::Tensor& bank_mean, double temperature, int64_t group_size,
    bool need_gq, bool need_gk) {
  at::NoGradGuard no_grad;
  at::Tensor b = check_info_nce_args(query, keys, positive, bank, temperature, group_size, op);
  check_info_nce_backward_args(grad_loss, grad_lse, lse, query, op);
  const int64_t M = query.size(0), D = query.size(1), N = keys.size(0);
  if (M == 0 || D == 0 || !(need_gq || need_gk)) {
    return {need_gq ? at::zeros(query.sizes(), query.options()) : skipped_grad(query),
            need_gk ? at::zeros(keys.sizes(), keys.options()) : skipped_grad(keys)};
  }
  const bool all_keys = group_size == 0 || group_size == N;
  if (need_gk && !all_keys) {
    // The group keys' gradient is accumulated with float atomics (nce_bwd_finalize).
    at::globalContext().alertNotDeterministic(
        "upreid::info_nce backward on CUDA (grad_keys with group_size >= 1)");
  }

  const c10::cuda::CUDAGuard guard(query.device());
  const auto acc = acc_dtype(query.scalar_type());
  const auto opts = query.options().dtype(acc);
  const at::Tensor q = query.contiguous(), k = keys.contiguous(), pos = positive.contiguous(),
                   bk = b.contiguous();
  const at::Tensor gl = grad_loss.to(acc).contiguous(), gls = grad_lse.to(acc).contiguous(),
                   lse_c = lse.to(acc).contiguous();
  const at::Tensor bm = bank_mean.defined() ? bank_mean.to(acc).contiguous() : at::Tensor();

  cuda::InfoNceParams p = base_params(q, k, pos, bk, temperature, group_size);
  const bool skip_q = !need_gq && set_need_grad_query(p, false);
  const bool skip_k = !need_gk && set_need_grad_keys(p, false);
  at::Tensor gq = skip_q ? at::Tensor() : at::empty({M, D}, opts);
  at::Tensor gk = skip_k ? at::Tensor() : at::zeros({N, D}, opts);  // group mode: atomics into it
  p.grad_loss = gl.data_ptr();
  p.grad_lse = gls.data_ptr();
  p.lse_in = lse_c.data_ptr();
  p.grad_query = skip_q ? nullptr : gq.data_ptr();
  p.grad_keys = skip_k ? nullptr : gk.data_ptr();
  p.bank_mean_in = bm.defined() ? bm.data_ptr() : nullptr;
  const cuda::DType dt = kernel_dtype(q.scalar_type());
  const bool train = bm.defined();
  size_t bytes = 0;
  check_cuda(train ? cuda::info_nce_train_backward_workspace(p, dt, &bytes)
                   : cuda::info_nce_backward_workspace(p, dt, &bytes),
             op, "workspace query");
  at::Tensor work = workspace(bytes, q);
  p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
  p.workspace_bytes = bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.device().index()).stream();
  check_cuda(train ? cuda::info_nce_train_backward(p, dt, stream) : cuda::info_nce_backward(p, dt, stream),
             op, "kernel launch");
  return {need_gq ? gq.to(query.scalar_type()) : skipped_grad(query),
          need_gk ? gk.to(keys.scalar_type()) : skipped_grad(keys)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> info_nce_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const std::optional<at::Tensor>& bank,
    const at::Tensor& lse, double temperature, int64_t group_size, bool need_grad_query,
    bool need_grad_keys) {
  return backward_cuda("upreid::_info_nce_backward", grad_loss, grad_lse, query, keys, positive,
                       bank, lse, at::Tensor(), temperature, group_size, need_grad_query,
                       need_grad_keys);
}

std::tuple<at::Tensor, at::Tensor> info_nce_train_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const at::Tensor& lse,
    const at::Tensor& bank_mean, double temperature, int64_t group_size, bool need_grad_query,
    bool need_grad_keys) {
  constexpr const char* op = "upreid::_info_nce_train_backward";
  check_bank_mean(bank_mean, query, op);
  return backward_cuda(op, grad_loss, grad_lse, query, keys, positive, std::nullopt, lse, bank_mean,
                       temperature, group_size, need_grad_query, need_grad_keys);
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CUDA, m) {
  m.impl("info_nce", &upreid::info_nce_cuda);
  m.impl("_info_nce_backward", &upreid::info_nce_backward_cuda);
  m.impl("_info_nce_train", &upreid::info_nce_train_cuda);
  m.impl("_info_nce_train_backward", &upreid::info_nce_train_backward_cuda);
}

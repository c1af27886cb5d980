// CUDA glue of bank_kl (host compiler, torch): the same argument checks as the CPU path, contiguous
// inputs, device guard, current stream, output/workspace allocation, launch of the torch-free kernels
// of bank_kl_kernel.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bank_kl/bank_kl.h"
#include "bank_kl/bank_kl_kernel.cuh"
#include "common/checks.h"
#include "common/cuda_glue.h"

namespace upreid {
namespace {

cuda::BankKlParams base_params(const at::Tensor& s, const at::Tensor& t, const at::Tensor& b,
                               double tau_student, double tau_teacher) {
  cuda::BankKlParams p;
  p.student = s.data_ptr();
  p.teacher = t.data_ptr();
  p.bank = b.data_ptr();
  p.M = s.size(0);
  p.K = b.size(0);
  p.D = s.size(1);
  p.tau_student = tau_student;
  p.tau_teacher = tau_teacher;
  set_fp32_precision(p, static_cast<int>(fp32_matmul_precision()));
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bank_kl_cuda(const at::Tensor& student,
                                                            const at::Tensor& teacher,
                                                            const at::Tensor& bank,
                                                            double tau_student, double tau_teacher) {
  constexpr const char* op = "upreid::bank_kl";
  at::NoGradGuard no_grad;
  check_bank_kl_args(student, teacher, bank, tau_student, tau_teacher, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  const int64_t M = student.size(0);
  at::Tensor kl = at::empty({M}, opts), lse_s = at::empty({M}, opts), lse_t = at::empty({M}, opts);
  if (M == 0) return {kl, lse_s, lse_t};
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), b = bank.contiguous();

  cuda::BankKlParams p = base_params(s, t, b, tau_student, tau_teacher);
  p.kl = kl.data_ptr();
  p.lse_student = lse_s.data_ptr();
  p.lse_teacher = lse_t.data_ptr();
  const cuda::DType dt = kernel_dtype(s.scalar_type());
  size_t bytes = 0;
  check_cuda(cuda::bank_kl_forward_workspace(p, dt, &bytes), op, "workspace query");
  at::Tensor work = at::empty({static_cast<int64_t>(bytes)}, s.options().dtype(at::kByte));
  p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
  p.workspace_bytes = bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  check_cuda(cuda::bank_kl_forward(p, dt, stream), op, "kernel launch");
  return {kl, lse_s, lse_t};
}

at::Tensor bank_kl_backward_cuda(const at::Tensor& grad_kl, const at::Tensor& grad_lse_student,
                                 const at::Tensor& student, const at::Tensor& teacher,
                                 const at::Tensor& bank, const at::Tensor& lse_student,
                                 const at::Tensor& lse_teacher, double tau_student,
                                 double tau_teacher) {
  constexpr const char* op = "upreid::_bank_kl_backward";
  at::NoGradGuard no_grad;
  check_bank_kl_args(student, teacher, bank, tau_student, tau_teacher, op);
  check_bank_kl_backward_args(grad_kl, grad_lse_student, lse_student, lse_teacher, student, op);
  const int64_t M = student.size(0), D = student.size(1);
  if (M == 0 || D == 0) return at::zeros(student.sizes(), student.options());  // contiguous, as the fake says

  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), b = bank.contiguous();
  const at::Tensor gk = grad_kl.to(acc).contiguous(), gls = grad_lse_student.to(acc).contiguous(),
                   ls = lse_student.to(acc).contiguous(), lt = lse_teacher.to(acc).contiguous();
  at::Tensor gs = at::empty({M, D}, student.options().dtype(acc));

  cuda::BankKlParams p = base_params(s, t, b, tau_student, tau_teacher);
  p.grad_kl = gk.data_ptr();
  p.grad_lse_student = gls.data_ptr();
  p.lse_student_in = ls.data_ptr();
  p.lse_teacher_in = lt.data_ptr();
  p.grad_student = gs.data_ptr();
  const cuda::DType dt = kernel_dtype(s.scalar_type());
  size_t bytes = 0;
  check_cuda(cuda::bank_kl_backward_workspace(p, dt, &bytes), op, "workspace query");
  at::Tensor work = at::empty({static_cast<int64_t>(bytes)}, s.options().dtype(at::kByte));
  p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
  p.workspace_bytes = bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  check_cuda(cuda::bank_kl_backward(p, dt, stream), op, "kernel launch");
  return gs.to(student.scalar_type());
}

// _bank_kl_train: kl, both logsumexps and the expected bank vectors of both distributions, in one
// pass over the bank (student and teacher rows stacked); the backward is elementwise ATen.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bank_kl_train_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& bank, double tau_student,
    double tau_teacher) {
  constexpr const char* op = "upreid::bank_kl";  // the CPU path's checks and messages
  at::NoGradGuard no_grad;
  check_bank_kl_args(student, teacher, bank, tau_student, tau_teacher, op);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(acc_dtype(student.scalar_type()));
  const int64_t M = student.size(0), D = student.size(1);
  at::Tensor kl = at::empty({M}, opts), lse_s = at::empty({M}, opts), lse_t = at::empty({M}, opts);
  at::Tensor mean_s = at::empty({M, D}, opts), mean_t = at::empty({M, D}, opts);
  if (M == 0) return {kl, lse_s, lse_t, mean_s, mean_t};
  const at::Tensor s = student.contiguous(), t = teacher.contiguous(), b = bank.contiguous();

  cuda::BankKlParams p = base_params(s, t, b, tau_student, tau_teacher);
  p.kl = kl.data_ptr();
  p.lse_student = lse_s.data_ptr();
  p.lse_teacher = lse_t.data_ptr();
  p.mean_student = mean_s.data_ptr();
  p.mean_teacher = mean_t.data_ptr();
  const cuda::DType dt = kernel_dtype(s.scalar_type());
  size_t bytes = 0;
  check_cuda(cuda::bank_kl_train_forward_workspace(p, dt, &bytes), op, "workspace query");
  at::Tensor work = at::empty({static_cast<int64_t>(bytes)}, s.options().dtype(at::kByte));
  p.workspace = bytes > 0 ? work.data_ptr() : nullptr;
  p.workspace_bytes = bytes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(s.device().index()).stream();
  check_cuda(cuda::bank_kl_train_forward(p, dt, stream), op, "kernel launch");
  return {kl, lse_s, lse_t, mean_s, mean_t};
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CUDA, m) {
  m.impl("bank_kl", &upreid::bank_kl_cuda);
  m.impl("_bank_kl_backward", &upreid::bank_kl_backward_cuda);
  m.impl("_bank_kl_train", &upreid::bank_kl_train_cuda);
  // elementwise ATen: the same on every device
  m.impl("_bank_kl_train_backward", &upreid::bank_kl_train_backward);
}

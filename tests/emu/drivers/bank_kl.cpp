// Emulation driver of the bank_kl kernels: what bank_kl_cuda.cpp does around the launchers.
#include "bank_kl/bank_kl_kernel.cuh"

#include "common.h"

using namespace upreid::cuda;

extern "C" int emu_bank_kl(int backward, int dtype, const void* student, const void* teacher,
                           const void* bank, int64_t M, int64_t K, int64_t D, double tau_s, double tau_t,
                           void* kl, void* lse_s, void* lse_t, const void* grad_kl,
                           const void* grad_lse_s, const void* lse_s_in, const void* lse_t_in,
                           void* grad_student) {
  BankKlParams p;
  p.student = student;
  p.teacher = teacher;
  p.bank = bank;
  p.M = M;
  p.K = K;
  p.D = D;
  p.tau_student = tau_s;
  p.tau_teacher = tau_t;
  p.fp32_precision = upreid_emu_driver::g_fp32_precision;
  p.kl = kl;
  p.lse_student = lse_s;
  p.lse_teacher = lse_t;
  p.grad_kl = grad_kl;
  p.grad_lse_student = grad_lse_s;
  p.lse_student_in = lse_s_in;
  p.lse_teacher_in = lse_t_in;
  p.grad_student = grad_student;
  const DType dt = static_cast<DType>(dtype);
  size_t bytes = 0;
  cudaError_t e = backward ? bank_kl_backward_workspace(p, dt, &bytes) : bank_kl_forward_workspace(p, dt, &bytes);
  if (e != cudaSuccess) return int(e);
  upreid_emu_driver::Buffer work(bytes);
  p.workspace = work.get();
  p.workspace_bytes = bytes;
  e = backward ? bank_kl_backward(p, dt, nullptr) : bank_kl_forward(p, dt, nullptr);
  return int(e);
}

// Training forward: kl, lse_s, lse_t [M] and mean_s, mean_t [M, D] (accumulation type).
extern "C" int emu_bank_kl_train(int dtype, const void* student, const void* teacher, const void* bank, int64_t M,
                                 int64_t K, int64_t D, double tau_s, double tau_t, void* kl, void* lse_s,
                                 void* lse_t, void* mean_s, void* mean_t) {
  BankKlParams p;
  p.student = student;
  p.teacher = teacher;
  p.bank = bank;
  p.M = M;
  p.K = K;
  p.D = D;
  p.tau_student = tau_s;
  p.tau_teacher = tau_t;
  p.fp32_precision = upreid_emu_driver::g_fp32_precision;
  p.kl = kl;
  p.lse_student = lse_s;
  p.lse_teacher = lse_t;
  p.mean_student = mean_s;
  p.mean_teacher = mean_t;
  const DType dt = static_cast<DType>(dtype);
  size_t bytes = 0;
  cudaError_t e = bank_kl_train_forward_workspace(p, dt, &bytes);
  if (e != cudaSuccess) return int(e);
  upreid_emu_driver::Buffer work(bytes);
  p.workspace = work.get();
  p.workspace_bytes = bytes;
  return int(bank_kl_train_forward(p, dt, nullptr));
}

// bank_kl: KL(softmax(teacher . bank / tau_t) || softmax(student . bank / tau_s)) per row, fused with
// the two logsumexps. Shared declarations of the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace upreid {

void check_bank_kl_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& bank,
                        double tau_student, double tau_teacher, const char* op);

// grad_kl, grad_lse_student, lse_student, lse_teacher of _bank_kl_backward: [M] on the student's
// device.
void check_bank_kl_backward_args(const at::Tensor& grad_kl, const at::Tensor& grad_lse_student,
                                 const at::Tensor& lse_student, const at::Tensor& lse_teacher,
                                 const at::Tensor& student, const char* op);

// _bank_kl_train_backward: elementwise in ATen, the same on every device.
at::Tensor bank_kl_train_backward(const at::Tensor& grad_kl, const at::Tensor& grad_lse_student,
                                  const at::Tensor& student, const at::Tensor& mean_student,
                                  const at::Tensor& mean_teacher, double tau_student);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bank_kl_cpu(const at::Tensor& student,
                                                           const at::Tensor& teacher,
                                                           const at::Tensor& bank,
                                                           double tau_student, double tau_teacher);

at::Tensor bank_kl_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& grad_lse_student,
                                const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& bank, const at::Tensor& lse_student,
                                const at::Tensor& lse_teacher, double tau_student,
                                double tau_teacher);

}  // namespace upreid

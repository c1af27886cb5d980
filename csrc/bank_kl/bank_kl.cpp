// Schema of bank_kl and its backward, and the argument checks shared by CPU and CUDA.
#include "bank_kl/bank_kl.h"

#include <torch/library.h>

#include "common/checks.h"

namespace upreid {

void check_bank_kl_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& bank,
                        double tau_student, double tau_teacher, const char* op) {
  check_dim(student, 2, op, "student", "[M, D]");
  check_dim(teacher, 2, op, "teacher", "[M, D]");
  check_dim(bank, 2, op, "bank", "[K, D]");
  check_feature_dtype(student, op, "student");
  check_like(teacher, "teacher", student, "student", op);
  check_like(bank, "bank", student, "student", op);
  const int64_t M = student.size(0), D = student.size(1);
  check_size(teacher, 0, M, "teacher", "rows", op);
  check_size(teacher, 1, D, "teacher", "features per row", op);
  check_size(bank, 1, D, "bank", "features per row", op);
  check_positive_finite(tau_student, op, "tau_student");
  check_positive_finite(tau_teacher, op, "tau_teacher");
  if (M > 0) {
    TORCH_CHECK(bank.size(0) > 0, op, ": 'bank' is empty; a distribution over zero rows is undefined");
  }
}

void check_bank_kl_backward_args(const at::Tensor& grad_kl, const at::Tensor& grad_lse_student,
                                 const at::Tensor& lse_student, const at::Tensor& lse_teacher,
                                 const at::Tensor& student, const char* op) {
  const int64_t M = student.size(0);
  check_vector(grad_kl, M, "grad_kl", student, "student", op);
  check_vector(grad_lse_student, M, "grad_lse_student", student, "student", op);
  check_vector(lse_student, M, "lse_student", student, "student", op);
  check_vector(lse_teacher, M, "lse_teacher", student, "student", op);
}

at::Tensor bank_kl_train_backward(const at::Tensor& grad_kl, const at::Tensor& grad_lse_student,
                                  const at::Tensor& student, const at::Tensor& mean_student,
                                  const at::Tensor& mean_teacher, double tau_student) {
  constexpr const char* op = "upreid::_bank_kl_train_backward";
  at::NoGradGuard no_grad;
  check_dim(student, 2, op, "student", "[M, D]");
  check_feature_dtype(student, op, "student");
  check_positive_finite(tau_student, op, "tau_student");
  const int64_t M = student.size(0);
  check_vector(grad_kl, M, "grad_kl", student, "student", op);
  check_vector(grad_lse_student, M, "grad_lse_student", student, "student", op);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&mean_student, "mean_student"},
                                {&mean_teacher, "mean_teacher"}}) {
    check_dim(*t, 2, op, name, "[M, D]");
    TORCH_CHECK(t->sizes() == student.sizes(), op, ": '", name, "' has shape ", shape_str(*t),
                " but 'student' has shape ", shape_str(student));
    check_like(*t, name, student, "student", op, /*same_dtype=*/false);
  }
  const auto acc = acc_dtype(student.scalar_type());
  const at::Tensor gk = grad_kl.to(acc).unsqueeze(1);                      // [M, 1]
  const at::Tensor cr = (grad_kl.to(acc) + grad_lse_student.to(acc)).unsqueeze(1);
  // d/ds = (grad_kl (E_r[b] - E_p[b]) + grad_lse_student E_r[b]) / tau_s
  at::Tensor gs = mean_student.to(acc) * cr - mean_teacher.to(acc) * gk;  // [M, D]
  return gs.mul_(1.0 / tau_student).to(student.scalar_type());
}

}  // namespace upreid

TORCH_LIBRARY_FRAGMENT(upreid, m) {
  m.def(
      "bank_kl(Tensor student, Tensor teacher, Tensor bank, float tau_student, float tau_teacher) "
      "-> (Tensor kl, Tensor lse_student, Tensor lse_teacher)");
  m.def(
      "_bank_kl_backward(Tensor grad_kl, Tensor grad_lse_student, Tensor student, Tensor teacher, "
      "Tensor bank, Tensor lse_student, Tensor lse_teacher, float tau_student, float tau_teacher) "
      "-> Tensor grad_student");
  // Training variant: also returns the expected bank vectors of both distributions,
  // mean_student = sum_k softmax(student . b / tau_s)_k b_k and mean_teacher likewise ([M, D], fp32;
  // fp64 for fp64 inputs), accumulated in the forward's pass, so that the backward is elementwise
  // and never revisits the bank. Used by upreid.ops.bank_kl when the student needs a gradient.
  m.def(
      "_bank_kl_train(Tensor student, Tensor teacher, Tensor bank, float tau_student, "
      "float tau_teacher) -> (Tensor kl, Tensor lse_student, Tensor lse_teacher, "
      "Tensor mean_student, Tensor mean_teacher)");
  m.def(
      "_bank_kl_train_backward(Tensor grad_kl, Tensor grad_lse_student, Tensor student, "
      "Tensor mean_student, Tensor mean_teacher, float tau_student) -> Tensor grad_student");
}

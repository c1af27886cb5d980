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

}  // namespace upreid

TORCH_LIBRARY_FRAGMENT(upreid, m) {
  m.def(
      "bank_kl(Tensor student, Tensor teacher, Tensor bank, float tau_student, float tau_teacher) "
      "-> (Tensor kl, Tensor lse_student, Tensor lse_teacher)");
  m.def(
      "_bank_kl_backward(Tensor grad_kl, Tensor grad_lse_student, Tensor student, Tensor teacher, "
      "Tensor bank, Tensor lse_student, Tensor lse_teacher, float tau_student, float tau_teacher) "
      "-> Tensor grad_student");
}

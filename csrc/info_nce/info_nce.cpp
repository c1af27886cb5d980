// Schema of info_nce and its backward, and the argument checks shared by CPU and CUDA.
#include "info_nce/info_nce.h"

#include <torch/library.h>

#include "common/checks.h"

namespace upreid {

at::Tensor check_info_nce_args(const at::Tensor& query, const at::Tensor& keys,
                               const at::Tensor& positive, const std::optional<at::Tensor>& bank,
                               double temperature, int64_t group_size, const char* op) {
  check_dim(query, 2, op, "query", "[M, D]");
  check_dim(keys, 2, op, "keys", "[N, D]");
  check_dim(positive, 1, op, "positive", "[M]");
  check_feature_dtype(query, op, "query");
  check_like(keys, "keys", query, "query", op);
  check_like(positive, "positive", query, "query", op, /*same_dtype=*/false);
  check_index_dtype(positive, op, "positive");
  const int64_t M = query.size(0), D = query.size(1), N = keys.size(0);
  check_size(keys, 1, D, "keys", "features per row", op);
  check_size(positive, 0, M, "positive", "entries", op);
  check_positive_finite(temperature, op, "temperature");
  TORCH_CHECK(group_size >= 0, op, ": 'group_size' must be >= 0 (0 = all keys), got ", group_size);
  if (group_size > 0) {
    TORCH_CHECK(N % group_size == 0, op, ": the number of keys (", N,
                ") must be divisible by 'group_size' (", group_size, ")");
  }
  if (M > 0) {
    TORCH_CHECK(N > 0, op, ": 'keys' is empty but ", M, " query rows need a positive key");
  }
  check_index_range(positive, N, op, "positive", "keys");
  if (bank.has_value() && bank->defined()) {
    const at::Tensor& b = *bank;
    check_dim(b, 2, op, "bank", "[K, D]");
    check_like(b, "bank", query, "query", op);
    check_size(b, 1, D, "bank", "features per row", op);
    return b;
  }
  return query.new_empty({0, D});
}

void check_info_nce_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                                  const at::Tensor& lse, const at::Tensor& query, const char* op) {
  const int64_t M = query.size(0);
  check_vector(grad_loss, M, "grad_loss", query, "query", op);
  check_vector(grad_lse, M, "grad_lse", query, "query", op);
  check_vector(lse, M, "lse", query, "query", op);
}

void check_bank_mean(const at::Tensor& bank_mean, const at::Tensor& query, const char* op) {
  check_dim(bank_mean, 2, op, "bank_mean", "[M, D]");
  TORCH_CHECK(bank_mean.size(0) == query.size(0) && bank_mean.size(1) == query.size(1), op,
              ": 'bank_mean' has shape ", shape_str(bank_mean), " but 'query' has shape ",
              shape_str(query));
  check_like(bank_mean, "bank_mean", query, "query", op, /*same_dtype=*/false);
}

}  // namespace upreid

TORCH_LIBRARY_FRAGMENT(upreid, m) {
  // The backward ops compute only the gradients asked for (need_grad_*, from ctx.needs_input_grad);
  // a gradient not asked for is returned as an empty [0, D] tensor.
  m.def(
      "info_nce(Tensor query, Tensor keys, Tensor positive, Tensor? bank, float temperature, "
      "int group_size) -> (Tensor loss, Tensor lse)");
  m.def(
      "_info_nce_backward(Tensor grad_loss, Tensor grad_lse, Tensor query, Tensor keys, "
      "Tensor positive, Tensor? bank, Tensor lse, float temperature, int group_size, "
      "bool need_grad_query=True, bool need_grad_keys=True) -> (Tensor grad_query, Tensor grad_keys)");
  // Training variant: also returns bank_mean [M, D] = sum_k softmax_ik bank_k (accumulated in the
  // same pass), so that the backward needs no second pass over the bank: 2 matrix products over
  // the bank in all instead of 3. Used by upreid.ops.info_nce when a gradient is needed.
  m.def(
      "_info_nce_train(Tensor query, Tensor keys, Tensor positive, Tensor? bank, "
      "float temperature, int group_size) -> (Tensor loss, Tensor lse, Tensor bank_mean)");
  m.def(
      "_info_nce_train_backward(Tensor grad_loss, Tensor grad_lse, Tensor query, Tensor keys, "
      "Tensor positive, Tensor lse, Tensor bank_mean, float temperature, int group_size, "
      "bool need_grad_query=True, bool need_grad_keys=True) -> (Tensor grad_query, Tensor grad_keys)");
}

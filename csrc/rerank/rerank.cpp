// Schemas of k_reciprocal_rerank (features path) and k_reciprocal_rerank_dense (compatibility path)
// and the argument checks shared by CPU and CUDA.
#include "rerank/rerank.h"

#include <torch/library.h>

#include <cmath>
#include <limits>

#include "common/checks.h"

namespace upreid {
namespace {

void check_params(int64_t k1, int64_t k2, double lambda_value, const char* op) {
  TORCH_CHECK(k1 >= 1, op, ": 'k1' must be >= 1, got ", k1);
  TORCH_CHECK(k2 >= 1 && k2 <= k1 + 1, op, ": 'k2' must be in [1, k1 + 1] = [1, ", k1 + 1,
              "], got ", k2);
  TORCH_CHECK(std::isfinite(lambda_value) && lambda_value >= 0.0 && lambda_value <= 1.0, op,
              ": 'lambda_value' must be in [0, 1], got ", lambda_value);
}

}  // namespace

void check_rerank_features_args(const at::Tensor& features, int64_t num_query, int64_t k1,
                                int64_t k2, double lambda_value, const char* op) {
  check_dim(features, 2, op, "features", "[N, D] (queries first, then gallery)");
  check_feature_dtype(features, op, "features");
  const int64_t N = features.size(0);
  TORCH_CHECK(num_query > 0 && num_query < N, op, ": 'num_query' must be in (0, N) = (0, ", N,
              ") so that queries and gallery are both non-empty, got ", num_query);
  TORCH_CHECK(N < std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 2 rows, got ", N);
  check_params(k1, k2, lambda_value, op);
  check_all_finite(features, op, "features");
}

void check_rerank_dense_args(const at::Tensor& q_g, const at::Tensor& q_q, const at::Tensor& g_g,
                             int64_t k1, int64_t k2, double lambda_value, const char* op,
                             bool check_finite) {
  check_dim(q_g, 2, op, "q_g", "[Q, G]");
  check_dim(q_q, 2, op, "q_q", "[Q, Q]");
  check_dim(g_g, 2, op, "g_g", "[G, G]");
  check_feature_dtype(q_g, op, "q_g");
  check_like(q_q, "q_q", q_g, "q_g", op);
  check_like(g_g, "g_g", q_g, "q_g", op);
  const int64_t Q = q_g.size(0), G = q_g.size(1);
  TORCH_CHECK(Q > 0, op, ": no queries ('q_g' has shape ", shape_str(q_g), ")");
  TORCH_CHECK(G > 0, op, ": the gallery is empty ('q_g' has shape ", shape_str(q_g), ")");
  check_size(q_q, 0, Q, "q_q", "rows", op);
  check_size(q_q, 1, Q, "q_q", "columns", op);
  check_size(g_g, 0, G, "g_g", "rows", op);
  check_size(g_g, 1, G, "g_g", "columns", op);
  TORCH_CHECK(Q + G < std::numeric_limits<int32_t>::max(), op, ": at most 2^31 - 2 items");
  check_params(k1, k2, lambda_value, op);
  if (check_finite) {
    check_all_finite(q_g, op, "q_g");
    check_all_finite(q_q, op, "q_q");
    check_all_finite(g_g, op, "g_g");
  }
}

}  // namespace upreid

TORCH_LIBRARY_FRAGMENT(upreid, m) {
  // features [N, D], queries first -> final distance [num_query, N - num_query] fp32. Equals the
  // original algorithm fed with the Euclidean distances of the features; never allocates N x N.
  m.def(
      "k_reciprocal_rerank(Tensor features, int num_query, int k1, int k2, float lambda_value) "
      "-> Tensor");
  // The original signature: distances q_g [Q, G], q_q [Q, Q], g_g [G, G] -> [Q, G] fp32.
  m.def(
      "k_reciprocal_rerank_dense(Tensor q_g, Tensor q_q, Tensor g_g, int k1, int k2, "
      "float lambda_value) -> Tensor");
}

// k_reciprocal_rerank: exact k-reciprocal re-ranking (Zhong et al., CVPR 2017), memory-bounded.
// Shared declarations of the CPU and CUDA implementations and the argument checks both run.
#pragma once

#include <ATen/ATen.h>

namespace upreid {

// Validates the features path: features [N, D] floating and finite, 0 < num_query < N, k1 >= 1,
// 1 <= k2 <= k1 + 1, lambda_value in [0, 1].
void check_rerank_features_args(const at::Tensor& features, int64_t num_query, int64_t k1,
                                int64_t k2, double lambda_value, const char* op);

// Validates the dense path: q_g [Q, G], q_q [Q, Q], g_g [G, G], one dtype and device, finite.
// check_finite = false leaves the NaN/Inf check to the implementation (the CPU scan reads every
// element once anyway).
void check_rerank_dense_args(const at::Tensor& q_g, const at::Tensor& q_q, const at::Tensor& g_g,
                             int64_t k1, int64_t k2, double lambda_value, const char* op,
                             bool check_finite = true);

// The half-size neighbourhood of the expansion rule: round(k1 / 2) + 1 with numpy's rounding
// (half to even), as np.around in the original.
inline int64_t rerank_half_k(int64_t k1) {
  const int64_t h = k1 / 2;
  const bool half = (k1 % 2) != 0;  // k1 / 2 = h + 0.5: round to the even one of h, h + 1
  return (half && (h % 2 != 0) ? h + 1 : h) + 1;
}

at::Tensor k_reciprocal_rerank_cpu(const at::Tensor& features, int64_t num_query, int64_t k1,
                                   int64_t k2, double lambda_value);
at::Tensor k_reciprocal_rerank_dense_cpu(const at::Tensor& q_g, const at::Tensor& q_q,
                                         const at::Tensor& g_g, int64_t k1, int64_t k2,
                                         double lambda_value);

}  // namespace upreid

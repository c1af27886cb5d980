// info_nce: fused similarity + logsumexp contrastive loss. Shared declarations of the CPU and CUDA
// implementations and the argument checks both run.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace upreid {

// Validates the forward arguments; returns the bank as a defined tensor ([0, D] when absent).
at::Tensor check_info_nce_args(const at::Tensor& query, const at::Tensor& keys,
                               const at::Tensor& positive, const std::optional<at::Tensor>& bank,
                               double temperature, int64_t group_size, const char* op);

// grad_loss, grad_lse and lse of the backward ops: [M] on the query's device.
void check_info_nce_backward_args(const at::Tensor& grad_loss, const at::Tensor& grad_lse,
                                  const at::Tensor& lse, const at::Tensor& query, const char* op);

// The value of a gradient the backward was not asked for: an empty [0, D] tensor like `t`.
inline at::Tensor skipped_grad(const at::Tensor& t) { return t.new_empty({0, t.size(1)}); }

// bank_mean of _info_nce_train_backward: [M, D] like the query, on its device.
void check_bank_mean(const at::Tensor& bank_mean, const at::Tensor& query, const char* op);

std::tuple<at::Tensor, at::Tensor> info_nce_cpu(const at::Tensor& query, const at::Tensor& keys,
                                                const at::Tensor& positive,
                                                const std::optional<at::Tensor>& bank,
                                                double temperature, int64_t group_size);

std::tuple<at::Tensor, at::Tensor> info_nce_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const std::optional<at::Tensor>& bank,
    const at::Tensor& lse, double temperature, int64_t group_size, bool need_grad_query,
    bool need_grad_keys);

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_train_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positive,
    const std::optional<at::Tensor>& bank, double temperature, int64_t group_size);

std::tuple<at::Tensor, at::Tensor> info_nce_train_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const at::Tensor& lse,
    const at::Tensor& bank_mean, double temperature, int64_t group_size, bool need_grad_query,
    bool need_grad_keys);

}  // namespace upreid

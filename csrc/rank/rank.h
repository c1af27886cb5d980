// rank_metrics: CMC / AP / INP of a query-gallery distance matrix without sorting the gallery.
// Shared declarations of the CPU and CUDA implementations and the argument checks both run.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace upreid {

struct RankArgs {
  at::Tensor distmat, q_pids, g_pids, q_camids, g_camids;  // labels as contiguous int64
};

// Validates the arguments (shapes, dtypes, devices, max_rank >= 1, non-empty gallery).
RankArgs check_rank_metrics_args(const at::Tensor& distmat, const at::Tensor& q_pids,
                                 const at::Tensor& g_pids, const at::Tensor& q_camids,
                                 const at::Tensor& g_camids, int64_t max_rank, const char* op);

// Returns (cmc [max_rank] fp32, ap [Q] fp32, inp [Q] fp32, valid [Q] bool).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank_metrics_cpu(
    const at::Tensor& distmat, const at::Tensor& q_pids, const at::Tensor& g_pids,
    const at::Tensor& q_camids, const at::Tensor& g_camids, int64_t max_rank);

}  // namespace upreid

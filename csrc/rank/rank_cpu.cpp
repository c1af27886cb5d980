// CPU implementation of rank_metrics.
//
// No gallery sort. For query q with P positives (same pid, other camera), the positives are
// gathered through a pid index of the gallery (O(P) per query) and sorted by (distance, index).
// One pass over the gallery then places every valid negative (other pid) among the sorted positives
// by binary search: cnt[t] counts negatives that precede positives t..P-1. The rank of the k-th
// positive is k + sum(cnt[0..k]), from which AP, the first-match rank (CMC) and the hardest-positive
// rank (INP) follow. O(G log P) per query, O(Q + G) memory beyond the distance matrix; queries run in
// parallel. Ties are broken by gallery index, i.e. the order of a stable sort.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "rank/rank.h"

namespace upreid {
namespace {

constexpr const char* kOp = "upreid::rank_metrics";

using Key = std::pair<double, int64_t>;  // (distance, gallery index): the total order of ranks

template <typename scalar_t>
void rank_rows(const scalar_t* dist, const int64_t* qp, const int64_t* qc, const int64_t* gp,
               const int64_t* gc, const std::vector<int64_t>& by_pid, const std::vector<int64_t>& pid_sorted,
               int64_t Q, int64_t G, float* ap, float* inp, bool* valid, int64_t* first,
               std::atomic<bool>& bad) {
  at::parallel_for(0, Q, 16, [&](int64_t q0, int64_t q1) {
    std::vector<Key> pos;
    std::vector<int64_t> cnt;
    for (int64_t q = q0; q < q1; ++q) {
      const scalar_t* row = dist + q * G;
      const int64_t pid = qp[q], cam = qc[q];
      auto range = std::equal_range(pid_sorted.begin(), pid_sorted.end(), pid);
      pos.clear();
      for (auto it = range.first; it != range.second; ++it) {
        const int64_t g = by_pid[it - pid_sorted.begin()];
        if (gc[g] != cam) pos.emplace_back(static_cast<double>(row[g]), g);
      }
      const int64_t P = static_cast<int64_t>(pos.size());
      if (P == 0) {
        for (int64_t g = 0; g < G; ++g) {
          if (!std::isfinite(static_cast<double>(row[g]))) bad = true;
        }
        ap[q] = 0.f;
        inp[q] = 0.f;
        valid[q] = false;
        first[q] = -1;
        continue;
      }
      std::sort(pos.begin(), pos.end());
      cnt.assign(P + 1, 0);
      const Key last = pos.back();
      for (int64_t g = 0; g < G; ++g) {
        const double d = static_cast<double>(row[g]);
        if (!std::isfinite(d)) bad = true;
        if (gp[g] == pid) continue;  // a positive, or removed (same pid and camera)
        const Key key(d, g);
        if (last < key) continue;  // after every positive: changes no rank
        const int64_t t = std::lower_bound(pos.begin(), pos.end(), key) - pos.begin();
        ++cnt[t];
      }
      double ap_sum = 0.0;
      int64_t neg_before = 0, rank = 0;
      for (int64_t k = 0; k < P; ++k) {
        neg_before += cnt[k];
        rank = k + neg_before;  // 0-based rank among the kept gallery items
        if (k == 0) first[q] = rank;
        ap_sum += static_cast<double>(k + 1) / static_cast<double>(rank + 1);
      }
      ap[q] = static_cast<float>(ap_sum / static_cast<double>(P));
      inp[q] = static_cast<float>(static_cast<double>(P) / static_cast<double>(rank + 1));
      valid[q] = true;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rank_metrics_cpu(
    const at::Tensor& distmat, const at::Tensor& q_pids, const at::Tensor& g_pids,
    const at::Tensor& q_camids, const at::Tensor& g_camids, int64_t max_rank) {
  RankArgs a = check_rank_metrics_args(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, kOp);
  const int64_t Q = a.distmat.size(0), G = a.distmat.size(1);
  const auto f32 = a.distmat.options().dtype(at::kFloat);
  at::Tensor ap = at::zeros({Q}, f32), inp = at::zeros({Q}, f32);
  at::Tensor valid = at::zeros({Q}, a.distmat.options().dtype(at::kBool));
  std::vector<int64_t> first(Q, -1);

  // Gallery indices grouped by pid (stable: ascending index inside a pid).
  const int64_t* gp = a.g_pids.data_ptr<int64_t>();
  std::vector<int64_t> by_pid(G);
  std::iota(by_pid.begin(), by_pid.end(), 0);
  std::stable_sort(by_pid.begin(), by_pid.end(), [&](int64_t x, int64_t y) { return gp[x] < gp[y]; });
  std::vector<int64_t> pid_sorted(G);
  for (int64_t k = 0; k < G; ++k) pid_sorted[k] = gp[by_pid[k]];

  std::atomic<bool> bad(false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.distmat.scalar_type(), "rank_metrics", [&] {
    rank_rows<scalar_t>(a.distmat.data_ptr<scalar_t>(), a.q_pids.data_ptr<int64_t>(),
                        a.q_camids.data_ptr<int64_t>(), gp, a.g_camids.data_ptr<int64_t>(), by_pid,
                        pid_sorted, Q, G, ap.data_ptr<float>(), inp.data_ptr<float>(),
                        valid.data_ptr<bool>(), first.data(), bad);
  });
  TORCH_CHECK(!bad.load(), kOp, ": 'distmat' contains NaN or Inf; every distance must be finite");

  // CMC: histogram of first-match ranks, cumulated and divided by the number of valid queries.
  std::vector<double> hist(max_rank, 0.0);
  int64_t num_valid = 0;
  for (int64_t q = 0; q < Q; ++q) {
    if (first[q] < 0) continue;
    ++num_valid;
    if (first[q] < max_rank) hist[first[q]] += 1.0;
  }
  at::Tensor cmc = at::zeros({max_rank}, f32);
  float* c = cmc.data_ptr<float>();
  double acc = 0.0;
  for (int64_t r = 0; r < max_rank; ++r) {
    acc += hist[r];
    c[r] = num_valid > 0 ? static_cast<float>(acc / static_cast<double>(num_valid)) : 0.f;
  }
  return {cmc, ap, inp, valid};
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CPU, m) {
  m.impl("rank_metrics", &upreid::rank_metrics_cpu);
}

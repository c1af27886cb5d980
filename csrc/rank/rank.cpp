// Schema of rank_metrics and the argument checks shared by CPU and CUDA.
#include "rank/rank.h"

#include <torch/library.h>

#include "common/checks.h"

namespace upreid {

RankArgs check_rank_metrics_args(const at::Tensor& distmat, const at::Tensor& q_pids,
                                 const at::Tensor& g_pids, const at::Tensor& q_camids,
                                 const at::Tensor& g_camids, int64_t max_rank, const char* op) {
  check_dim(distmat, 2, op, "distmat", "[Q, G]");
  check_feature_dtype(distmat, op, "distmat");
  const int64_t Q = distmat.size(0), G = distmat.size(1);
  TORCH_CHECK(max_rank >= 1, op, ": 'max_rank' must be >= 1, got ", max_rank);
  TORCH_CHECK(G > 0 || Q == 0, op, ": the gallery is empty ('distmat' has shape ",
              shape_str(distmat), "); at least one gallery item is needed");
  RankArgs a;
  a.q_pids = check_labels(q_pids, Q, op, "q_pids", "distmat rows (queries)");
  a.g_pids = check_labels(g_pids, G, op, "g_pids", "distmat columns (gallery)");
  a.q_camids = check_labels(q_camids, Q, op, "q_camids", "distmat rows (queries)");
  a.g_camids = check_labels(g_camids, G, op, "g_camids", "distmat columns (gallery)");
  check_like(q_pids, "q_pids", distmat, "distmat", op, /*same_dtype=*/false);
  check_like(g_pids, "g_pids", distmat, "distmat", op, /*same_dtype=*/false);
  check_like(q_camids, "q_camids", distmat, "distmat", op, /*same_dtype=*/false);
  check_like(g_camids, "g_camids", distmat, "distmat", op, /*same_dtype=*/false);
  a.distmat = distmat.contiguous();
  return a;
}

}  // namespace upreid

TORCH_LIBRARY_FRAGMENT(upreid, m) {
  // Per query: gallery items with the query's pid and camera are dropped; ranks follow ascending
  // distance, ties broken by gallery index. cmc[r] = fraction of valid queries whose first match
  // has rank <= r; ap = non-interpolated AP; inp = positives / (rank of the hardest positive + 1);
  // valid = the query has at least one positive (invalid queries get ap = inp = 0).
  m.def(
      "rank_metrics(Tensor distmat, Tensor q_pids, Tensor g_pids, Tensor q_camids, "
      "Tensor g_camids, int max_rank) -> (Tensor cmc, Tensor ap, Tensor inp, Tensor valid)");
}

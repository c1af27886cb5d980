// Emulation driver of the rank_metrics kernels: what rank_cuda.cpp does around the launchers
// (zeroed stats and histogram, the read-back of pass 1, scratch sizing, pass 2).
#include "rank/rank_kernel.cuh"

#include <vector>

#include "common.h"

using namespace upreid::cuda;

// Returns a cudaError_t, or -2 when the distances hold NaN/Inf (the glue raises then).
// *used_scratch: bytes of global scratch pass 2 got (0: the positives fit in shared memory).
extern "C" int emu_rank_metrics(int dtype, const void* dist, int64_t Q, int64_t G, int64_t max_rank,
                                const int64_t* q_pids, const int64_t* g_pids, const int64_t* q_camids,
                                const int64_t* g_camids, float* cmc, float* ap, float* inp, bool* valid,
                                int64_t* used_scratch) {
  std::vector<int32_t> num_pos(size_t(Q) + 1), stats(2, 0), hist(size_t(max_rank) + 1, 0);
  std::vector<int64_t> first(size_t(Q) + 1);
  RankParams p;
  p.dist = dist;
  p.dtype = static_cast<DType>(dtype);
  p.Q = Q;
  p.G = G;
  p.max_rank = max_rank;
  p.q_pids = q_pids;
  p.g_pids = g_pids;
  p.q_camids = q_camids;
  p.g_camids = g_camids;
  p.cmc = cmc;
  p.ap = ap;
  p.inp = inp;
  p.valid = valid;
  p.num_pos = num_pos.data();
  p.stats = stats.data();
  p.first = first.data();
  p.hist = hist.data();
  int64_t max_pos = 0;
  if (Q > 0) {
    cudaError_t e = rank_count_positives(p, nullptr);
    if (e != cudaSuccess) return int(e);
    if (stats[1] != 0) return -2;
    max_pos = stats[0];
  }
  size_t bytes = 0;
  cudaError_t e = rank_scratch_bytes(p, max_pos, &bytes);
  if (e != cudaSuccess) return int(e);
  upreid_emu_driver::Buffer scratch(bytes);
  p.scratch = bytes > 0 ? scratch.get() : nullptr;
  *used_scratch = int64_t(bytes);
  return int(rank_metrics_run(p, max_pos, nullptr));
}

// CPU implementation of rank_metrics.
//
// No gallery sort. For query q with P positives (same pid, other camera), the positives are
// gathered through a pid index of the gallery (O(P) per query) and sorted by (distance, index).
// The rank of the k-th positive is k + before[k], before[k] = the valid negatives (other pid) that
// precede it, from which AP, the first-match rank (CMC) and the hardest-positive rank (INP) follow.
// Ties are broken by gallery index, i.e. the order of a stable sort.
//   Few positives (P <= kCountMax, fp32/fp16/bf16): before[k] is counted directly, P vectorised
//   passes over the query's row (in L1-sized blocks), the row first rewritten with +inf at the
//   non-negatives. The tie rule costs no compare: a negative g ties-and-precedes positive k only if
//   g < index_k, so the count is (d <= d_k) over g < index_k and (d < d_k) after it. The passes are
//   compiled for AVX-512, AVX2 and the baseline, picked at run time (target_clones).
//   Many positives, or fp64: one pass places every valid negative among the sorted positives by a
//   branch-free binary search (O(G log P)); cnt[t] counts negatives that precede positives t..P-1.
// O(Q + G) memory beyond the distance matrix; queries run in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "rank/rank.h"

namespace upreid {
namespace {

constexpr const char* kOp = "upreid::rank_metrics";

// Rank order: ascending distance, ties by ascending gallery index. For fp32/fp16/bf16 distances the
// pair is packed into one uint64 (order-preserving bits of the float, then the index), so each
// comparison is one integer compare; fp64 distances keep the (double, index) pair.
inline uint64_t float_key(float f, int64_t g) {
  f += 0.0f;  // -0 -> +0: equal distances must tie
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint64_t>(g);
}

inline float key_dist(uint64_t key) {
  uint32_t u = static_cast<uint32_t>(key >> 32);
  u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename scalar_t>
struct KeyOf {
  using type = uint64_t;
  static type make(scalar_t d, int64_t g) { return float_key(static_cast<float>(d), g); }
  static float dist(type k) { return key_dist(k); }
  static int64_t index(type k) { return static_cast<int64_t>(k & 0xffffffffu); }
};
template <>
struct KeyOf<double> {
  using type = std::pair<double, int64_t>;
  static type make(double d, int64_t g) { return {d, g}; }
  static double dist(const type& k) { return k.first; }
  static int64_t index(const type& k) { return k.second; }
};

constexpr int64_t kCountMax = 64;

// Number of sorted keys < key (lower_bound), branch-free.
template <typename K>
inline int64_t count_less(const K* keys, int64_t P, const K& key) {
  const K* base = keys;
  int64_t n = P;
  while (n > 1) {
    const int64_t half = n / 2;
    base = base[half] < key ? base + half : base;
    n -= half;
  }
  return (*base < key ? 1 : 0) + (base - keys);
}

}  // namespace

// Outside the anonymous namespace: target_clones needs external linkage (hidden by -fvisibility).
namespace detail {

// dm[g] = d[g] where g_id[g] != id (a valid negative) and +inf elsewhere; returns whether every d[g]
// is finite (bit test, so that the loop vectorises).
__attribute__((target_clones("avx512f", "avx2", "default")))
bool mask_negatives(const float* d, const int32_t* g_id, int32_t id, int32_t G, float* dm) {
  const float inf = std::numeric_limits<float>::infinity();
  uint32_t nonfinite = 0;
  for (int32_t g = 0; g < G; ++g) {
    uint32_t u;
    std::memcpy(&u, d + g, sizeof(u));
    nonfinite |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
    dm[g] = g_id[g] != id ? d[g] : inf;
  }
  return nonfinite == 0;
}

// before[k] = #{g : dm[g] < pd[k], or dm[g] == pd[k] and g < pi[k]} for the P sorted positives.
__attribute__((target_clones("avx512f", "avx2", "default")))
void count_before(const float* dm, int32_t G, const float* pd, const int32_t* pi, int32_t P,
                  int64_t* before) {
  constexpr int32_t kBlock = 2048;  // 8 KB of the row stays in L1 across the P passes
  for (int32_t k = 0; k < P; ++k) before[k] = 0;
  for (int32_t g0 = 0; g0 < G; g0 += kBlock) {
    const int32_t g1 = std::min(G, g0 + kBlock);
    for (int32_t k = 0; k < P; ++k) {
      const float dk = pd[k];
      const int32_t split = std::clamp(pi[k], g0, g1);
      int32_t c = 0;
      for (int32_t g = g0; g < split; ++g) c += dm[g] <= dk;
      for (int32_t g = split; g < g1; ++g) c += dm[g] < dk;
      before[k] += c;
    }
  }
}

}  // namespace detail

namespace {

template <typename scalar_t>
void rank_rows(const scalar_t* dist, const int64_t* qc, const int64_t* gc, const int32_t* q_id,
               const int32_t* g_id, const std::vector<int64_t>& by_id,
               const std::vector<int64_t>& id_start, int64_t Q, int64_t G, float* ap, float* inp,
               bool* valid, int64_t* first, std::atomic<bool>& bad) {
  using Key = typename KeyOf<scalar_t>::type;
  at::parallel_for(0, Q, 16, [&](int64_t q0, int64_t q1) {
    std::vector<Key> pos;
    std::vector<int64_t> cnt, before;
    std::vector<float> dm(G);  // the row, +inf at the non-negatives
    float pd[kCountMax];
    int32_t pi[kCountMax];
    for (int64_t q = q0; q < q1; ++q) {
      const scalar_t* row = dist + q * G;
      const int32_t id = q_id[q];
      const int64_t cam = qc[q];
      pos.clear();
      if (id >= 0) {  // -1: the query's pid is absent from the gallery
        for (int64_t k = id_start[id]; k < id_start[id + 1]; ++k) {
          const int64_t g = by_id[k];
          if (gc[g] != cam) pos.push_back(KeyOf<scalar_t>::make(row[g], g));
        }
      }
      const int64_t P = static_cast<int64_t>(pos.size());
      bool finite = true;
      if (P == 0) {
        for (int64_t g = 0; g < G; ++g) finite &= std::isfinite(static_cast<double>(row[g]));
        if (!finite) bad = true;
        ap[q] = 0.f;
        inp[q] = 0.f;
        valid[q] = false;
        first[q] = -1;
        continue;
      }
      std::sort(pos.begin(), pos.end());
      before.assign(P, 0);
      if (P <= kCountMax && !std::is_same<scalar_t, double>::value) {
        const float* drow = nullptr;
        if constexpr (std::is_same<scalar_t, float>::value) {
          drow = row;
        } else {
          for (int64_t g = 0; g < G; ++g) dm[g] = static_cast<float>(row[g]);
          drow = dm.data();
        }
        finite = detail::mask_negatives(drow, g_id, id, static_cast<int32_t>(G), dm.data());
        for (int64_t k = 0; k < P; ++k) {
          pd[k] = static_cast<float>(KeyOf<scalar_t>::dist(pos[k]));
          pi[k] = static_cast<int32_t>(KeyOf<scalar_t>::index(pos[k]));
        }
        detail::count_before(dm.data(), static_cast<int32_t>(G), pd, pi, static_cast<int32_t>(P),
                             before.data());
      } else {
        cnt.assign(P + 1, 0);
        const Key last = pos.back();
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t d = row[g];
          finite &= std::isfinite(static_cast<double>(d));
          if (g_id[g] == id) continue;  // a positive, or removed (same pid and camera)
          const Key key = KeyOf<scalar_t>::make(d, g);
          if (last < key) continue;  // after every positive: changes no rank
          ++cnt[count_less(pos.data(), P, key)];
        }
        int64_t acc = 0;
        for (int64_t k = 0; k < P; ++k) before[k] = acc += cnt[k];
      }
      if (!finite) bad = true;
      double ap_sum = 0.0;
      int64_t rank = 0;
      for (int64_t k = 0; k < P; ++k) {
        rank = k + before[k];  // 0-based rank among the kept gallery items
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

  // Dense ids: gallery pids -> 0..U-1 (int32), gallery indices grouped by id (ascending index
  // inside an id), query pids -> their gallery id or -1.
  const int64_t* gp = a.g_pids.data_ptr<int64_t>();
  const int64_t* qp = a.q_pids.data_ptr<int64_t>();
  std::vector<int64_t> by_id(G);
  std::iota(by_id.begin(), by_id.end(), 0);
  std::stable_sort(by_id.begin(), by_id.end(), [&](int64_t x, int64_t y) { return gp[x] < gp[y]; });
  std::vector<int32_t> g_id(G), q_id(Q);
  std::vector<int64_t> id_pid, id_start;
  for (int64_t k = 0; k < G; ++k) {
    const int64_t pid = gp[by_id[k]];
    if (id_pid.empty() || id_pid.back() != pid) {
      id_pid.push_back(pid);
      id_start.push_back(k);
    }
    g_id[by_id[k]] = static_cast<int32_t>(id_pid.size() - 1);
  }
  id_start.push_back(G);
  for (int64_t q = 0; q < Q; ++q) {
    auto it = std::lower_bound(id_pid.begin(), id_pid.end(), qp[q]);
    q_id[q] = (it != id_pid.end() && *it == qp[q]) ? static_cast<int32_t>(it - id_pid.begin()) : -1;
  }

  std::atomic<bool> bad(false);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.distmat.scalar_type(), "rank_metrics", [&] {
    rank_rows<scalar_t>(a.distmat.data_ptr<scalar_t>(), a.q_camids.data_ptr<int64_t>(),
                        a.g_camids.data_ptr<int64_t>(), q_id.data(), g_id.data(), by_id, id_start,
                        Q, G, ap.data_ptr<float>(), inp.data_ptr<float>(),
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

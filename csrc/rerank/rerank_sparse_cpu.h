// The sparse stages of k-reciprocal re-ranking on CPU, shared by the features and dense paths.
//
// Input: every row's k1 + 1 nearest neighbours in the order (squared distance, index), its row
// maximum of the squared distance (the original's normaliser), a function giving the squared
// distance of any pair, and the [Q, G] output already holding the raw query-gallery squared
// distances. Stages (each parallel over rows, each a CSR of N rows, nothing N x N):
//   1. half-size reciprocal sets of every row (the expansion candidates' sets);
//   2. V: k-reciprocal set, expansion by the 2/3 rule, Gaussian weights exp(-d / rowmax) / sum;
//   3. local query expansion: mean of V over the k2 nearest rows (skipped for k2 == 1, as the
//      original does);
//   4. inverted index: V transposed, gallery rows only (only gallery columns are output);
//   5. per query: Jaccard through the inverted index, blended with the normalised distance.
// Floating-point work follows the original's order where it decides the result (accumulation over
// ascending column for the Jaccard sums, row by row for the query-expansion mean).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace upreid {
namespace rerank_cpu {

template <typename T>
struct Neighbors {
  int64_t N = 0, K = 0;
  std::vector<int32_t> idx;  // [N, K] ascending (d2, index); K = min(k1 + 1, N)
  std::vector<T> d2;         // [N, K] the squared distances of idx
  std::vector<T> rowmax;     // [N] max over all columns of the squared distance
};

template <typename T>
struct Csr {
  std::vector<int64_t> ptr;  // [rows + 1]
  std::vector<int32_t> col;
  std::vector<T> val;
};

// Builds a CSR of n rows in parallel chunks; fn(i, scratch, cols, vals) appends row i.
template <typename T, class MakeScratch, class RowFn>
Csr<T> build_rows(int64_t n, const MakeScratch& make_scratch, const RowFn& fn) {
  constexpr int64_t kChunk = 256;
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<std::vector<int32_t>> cols(nchunks);
  std::vector<std::vector<T>> vals(nchunks);
  std::vector<int64_t> len(n);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    auto scratch = make_scratch();
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
        const size_t before = cols[c].size();
        fn(i, scratch, cols[c], vals[c]);
        len[i] = static_cast<int64_t>(cols[c].size() - before);
      }
    }
  });
  Csr<T> out;
  out.ptr.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) out.ptr[i + 1] = out.ptr[i] + len[i];
  out.col.resize(out.ptr[n]);
  out.val.resize(out.ptr[n]);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t at = out.ptr[c * kChunk];
    std::copy(cols[c].begin(), cols[c].end(), out.col.begin() + at);
    std::copy(vals[c].begin(), vals[c].end(), out.val.begin() + at);
    std::vector<int32_t>().swap(cols[c]);
    std::vector<T>().swap(vals[c]);
  }
  return out;
}

inline bool in_prefix(const int32_t* list, int64_t len, int32_t x) {
  for (int64_t t = 0; t < len; ++t) {
    if (list[t] == x) return true;
  }
  return false;
}

struct NoScratch {};

// dist2(i, j): squared distance of any pair (used for expansion members outside i's neighbours).
// symmetric: dist2(i, j) == dist2(j, i) (features path), so a pair missing from i's neighbour list
// may be read from j's; the dense path's q_q / g_g need not be symmetric and must not.
// out: [Q, G] fp32 holding the raw squared query-gallery distances; overwritten with the result.
template <typename T, class Dist2>
void rerank_sparse(const Neighbors<T>& nb, const Dist2& dist2, bool symmetric, int64_t Q,
                   int64_t k1, int64_t k2, double lambda_value, int64_t half_k, float* out) {
  const int64_t N = nb.N, K = nb.K, G = N - Q;
  const int64_t hk = std::min<int64_t>(half_k, N);
  const int32_t* nbr = nb.idx.data();
  auto rownorm = [&](int64_t i) { return nb.rowmax[i] > T(0) ? nb.rowmax[i] : T(1); };

  // 1. Half-size k-reciprocal sets: j in top-hk(c) with c in top-hk(j).
  std::vector<int32_t> rh(N * hk), rh_len(N);
  at::parallel_for(0, N, 256, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int32_t n = 0;
      for (int64_t t = 0; t < hk; ++t) {
        const int32_t j = nbr[c * K + t];
        if (in_prefix(nbr + int64_t(j) * K, hk, static_cast<int32_t>(c))) rh[c * hk + n++] = j;
      }
      rh_len[c] = n;
    }
  });

  // 2. V rows: expanded k-reciprocal sets with normalised Gaussian weights.
  auto lookup = [&](int64_t i, int32_t j) -> T {
    for (int64_t t = 0; t < K; ++t) {
      if (nbr[i * K + t] == j) return nb.d2[i * K + t];
    }
    if (symmetric) {  // reuse j's value when it has one
      for (int64_t t = 0; t < K; ++t) {
        if (nbr[int64_t(j) * K + t] == i) return nb.d2[int64_t(j) * K + t];
      }
    }
    return dist2(i, j);
  };
  Csr<T> V = build_rows<T>(
      N, [] { return std::vector<int32_t>(); },
      [&](int64_t i, std::vector<int32_t>& R, std::vector<int32_t>& cols, std::vector<T>& vals) {
        R.clear();
        for (int64_t t = 0; t < K; ++t) {
          const int32_t j = nbr[i * K + t];
          if (in_prefix(nbr + int64_t(j) * K, K, static_cast<int32_t>(i))) R.push_back(j);
        }
        const size_t base = cols.size();
        cols.insert(cols.end(), R.begin(), R.end());
        for (const int32_t c : R) {
          const int32_t* rc = rh.data() + int64_t(c) * hk;
          const int32_t n = rh_len[c];
          int32_t common = 0;
          for (int32_t t = 0; t < n; ++t) common += in_prefix(R.data(), R.size(), rc[t]) ? 1 : 0;
          // The original's test, in double as Python evaluates it: len(common) > 2./3 * len(set).
          if (static_cast<double>(common) > 2.0 / 3.0 * static_cast<double>(n)) {
            cols.insert(cols.end(), rc, rc + n);
          }
        }
        std::sort(cols.begin() + base, cols.end());
        cols.erase(std::unique(cols.begin() + base, cols.end()), cols.end());
        const T norm = rownorm(i);
        T sum = T(0);
        for (size_t e = base; e < cols.size(); ++e) {
          const T w = std::exp(-(lookup(i, cols[e]) / norm));
          vals.push_back(w);
          sum += w;
        }
        for (size_t e = base; e < cols.size(); ++e) vals[e] = vals[e] / sum;
      });

  // 3. Local query expansion: V_qe[i] = mean of V over the k2 nearest rows of i.
  if (k2 != 1) {
    const int64_t kq = std::min<int64_t>(k2, N);
    struct Dense {
      std::vector<T> acc;
      std::vector<char> seen;
      std::vector<int32_t> touched;
    };
    V = build_rows<T>(
        N, [&] { return Dense{std::vector<T>(N, T(0)), std::vector<char>(N, 0), {}}; },
        [&](int64_t i, Dense& s, std::vector<int32_t>& cols, std::vector<T>& vals) {
          s.touched.clear();
          for (int64_t t = 0; t < kq; ++t) {
            const int32_t r = nbr[i * K + t];
            for (int64_t e = V.ptr[r]; e < V.ptr[r + 1]; ++e) {
              const int32_t k = V.col[e];
              if (!s.seen[k]) {
                s.seen[k] = 1;
                s.acc[k] = T(0);
                s.touched.push_back(k);
              }
              s.acc[k] += V.val[e];
            }
          }
          std::sort(s.touched.begin(), s.touched.end());
          for (const int32_t k : s.touched) {
            cols.push_back(k);
            vals.push_back(s.acc[k] / static_cast<T>(kq));
            s.seen[k] = 0;
          }
        });
  }

  // 4. Inverted index over the gallery rows: for column k, the gallery rows j with V[j, k] != 0,
  // ascending j.
  Csr<T> inv;
  inv.ptr.assign(N + 1, 0);
  for (int64_t e = V.ptr[Q]; e < V.ptr[N]; ++e) ++inv.ptr[V.col[e] + 1];
  for (int64_t k = 0; k < N; ++k) inv.ptr[k + 1] += inv.ptr[k];
  inv.col.resize(inv.ptr[N]);
  inv.val.resize(inv.ptr[N]);
  {
    std::vector<int64_t> fill(inv.ptr.begin(), inv.ptr.end() - 1);
    for (int64_t j = Q; j < N; ++j) {
      for (int64_t e = V.ptr[j]; e < V.ptr[j + 1]; ++e) {
        const int64_t at = fill[V.col[e]]++;
        inv.col[at] = static_cast<int32_t>(j - Q);
        inv.val[at] = V.val[e];
      }
    }
  }

  // 5. Jaccard distance and the blend, one query row at a time.
  const T lam = static_cast<T>(lambda_value), one_minus_lam = static_cast<T>(1.0 - lambda_value);
  at::parallel_for(0, Q, 8, [&](int64_t q0, int64_t q1) {
    std::vector<T> tmin(G, T(0));
    for (int64_t i = q0; i < q1; ++i) {
      for (int64_t e = V.ptr[i]; e < V.ptr[i + 1]; ++e) {
        const int32_t k = V.col[e];
        const T vi = V.val[e];
        for (int64_t f = inv.ptr[k]; f < inv.ptr[k + 1]; ++f) {
          tmin[inv.col[f]] += std::min(vi, inv.val[f]);
        }
      }
      const T norm = rownorm(i);
      float* o = out + i * G;
      for (int64_t g = 0; g < G; ++g) {
        const T t = tmin[g];
        const T jaccard = T(1) - t / (T(2) - t);
        const T original = static_cast<T>(o[g]) / norm;
        o[g] = static_cast<float>(jaccard * one_minus_lam + original * lam);
        tmin[g] = T(0);
      }
    }
  });
}

}  // namespace rerank_cpu
}  // namespace upreid

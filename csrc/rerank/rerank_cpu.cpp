// CPU implementation of k_reciprocal_rerank (features) and k_reciprocal_rerank_dense.
//
// Features path: the squared Euclidean distance d2(i, j) = |x_i|^2 + |x_j|^2 - 2 x_i.x_j (clamped at
// 0, exactly 0 on the diagonal, exactly symmetric) is computed in tiles of an upper-triangular
// grid (one GEMM per tile, half of the N x N products); each pair i < j feeds both rows' top-(k1+1)
// lists and row maxima, kept per thread and merged afterwards, and the query-gallery entries go
// straight into the [Q, G] output. Nothing N x N is ever allocated: the largest temporary is one
// [1024, 4096] tile.
// Dense path: row i of the original's transposed, column-normalised matrix is column i of the
// block matrix [[q_q, q_g], [q_g^T, g_g]]; columns are read in blocks of 64 (no transposed copy).
// Neighbour order: ascending squared distance, ties by ascending index (a stable sort).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>

#include "common/checks.h"
#include "rerank/rerank.h"
#include "rerank/rerank_sparse_cpu.h"

namespace upreid {
namespace {

using rerank_cpu::Neighbors;

template <typename T>
inline bool before(T v, int32_t j, T w, int32_t k) {
  return v < w || (v == w && j < k);
}

// The K best (d2, index) candidates of every row, ascending.
template <typename T>
struct TopK {
  int64_t K;
  std::vector<T> val, rmax;
  std::vector<int32_t> idx, cnt;
  TopK(int64_t N, int64_t K) : K(K), val(N * K), rmax(N, T(0)), idx(N * K), cnt(N, 0) {}

  inline void push(int64_t r, T v, int32_t j) {
    T* vr = val.data() + r * K;
    int32_t* ir = idx.data() + r * K;
    int64_t c = cnt[r];
    if (c == K) {
      if (!before(v, j, vr[K - 1], ir[K - 1])) return;
      c = K - 1;
    } else {
      cnt[r] = static_cast<int32_t>(c + 1);
    }
    while (c > 0 && before(v, j, vr[c - 1], ir[c - 1])) {
      vr[c] = vr[c - 1];
      ir[c] = ir[c - 1];
      --c;
    }
    vr[c] = v;
    ir[c] = j;
  }
};

template <typename T>
T dot(const T* a, const T* b, int64_t D) {
  T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int u = 0; u < 8; ++u) acc[u] += a[d + u] * b[d + u];
  }
  T s = T(0);
  for (int u = 0; u < 8; ++u) s += acc[u];
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
Neighbors<T> neighbors_from_features(const at::Tensor& X, const std::vector<T>& sq, int64_t K,
                                     int64_t Q, float* out) {
  const int64_t N = X.size(0), G = N - Q;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Upper-triangular grid of [kRows, kCols] tiles. Each tile is one GEMM run by BLAS with all
  // threads (on small machines two concurrent single-threaded GEMMs reach far less than one
  // threaded GEMM), then scanned in parallel over its rows into per-thread candidate lists.
  constexpr int64_t kRows = 1024, kCols = 4096;
  std::vector<std::unique_ptr<TopK<T>>> part(threads);
  const at::ThreadLocalState caller_state;
  for (int64_t i0 = 0; i0 < N; i0 += kRows) {
    const int64_t i1 = std::min(N, i0 + kRows);
    for (int64_t j0 = i0; j0 < N; j0 += kCols) {
      const int64_t j1 = std::min(N, j0 + kCols), bj = j1 - j0;
      at::Tensor prod = at::mm(X.slice(0, i0, i1), X.slice(0, j0, j1).t()).contiguous();  // [bi, bj]
      const T* p = prod.data_ptr<T>();
      at::parallel_for(i0, i1, 16, [&](int64_t r0, int64_t r1) {
        at::ThreadLocalStateGuard guard(caller_state);
        const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
        if (!part[tid]) part[tid] = std::make_unique<TopK<T>>(N, K);
        TopK<T>& tk = *part[tid];
        for (int64_t i = r0; i < r1; ++i) {
          const T* prow = p + (i - i0) * bj;
          const int64_t js = std::max(j0, i + 1);  // pairs i < j only: symmetric by construction
          if (j0 == i0) tk.push(i, T(0), static_cast<int32_t>(i));  // self: distance exactly 0
          T imax = tk.rmax[i];
          const T sqi = sq[i];
          for (int64_t j = js; j < j1; ++j) {
            T d = sqi + sq[j] - T(2) * prow[j - j0];
            d = d > T(0) ? d : T(0);  // rounding can push a tiny distance below zero
            imax = std::max(imax, d);
            tk.rmax[j] = std::max(tk.rmax[j], d);
            tk.push(i, d, static_cast<int32_t>(j));
            tk.push(j, d, static_cast<int32_t>(i));
          }
          tk.rmax[i] = imax;
          if (i < Q && j1 > Q) {  // query-gallery entries go straight to the output
            for (int64_t j = std::max(js, Q); j < j1; ++j) {
              const T d = sqi + sq[j] - T(2) * prow[j - j0];
              out[i * G + (j - Q)] = static_cast<float>(d > T(0) ? d : T(0));
            }
          }
        }
      });
    }
  }
  // Merge the per-thread lists: the union of per-thread top-K holds the global top-K.
  Neighbors<T> nb_out;
  nb_out.N = N;
  nb_out.K = K;
  nb_out.idx.resize(N * K);
  nb_out.d2.resize(N * K);
  nb_out.rowmax.assign(N, T(0));
  at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
    std::vector<std::pair<T, int32_t>> cand;
    for (int64_t r = r0; r < r1; ++r) {
      cand.clear();
      for (const auto& pt : part) {
        if (!pt) continue;
        for (int32_t c = 0; c < pt->cnt[r]; ++c) cand.emplace_back(pt->val[r * K + c], pt->idx[r * K + c]);
        nb_out.rowmax[r] = std::max(nb_out.rowmax[r], pt->rmax[r]);
      }
      std::sort(cand.begin(), cand.end());
      TORCH_INTERNAL_ASSERT(static_cast<int64_t>(cand.size()) >= K);
      for (int64_t c = 0; c < K; ++c) {
        nb_out.d2[r * K + c] = cand[c].first;
        nb_out.idx[r * K + c] = cand[c].second;
      }
    }
  });
  return nb_out;
}

template <typename T>
at::Tensor rerank_features(const at::Tensor& X, int64_t Q, int64_t k1, int64_t k2, double lambda) {
  const int64_t N = X.size(0), D = X.size(1), G = N - Q;
  const int64_t K = std::min<int64_t>(k1 + 1, N);
  at::Tensor out = at::empty({Q, G}, X.options().dtype(at::kFloat));
  const T* x = X.data_ptr<T>();
  std::vector<T> sq(N);
  at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) sq[r] = dot(x + r * D, x + r * D, D);
  });
  Neighbors<T> nb = neighbors_from_features<T>(X, sq, K, Q, out.data_ptr<float>());
  auto dist2 = [&](int64_t i, int64_t j) -> T {
    if (i == j) return T(0);
    const T d = sq[i] + sq[j] - T(2) * dot(x + i * D, x + j * D, D);
    return d > T(0) ? d : T(0);
  };
  rerank_cpu::rerank_sparse<T>(nb, dist2, /*symmetric=*/true, Q, k1, k2, lambda, rerank_half_k(k1),
                               out.data_ptr<float>());
  return out;
}

template <typename T>
at::Tensor rerank_dense(const at::Tensor& q_g, const at::Tensor& q_q, const at::Tensor& g_g,
                        int64_t k1, int64_t k2, double lambda) {
  const int64_t Q = q_g.size(0), G = q_g.size(1), N = Q + G;
  const int64_t K = std::min<int64_t>(k1 + 1, N);
  // Row i of B = A^T, A = [[q_q, q_g], [q_g^T, g_g]]:
  //   query i:    B[i, j] = q_q[j, i] (j < Q),  B[i, Q + g] = q_g[i, g];
  //   gallery gi: B[Q + gi, q] = q_g[q, gi],    B[Q + gi, Q + g] = g_g[g, gi].
  // Column reads go in blocks of kBlk rows of B, so every read of the inputs is a contiguous run
  // and no transposed copy is made. Every input element is read once: finiteness is checked here.
  const T *pqg = q_g.data_ptr<T>(), *pqq = q_q.data_ptr<T>(), *pgg = g_g.data_ptr<T>();
  auto dist2 = [&](int64_t i, int64_t j) -> T {
    T v;
    if (i < Q) v = j < Q ? pqq[j * Q + i] : pqg[i * G + (j - Q)];
    else v = j < Q ? pqg[j * G + (i - Q)] : pgg[(j - Q) * G + (i - Q)];
    return v * v;
  };
  at::Tensor out = at::empty({Q, G}, q_g.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  Neighbors<T> nb;
  nb.N = N;
  nb.K = K;
  nb.idx.resize(N * K);
  nb.d2.resize(N * K);
  nb.rowmax.assign(N, T(0));
  constexpr int64_t kBlk = 64;
  const int64_t qblocks = (Q + kBlk - 1) / kBlk, gblocks = (G + kBlk - 1) / kBlk;
  // which of the three inputs held a NaN or Inf (bit 0: q_g, 1: q_q, 2: g_g), to name it
  std::atomic<int> nonfinite(0);
  at::parallel_for(0, qblocks + gblocks, 1, [&](int64_t b0, int64_t b1) {
    TopK<T> tk(kBlk, K);
    bool ok[3] = {true, true, true};
    for (int64_t b = b0; b < b1; ++b) {
      const bool query = b < qblocks;
      const int64_t r0 = query ? b * kBlk : Q + (b - qblocks) * kBlk;
      const int64_t r1 = std::min(query ? Q : N, r0 + kBlk), nr = r1 - r0;
      std::fill(tk.cnt.begin(), tk.cnt.end(), 0);
      std::fill(tk.rmax.begin(), tk.rmax.end(), T(0));
      auto column_block = [&](const T* src, int64_t rows, int64_t ld, int64_t c0, int64_t j_off, int which) {
        // src[j * ld + c0 + r] is B[r0 + r, j_off + j] for r < nr, j < rows.
        bool& fine = ok[which];
        for (int64_t j = 0; j < rows; ++j) {
          const T* v = src + j * ld + c0;
          for (int64_t r = 0; r < nr; ++r) {
            fine &= std::isfinite(v[r]);
            const T d = v[r] * v[r];
            tk.rmax[r] = std::max(tk.rmax[r], d);
            tk.push(r, d, static_cast<int32_t>(j_off + j));
          }
        }
      };
      if (query) {
        column_block(pqq, Q, Q, r0, 0, 1);
        for (int64_t r = 0; r < nr; ++r) {
          const T* v = pqg + (r0 + r) * G;
          float* orow = o + (r0 + r) * G;
          for (int64_t g = 0; g < G; ++g) {
            ok[0] &= std::isfinite(v[g]);
            const T d = v[g] * v[g];
            tk.rmax[r] = std::max(tk.rmax[r], d);
            tk.push(r, d, static_cast<int32_t>(Q + g));
            orow[g] = static_cast<float>(d);
          }
        }
      } else {
        column_block(pqg, Q, G, r0 - Q, 0, 0);
        column_block(pgg, G, G, r0 - Q, Q, 2);
      }
      for (int64_t r = 0; r < nr; ++r) {
        nb.rowmax[r0 + r] = tk.rmax[r];
        std::copy(tk.idx.begin() + r * K, tk.idx.begin() + (r + 1) * K, nb.idx.begin() + (r0 + r) * K);
        std::copy(tk.val.begin() + r * K, tk.val.begin() + (r + 1) * K, nb.d2.begin() + (r0 + r) * K);
      }
    }
    nonfinite.fetch_or((ok[0] ? 0 : 1) | (ok[1] ? 0 : 2) | (ok[2] ? 0 : 4));
  });
  const int bad = nonfinite.load();
  TORCH_CHECK(bad == 0, "upreid::k_reciprocal_rerank_dense: '", (bad & 1) ? "q_g" : (bad & 2) ? "q_q" : "g_g",
              "' contains NaN or Inf; every distance must be finite");
  rerank_cpu::rerank_sparse<T>(nb, dist2, /*symmetric=*/false, Q, k1, k2, lambda, rerank_half_k(k1), o);
  return out;
}

}  // namespace

at::Tensor k_reciprocal_rerank_cpu(const at::Tensor& features, int64_t num_query, int64_t k1,
                                   int64_t k2, double lambda_value) {
  check_rerank_features_args(features, num_query, k1, k2, lambda_value, "upreid::k_reciprocal_rerank");
  at::Tensor X = features.to(acc_dtype(features.scalar_type())).contiguous();  // [N, D]
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "k_reciprocal_rerank", [&] {
    out = rerank_features<scalar_t>(X, num_query, k1, k2, lambda_value);
  });
  return out;
}

at::Tensor k_reciprocal_rerank_dense_cpu(const at::Tensor& q_g, const at::Tensor& q_q,
                                         const at::Tensor& g_g, int64_t k1, int64_t k2,
                                         double lambda_value) {
  check_rerank_dense_args(q_g, q_q, g_g, k1, k2, lambda_value, "upreid::k_reciprocal_rerank_dense",
                          /*check_finite=*/false);  // checked during the scan
  const auto acc = acc_dtype(q_g.scalar_type());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(acc, "k_reciprocal_rerank_dense", [&] {
    out = rerank_dense<scalar_t>(q_g.to(acc).contiguous(), q_q.to(acc).contiguous(),
                                 g_g.to(acc).contiguous(), k1, k2, lambda_value);
  });
  return out;
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CPU, m) {
  m.impl("k_reciprocal_rerank", &upreid::k_reciprocal_rerank_cpu);
  m.impl("k_reciprocal_rerank_dense", &upreid::k_reciprocal_rerank_dense_cpu);
}

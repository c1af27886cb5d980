// CPU tiling helpers shared by the fused operators: row blocks run in parallel (one block per task,
// at::parallel_for), and inside a block the columns (keys, bank rows) are visited in tiles small
// enough that a [rows x cols] logits tile stays in the core's L2 cache. Nothing of size
// [M x (N + K)] is ever allocated.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <limits>

namespace upreid {

// Logit elements per tile: 2^18 fp32 = 1 MiB.
constexpr int64_t kCpuTileElems = int64_t(1) << 18;

struct CpuBlocking {
  int64_t rows;  // query rows per parallel task
  int64_t cols;  // key/bank rows per logits tile
};

inline CpuBlocking cpu_blocking(int64_t M) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per_thread = (M + threads - 1) / threads;
  const int64_t rows = std::min<int64_t>(256, std::max<int64_t>(16, per_thread));
  const int64_t cols = std::max<int64_t>(128, kCpuTileElems / rows);
  return {rows, cols};
}

// fn(r0, r1) for every block of `rows` rows in [0, M), blocks spread over the intra-op threads.
template <class F>
void parallel_row_blocks(int64_t M, int64_t rows, const F& fn) {
  const int64_t nblocks = (M + rows - 1) / rows;
  // Worker threads start with default thread-local state (grad mode on, autograd dispatch keys
  // included); carry the caller's so ATen calls inside behave as they do on the calling thread.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t b = b0; b < b1; ++b) {
      fn(b * rows, std::min(M, (b + 1) * rows));
    }
  });
}

// fn(tile, c0, c1) for consecutive row tiles [c0, c1) of `mat` ([R, D]), converted to `acc`.
template <class F>
void for_each_tile(const at::Tensor& mat, int64_t tile, at::ScalarType acc, const F& fn) {
  const int64_t R = mat.size(0);
  for (int64_t c0 = 0; c0 < R; c0 += tile) {
    const int64_t c1 = std::min(R, c0 + tile);
    fn(mat.slice(0, c0, c1).to(acc), c0, c1);
  }
}

// Running logsumexp over tiles of logits: m is the running row max, s the sum of exp(x - m).
struct OnlineLse {
  at::Tensor m, s;
  OnlineLse(int64_t rows, const at::TensorOptions& opts)
      : m(at::full({rows}, -std::numeric_limits<double>::infinity(), opts)),
        s(at::zeros({rows}, opts)) {}

  at::Tensor scale;  // exp(m_old - m_new) of the last fold: rescales any running weighted sum

  // Folds logits [rows, T]; `logits` is overwritten (exp(x - m_new)) and returned.
  at::Tensor& fold(at::Tensor& logits) {
    if (logits.size(1) == 0) {
      scale = at::ones_like(s);
      return logits;
    }
    at::Tensor m_new = at::maximum(m, std::get<0>(logits.max(1)));
    scale = (m - m_new).exp_();
    s.mul_(scale);
    logits.sub_(m_new.unsqueeze(1)).exp_();
    s.add_(logits.sum(1));
    m = m_new;
    return logits;
  }

  at::Tensor value() const { return m + s.log(); }
};

}  // namespace upreid

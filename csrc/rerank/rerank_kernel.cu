// k_reciprocal_rerank CUDA kernels (exact; semantics of rerank_cpu.cpp / rerank_sparse_cpu.h).
//
// Stage 1, neighbours. Every row's top-K list (sorted by (d2, index)) lives in global memory, starts
//   full of sentinels and is fed by warps of whichever block owns the row's panel of 64 rows; a
//   ballot against the row's K-th entry filters 32 candidates, survivors are inserted one at a time
//   by the warp. Nothing N x N exists; the distances are consumed tile by tile.
//   features: each [64 x 64] tile of the upper triangle is computed once (a register-tiled SIMT GEMM
//   over D, each thread a 4 x 4 micro-tile, explicit FMAs in ascending feature order) and feeds both
//   panels' lists: its rows and, read transposed, its columns. Launches: the diagonal tiles, then
//   the rounds of a round-robin schedule in which no panel appears twice (rerank_panel_pair), so
//   two blocks never feed one list at once. d2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j clamped at 0,
//   exactly 0 on the diagonal, computed once per pair: symmetric by construction.
//   dense: one block per panel over all column tiles of B = A^T, A = [[q_q, q_g], [q_g^T, g_g]],
//   squared, read with coalesced loads (B need not be symmetric).
//   Both also give the row maxima and write the raw query-gallery values into the output.
// Stage 2, sets (one block per row, grid-stride): the k-reciprocal set R, the candidates' half-size
//   sets (precomputed per row by a thread-per-row kernel) added by the 2/3 rule, sorted and made
//   unique in a block (bitonic sort in shared memory, or a per-block global slice when large), then
//   Gaussian weights exp(-d2 / rowmax), the distance looked up in row i's list, then row j's list,
//   else recomputed from the features by a warp (dense path: read from the inputs), normalised by
//   their sum taken sequentially in ascending column order (the CPU's order). A counting pass, a
//   scan and a filling pass give a compact CSR.
// Stage 3, local query expansion (block per row): the k2 nearest rows' entries gathered as keys
//   (column, position), sorted, and every column's values summed in neighbour order (the CPU's
//   order), divided by k2.
// Stage 4, inverted index of the gallery rows: counts by atomics, scan, fill by atomics. The order
//   inside a column does not matter: every gallery item occurs at most once per column.
// Stage 5, Jaccard (block per query): tmin[g] (shared memory when G fits, else a per-block global
//   slice) accumulates min(V[q, k], V[g, k]) column by column in ascending k with a barrier between
//   columns, so every sum runs in the CPU's order, then the blend is written to the [Q, G] output.
// Every step is deterministic (integer atomics only where order cannot matter).
#include "rerank/rerank_kernel.cuh"

#include <algorithm>
#include <climits>
#include <type_traits>

#include "common/cuda_tiles.cuh"  // DeviceInfo, UPREID_TC_UNAVAILABLE, WMMA (through the policies)

namespace upreid {
namespace cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

template <class T>
__device__ __forceinline__ T fma_t(T a, T b, T c);
template <>
__device__ __forceinline__ float fma_t<float>(float a, float b, float c) { return __fmaf_rn(a, b, c); }
template <>
__device__ __forceinline__ double fma_t<double>(double a, double b, double c) { return __fma_rn(a, b, c); }
// Products the CPU rounds separately: no contraction into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// d2(i, j) = |x_i|^2 + |x_j|^2 - 2 x_i.x_j from the dot product, clamped at 0 (rounding can push a
// tiny distance below zero); every path that forms a distance from features goes through it.
template <class T>
__device__ __forceinline__ T sq_distance(T dot, T sq_i, T sq_j) {
  const T d = fma_t(T(-2), dot, sq_i + sq_j);
  return d > T(0) ? d : T(0);
}

template <class T>
__device__ __forceinline__ bool before(T v, int j, T w, int k) {
  return v < w || (v == w && j < k);
}

int64_t next_pow2(int64_t n) {
  int64_t c = 1;
  while (c < n) c <<= 1;
  return c;
}

// on the device (n can be 0: one padding slot)
__device__ __forceinline__ int64_t next_pow2_dev(int64_t n) {
  int64_t c = 1;
  while (c < n) c <<= 1;
  return c;
}

using Dev = DeviceInfo;

// The device's SM count and shared memory (cuda_tiles.cuh's query; its defaults where it fails).
Dev device() {
  Dev d;
  if (device_info(&d) != cudaSuccess) d = Dev{};
  d.sms = std::max(d.sms, 1);
  return d;
}

// ---------------------------------------------------------------------------------------------
// block helpers (all threads of the block must call them, with uniform arguments)

// Exclusive prefix of a per-thread flag over the block; *total = number of set flags.
__device__ __forceinline__ int block_flag_scan(bool f, int* red, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  const unsigned b = __ballot_sync(kFull, f);
  const int pre = __popc(b & ((1u << lane) - 1u));
  if (lane == 0) red[warp] = __popc(b);
  __syncthreads();
  int off = 0, tot = 0;
  for (int w = 0; w < nw; ++w) {
    const int c = red[w];
    off += w < warp ? c : 0;
    tot += c;
  }
  __syncthreads();  // `red` is reused by the next call
  *total = tot;
  return off + pre;
}

// Ascending bitonic sort of a[0, n), n a power of two; shared or global memory (the barriers order
// both). The caller synchronises before; this ends with a barrier.
template <class K>
__device__ void block_bitonic(K* a, int64_t n) {
  for (int64_t k = 2; k <= n; k <<= 1) {
    for (int64_t j = k >> 1; j > 0; j >>= 1) {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const int64_t l = i ^ j;
        if (l > i) {
          const K x = a[i], y = a[l];
          if ((y < x) == ((i & k) == 0)) {
            a[i] = y;
            a[l] = x;
          }
        }
      }
      __syncthreads();
    }
  }
}

// In-place inclusive scan of ptr[1, n] (int64), ptr[0] = 0: one block of 1024 threads, each a
// contiguous chunk.
__global__ void __launch_bounds__(1024) scan_kernel(int64_t* ptr, int64_t n) {
  __shared__ long long part[1024];
  const int64_t per = (n + blockDim.x - 1) / blockDim.x;
  const int64_t b = 1 + threadIdx.x * per, e = min(n + 1, b + per);
  long long s = 0;
  for (int64_t i = b; i < e; ++i) s += ptr[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int o = 1; o < int(blockDim.x); o <<= 1) {
    const long long v = threadIdx.x >= unsigned(o) ? part[threadIdx.x - o] : 0;
    __syncthreads();
    part[threadIdx.x] += v;
    __syncthreads();
  }
  long long run = threadIdx.x > 0 ? part[threadIdx.x - 1] : 0;
  for (int64_t i = b; i < e; ++i) {
    run += ptr[i];
    ptr[i] = run;
  }
}

cudaError_t launch_scan(int64_t* ptr, int64_t n, cudaStream_t stream) {
  launch(scan_kernel, 1, 1024, 0, stream, ptr, n);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// distances

// B[i, j] of the dense path (row i of the transposed input block matrix), not squared.
template <class T>
__device__ __forceinline__ T dense_at(const RerankParams& p, int64_t i, int64_t j) {
  const int64_t Q = p.Q, G = p.N - p.Q;
  const T* qg = static_cast<const T*>(p.q_g);
  if (i < Q) return j < Q ? static_cast<const T*>(p.q_q)[j * Q + i] : qg[i * G + (j - Q)];
  return j < Q ? qg[j * G + (i - Q)] : static_cast<const T*>(p.g_g)[(j - Q) * G + (i - Q)];
}

template <class T>
__global__ void sq_norm_kernel(RerankParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  const T* x = static_cast<const T*>(p.x);
  for (int64_t r = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < p.N; r += warps) {
    const T s = warp_dot<T, T>(x + r * p.D, x + r * p.D, p.D, lane);
    if (lane == 0) static_cast<T*>(p.sq)[r] = s;
  }
}

constexpr int kNbThreads = 256, kNbM = 64, kNbN = 64, kNbK = 16;
static_assert(kNbM == kNbN, "the features path pairs square panels");

// Per-row state of the rows a block feeds: up to two panels of kNbM rows (slots [0, kNbM) and
// [kNbM, 2 kNbM)). The lists themselves live in global memory (p.nbr / p.nbr_d2), which only the
// block that owns a panel touches while it runs.
template <class T>
struct NbSmem {
  union {
    struct {
      T A[kNbK][kNbM + 4];  // A[k][m] = x[i0 + m][k0 + k]
      T B[kNbK][kNbN + 4];
    } g;
    T D[kNbM][kNbN + 1];  // the distance tile (squared); odd stride: row and column reads conflict-free
  } u;
  T thr_d[2 * kNbM], rmax[2 * kNbM];
  int thr_j[2 * kNbM], cnt[2 * kNbM];
};

// The tensor-core variant (fp32 at matmul precision "high"/"medium"): the feature chunks staged as
// bf16 hi and lo planes for WMMA, the tile of dot products stored by WMMA (row stride a multiple of
// 4 floats), then turned into distances in place.
constexpr int kTcK = 32, kTcLdx = kTcK + 8, kTcLdd = kNbN + 4;
struct NbTcSmem {
  union {
    struct {
      __nv_bfloat16 A[2][kNbM][kTcLdx];  // [plane: hi, lo][row m][feature k]: x[i0 + m][k0 + k]
      __nv_bfloat16 B[2][kNbN][kTcLdx];
    } g;
    float D[kNbM][kTcLdd];
  } u;
  float thr_d[2 * kNbM], rmax[2 * kNbM];
  int thr_j[2 * kNbM], cnt[2 * kNbM];
};

// Inserts (cd, cj) into row i's sorted list (warp-cooperative; every lane calls with the same
// candidate). The list has `cnt[r]` entries, at most K. S: NbSmem<T> or NbTcSmem.
template <class T, class S>
__device__ __forceinline__ void insert(S& s, int r, int* li, T* ld, int K, T cd, int cj, int lane) {
  const int n = s.cnt[r];
  if (n == K && !before(cd, cj, s.thr_d[r], s.thr_j[r])) return;
  int pos = 0;
  for (int base = 0; base < n; base += 32) {
    const int t = base + lane;
    const bool lt = t < n && before(ld[t], li[t], cd, cj);
    pos += __popc(__ballot_sync(kFull, lt));
  }
  // The reads above happen before any lane writes the list below (a ballot orders no memory; without
  // this, lane 0's store at `pos` could race a read of that slot when nothing moves).
  __syncwarp();
  const int last = min(n, K - 1) - 1;  // entries pos..last move one place down
  for (int base = last; base >= pos; base -= 32) {
    const int t = base - lane;
    const bool mv = t >= pos;
    T vd = T(0);
    int vi = 0;
    if (mv) {
      vd = ld[t];
      vi = li[t];
    }
    __syncwarp();
    if (mv) {
      ld[t + 1] = vd;
      li[t + 1] = vi;
    }
    __syncwarp();
  }
  if (lane == 0) {
    ld[pos] = cd;
    li[pos] = cj;
  }
  __syncwarp();
  const int m = min(n + 1, K);
  if (lane == 0) {
    s.cnt[r] = m;
    if (m == K) {
      s.thr_d[r] = ld[K - 1];
      s.thr_j[r] = li[K - 1];
    }
  }
  __syncwarp();
}

// Every list starts full of sentinels (+inf, INT_MAX), after every real candidate in the order, so
// a list is always K long: its K-th entry is the admission threshold, and a block can pick a row up
// where an earlier launch left it. Row maxima start at 0 (distances are >= 0).
template <class T>
__global__ void nb_init_kernel(RerankParams p) {
  T* nd2 = static_cast<T*>(p.nbr_d2);
  T* rowmax = static_cast<T*>(p.rowmax);
  const int64_t n = p.N * p.K, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    p.nbr[e] = INT_MAX;
    nd2[e] = static_cast<T>(INFINITY);
    if (e < p.N) rowmax[e] = T(0);
  }
}

// Loads the state of panel rows i0 .. i0 + kNbM - 1 into slots slot0 ... (the caller synchronises).
template <class T, class S>
__device__ __forceinline__ void load_row_states(const RerankParams& p, S& s, int slot0, int64_t i0) {
  const int64_t K = p.K;
  for (int t = threadIdx.x; t < kNbM; t += blockDim.x) {
    const int64_t i = i0 + t;
    if (i >= p.N) break;
    s.cnt[slot0 + t] = int(K);
    s.thr_d[slot0 + t] = static_cast<const T*>(p.nbr_d2)[i * K + K - 1];
    s.thr_j[slot0 + t] = p.nbr[i * K + K - 1];
    s.rmax[slot0 + t] = static_cast<const T*>(p.rowmax)[i];
  }
}

template <class T, class S>
__device__ __forceinline__ void store_rowmax(const RerankParams& p, const S& s, int slot0, int64_t i0) {
  for (int t = threadIdx.x; t < kNbM; t += blockDim.x) {
    if (i0 + t >= p.N) break;
    static_cast<T*>(p.rowmax)[i0 + t] = s.rmax[slot0 + t];
  }
}

// Feeds the distance tile to the lists of the kNbM rows i0.. (kCols = false: tile rows; true: tile
// columns, i.e. the tile read transposed) against the kNbN items j0..; state in slots slot0... Warp w
// owns rows w, w + 8, ...: row maxima, the raw query-gallery values into the output (i < Q <= j),
// and the row's list: a ballot against the K-th entry filters 32 candidates, survivors are inserted
// one at a time by the warp.
template <class T, bool kCols, class S>
__device__ void scan_tile(const RerankParams& p, S& s, int slot0, int64_t i0, int64_t j0) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t N = p.N, Q = p.Q, G = p.N - p.Q;
  const int K = int(p.K);
  T* nd2 = static_cast<T*>(p.nbr_d2);
  for (int rr = 0; rr < kNbM / 8; ++rr) {
    const int r = warp + 8 * rr, slot = slot0 + r;
    const int64_t i = i0 + r;
    if (i >= N) break;  // warp-uniform; rows grow with rr
    int* li = p.nbr + i * K;
    T* ld = nd2 + i * K;
    for (int half = 0; half < kNbN; half += 32) {
      const int c = half + lane;
      const int64_t j = j0 + c;
      const bool inb = j < N;
      const T d = inb ? (kCols ? s.u.D[c][r] : s.u.D[r][c]) : T(0);
      const T m = warp_max(d);
      if (lane == 0) s.rmax[slot] = s.rmax[slot] > m ? s.rmax[slot] : m;
      if (inb && i < Q && j >= Q) p.out[i * G + (j - Q)] = static_cast<float>(d);
      const int jj = int(j);
      unsigned mask = __ballot_sync(
          kFull, inb && (s.cnt[slot] < K || before(d, jj, s.thr_d[slot], s.thr_j[slot])));
      while (mask) {
        const int src = __ffs(mask) - 1;
        mask &= mask - 1;
        const T cd = __shfl_sync(kFull, d, src);
        const int cj = __shfl_sync(kFull, jj, src);
        insert(s, slot, li, ld, K, cd, cj, lane);
      }
    }
  }
}

// Features path: one block per pair of panels (a, b), a <= b, per launch. The [64 x 64] tile of dot
// products of panel a's rows with panel b's is a register-tiled SIMT GEMM over D (each thread a
// 4 x 4 micro-tile, explicit FMAs in ascending feature order); d2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j
// clamped at 0, exactly 0 on the diagonal. The tile feeds panel a's lists (its rows) and, when
// a < b, panel b's lists (its columns): every pair i < j is computed once, as on the CPU.
// round < 0: the diagonal launch (block b: pair (b, b)); otherwise round `round` of
// rerank_panel_pair's schedule, in which every panel belongs to at most one block, so no two blocks
// of a launch touch one list; launches on one stream run in order.
// The [64 x 64] tile of dot products x_i.x_j (i in panel rows i0.., j in panel rows j0..) on the
// CUDA cores: each thread a 4 x 4 micro-tile, explicit FMAs in ascending feature order; the squared
// distances go into s.u.D. Ends with a barrier.
template <class T>
__device__ __forceinline__ void simt_distance_tile(const RerankParams& p, NbSmem<T>& s, int64_t i0, int64_t j0) {
  const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const int64_t N = p.N, D = p.D;
  const T* x = static_cast<const T*>(p.x);
  const T* sq = static_cast<const T*>(p.sq);
  T acc[4][4];
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int v = 0; v < 4; ++v) acc[u][v] = T(0);
  for (int64_t k0 = 0; k0 < D; k0 += kNbK) {
    for (int e = tid; e < kNbM * kNbK; e += kNbThreads) {
      const int m = e / kNbK, kk = e % kNbK;
      const int64_t k = k0 + kk, i = i0 + m, j = j0 + m;
      s.u.g.A[kk][m] = (i < N && k < D) ? x[i * D + k] : T(0);
      s.u.g.B[kk][m] = (j < N && k < D) ? x[j * D + k] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kNbK; ++kk) {
      T av[4], bv[4];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        av[u] = s.u.g.A[kk][ty + 16 * u];
        bv[u] = s.u.g.B[kk][tx + 16 * u];
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[u][v] = fma_t(av[u], bv[v], acc[u][v]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int u = 0; u < 4; ++u) {
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int r = ty + 16 * u, c = tx + 16 * v;
      const int64_t i = i0 + r, j = j0 + c;
      s.u.D[r][c] = i < N && j < N && i != j ? sq_distance(acc[u][v], sq[i], sq[j]) : T(0);
    }
  }
  __syncthreads();
}

// The same tile on the tensor cores, fp32 split-bf16: x = hi + lo (hi = bf16(x), lo = bf16(x - hi)),
// x_i.x_j ~ hi.hi + hi.lo + lo.hi, three WMMA products in fp32 accumulation (lo.lo, ~2^-16 relative,
// dropped). Warp w owns the 16 x 32 strip at rows 16 (w / 2), columns 32 (w % 2): two fragments.
__device__ __forceinline__ void tc_distance_tile(const RerankParams& p, NbTcSmem& s, int64_t i0, int64_t j0) {
#if !UPREID_TC_UNAVAILABLE
  namespace wmma = nvcuda::wmma;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t N = p.N, D = p.D;
  const float* x = static_cast<const float*>(p.x);
  const float* sq = static_cast<const float*>(p.sq);
  const int fr = 16 * (warp >> 1), fc = 32 * (warp & 1);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int64_t k0 = 0; k0 < D; k0 += kTcK) {
    for (int e = tid; e < kNbM * kTcK; e += kNbThreads) {
      const int m = e / kTcK, kk = e % kTcK;
      const int64_t k = k0 + kk, i = i0 + m, j = j0 + m;
      const float a = (i < N && k < D) ? x[i * D + k] : 0.f;
      const float b = (j < N && k < D) ? x[j * D + k] : 0.f;
      const __nv_bfloat16 ah = convert<__nv_bfloat16>(a), bh = convert<__nv_bfloat16>(b);
      s.u.g.A[0][m][kk] = ah;
      s.u.g.A[1][m][kk] = convert<__nv_bfloat16>(a - to_acc<float>(ah));
      s.u.g.B[0][m][kk] = bh;
      s.u.g.B[1][m][kk] = convert<__nv_bfloat16>(b - to_acc<float>(bh));
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> ah, al;
      wmma::load_matrix_sync(ah, &s.u.g.A[0][fr][kk], kTcLdx);
      wmma::load_matrix_sync(al, &s.u.g.A[1][fr][kk], kTcLdx);
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        // B[k][c] = x[j0 + c][k]: the staged rows read column-major
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> bh, bl;
        wmma::load_matrix_sync(bh, &s.u.g.B[0][fc + 16 * n][kk], kTcLdx);
        wmma::load_matrix_sync(bl, &s.u.g.B[1][fc + 16 * n][kk], kTcLdx);
        wmma::mma_sync(acc[n], al, bh, acc[n]);
        wmma::mma_sync(acc[n], ah, bl, acc[n]);
        wmma::mma_sync(acc[n], ah, bh, acc[n]);
      }
    }
    __syncthreads();  // the staging area (and, after the loop, the union's D) is rewritten next
  }
  wmma::store_matrix_sync(&s.u.D[fr][fc], acc[0], kTcLdd, wmma::mem_row_major);
  wmma::store_matrix_sync(&s.u.D[fr][fc + 16], acc[1], kTcLdd, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < kNbM * kNbN; e += kNbThreads) {
    const int r = e / kNbN, c = e % kNbN;
    const int64_t i = i0 + r, j = j0 + c;
    s.u.D[r][c] = i < N && j < N && i != j ? sq_distance(s.u.D[r][c], sq[i], sq[j]) : 0.f;
  }
  __syncthreads();
#else
  (void)p, (void)s, (void)i0, (void)j0;
  __trap();
#endif
}

// Features path: one block per pair of panels (a, b), a <= b, per launch. The [64 x 64] distance
// tile of panel a's rows with panel b's (simt_distance_tile or, kTc, tc_distance_tile; exactly 0 on
// the diagonal) feeds panel a's lists (its rows) and, when a < b, panel b's lists (its columns):
// every pair i < j is computed once, as on the CPU.
// round < 0: the diagonal launch (block b: pair (b, b)); otherwise round `round` of
// rerank_panel_pair's schedule, in which every panel belongs to at most one block, so no two blocks
// of a launch touch one list; launches on one stream run in order.
template <class T, bool kTc>
__global__ void __launch_bounds__(kNbThreads) pair_neighbors_kernel(RerankParams p, int64_t round,
                                                                    int64_t panels) {
  using Smem = typename std::conditional<kTc, NbTcSmem, NbSmem<T>>::type;
  __shared__ __align__(128) Smem s;
  int64_t a = blockIdx.x, b = blockIdx.x;
  if (round >= 0) rerank_panel_pair(panels, round, blockIdx.x, &a, &b);
  if (b >= panels) return;  // a bye (odd panel count): the whole block leaves before any barrier
  const int64_t i0 = a * kNbM, j0 = b * kNbN;
  load_row_states<T>(p, s, 0, i0);
  if (a != b) load_row_states<T>(p, s, kNbM, j0);
  if constexpr (kTc) {
    tc_distance_tile(p, s, i0, j0);
  } else {
    simt_distance_tile(p, s, i0, j0);
  }
  // the tile and the loaded row states are complete (the tile functions end with a barrier)
  scan_tile<T, false>(p, s, 0, i0, j0);
  if (a != b) scan_tile<T, true>(p, s, kNbM, j0, i0);  // the same tile for panel b's rows
  __syncthreads();
  store_rowmax<T>(p, s, 0, i0);
  if (a != b) store_rowmax<T>(p, s, kNbM, j0);
}

// Dense path (one block per panel of 64 rows, all column tiles): the tile of B = A^T,
// A = [[q_q, q_g], [q_g^T, g_g]], squared, read with coalesced loads. B need not be symmetric (the
// original accepts any q_q, g_g), so every tile is read.
template <class T>
__global__ void __launch_bounds__(kNbThreads) dense_neighbors_kernel(RerankParams p) {
  __shared__ NbSmem<T> s;
  const int tid = threadIdx.x;
  const int64_t N = p.N, Q = p.Q;
  const int64_t i0 = int64_t(blockIdx.x) * kNbM;
  load_row_states<T>(p, s, 0, i0);
  for (int64_t j0 = 0; j0 < N; j0 += kNbN) {
    // Tiles inside q_g are contiguous along j; every other block is contiguous along i.
    const bool along_j = i0 + kNbM <= Q && j0 >= Q;
    for (int e = tid; e < kNbM * kNbN; e += kNbThreads) {
      const int r = along_j ? e / kNbN : e % kNbM, c = along_j ? e % kNbN : e / kNbM;
      const int64_t i = i0 + r, j = j0 + c;
      const T v = (i < N && j < N) ? dense_at<T>(p, i, j) : T(0);
      s.u.D[r][c] = v * v;
    }
    __syncthreads();
    scan_tile<T, false>(p, s, 0, i0, j0);
    __syncthreads();  // the tile is rewritten next
  }
  store_rowmax<T>(p, s, 0, i0);
}

// Half-size reciprocal sets: rh[c] = {j in top-hk(c) : c in top-hk(j)}, in neighbour order.
__global__ void half_sets_kernel(RerankParams p) {
  const int K = int(p.K), hk = int(p.hk);
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < p.N;
       c += int64_t(gridDim.x) * blockDim.x) {
    int n = 0;
    for (int t = 0; t < hk; ++t) {
      const int j = p.nbr[c * K + t];
      const int* lj = p.nbr + int64_t(j) * K;
      bool in = false;
      for (int u = 0; u < hk; ++u) in |= lj[u] == int(c);
      if (in) p.rh[c * hk + n++] = j;
    }
    p.rh_len[c] = n;
  }
}

// Squared distance of (i, j) as the CPU's lookup() gives it: row i's list, then (features path:
// symmetric) row j's list, else recomputed. Warp-cooperative; every lane gets the value.
template <class T, bool kDense>
__device__ T lookup(const RerankParams& p, int64_t i, int j, int lane) {
  const int K = int(p.K);
  const T* nd2 = static_cast<const T*>(p.nbr_d2);
  for (int base = 0; base < K; base += 32) {
    const int t = base + lane;
    const bool hit = t < K && p.nbr[i * K + t] == j;
    const unsigned b = __ballot_sync(kFull, hit);
    if (b) {
      const T v = hit ? nd2[i * K + t] : T(0);
      return __shfl_sync(kFull, v, __ffs(b) - 1);
    }
  }
  if (kDense) {
    const T v = dense_at<T>(p, i, j);
    return v * v;
  } else {
    for (int base = 0; base < K; base += 32) {
      const int t = base + lane;
      const bool hit = t < K && p.nbr[int64_t(j) * K + t] == int(i);
      const unsigned b = __ballot_sync(kFull, hit);
      if (b) {
        const T v = hit ? nd2[int64_t(j) * K + t] : T(0);
        return __shfl_sync(kFull, v, __ffs(b) - 1);
      }
    }
    if (int64_t(j) == i) return T(0);
    const T* x = static_cast<const T*>(p.x);
    const T* sq = static_cast<const T*>(p.sq);
    const T dot = warp_dot<T, T>(x + i * p.D, x + int64_t(j) * p.D, p.D, lane);
    return sq_distance(dot, sq[i], sq[j]);
  }
}

constexpr int kRowThreads = 128;

// V rows. buf: lcap ints per block (shared or global slice).
template <class T, bool kFill, bool kDense>
__global__ void __launch_bounds__(kRowThreads) sets_kernel(RerankParams p, int64_t lcap, bool in_smem) {
  UPREID_DYNAMIC_SMEM(dyn, 16);
  __shared__ int red[32];
  __shared__ T wsum;
  int* buf = in_smem ? reinterpret_cast<int*>(dyn)
                     : static_cast<int*>(p.scratch) + size_t(blockIdx.x) * size_t(lcap);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nt = blockDim.x, nw = nt >> 5;
  const int K = int(p.K), hk = int(p.hk);
  const int64_t cand = int64_t(K) * (1 + hk);
  const T* rowmax = static_cast<const T*>(p.rowmax);
  T* vval = static_cast<T*>(p.v_val);

  for (int64_t i = blockIdx.x; i < p.N; i += gridDim.x) {
    const int* ni = p.nbr + i * K;
    // R: the k-reciprocal members of row i's list (INT_MAX elsewhere)
    for (int t = tid; t < K; t += nt) {
      const int j = ni[t];
      const int* lj = p.nbr + int64_t(j) * K;
      bool in = false;
      for (int u = 0; u < K; ++u) in |= lj[u] == int(i);
      buf[t] = in ? j : INT_MAX;
    }
    __syncthreads();
    // Expansion: each member's half-size set is added when more than 2/3 of it is in R.
    for (int t = tid; t < K; t += nt) {
      const int c = buf[t];
      int n = 0;
      bool expand = false;
      if (c != INT_MAX) {
        n = p.rh_len[c];
        int common = 0;
        for (int u = 0; u < n; ++u) {
          const int y = p.rh[int64_t(c) * hk + u];
          bool in = false;
          for (int v = 0; v < K; ++v) in |= buf[v] == y;
          common += in ? 1 : 0;
        }
        // In double as Python evaluates it: len(common) > 2./3 * len(set).
        expand = static_cast<double>(common) > 2.0 / 3.0 * static_cast<double>(n);
      }
      int* dst = buf + K + int64_t(t) * hk;
      for (int u = 0; u < hk; ++u) dst[u] = (expand && u < n) ? p.rh[int64_t(c) * hk + u] : INT_MAX;
    }
    for (int64_t m = cand + tid; m < lcap; m += nt) buf[m] = INT_MAX;
    __syncthreads();
    block_bitonic(buf, lcap);
    // unique columns, in ascending order
    const int64_t row0 = kFill ? p.v_ptr[i] : 0;
    int64_t len = 0;
    for (int64_t base = 0; base < lcap; base += nt) {
      const int64_t m = base + tid;
      const bool f = m < lcap && buf[m] != INT_MAX && (m == 0 || buf[m] != buf[m - 1]);
      int tot = 0;
      const int pre = block_flag_scan(f, red, &tot);
      if (kFill && f) p.v_col[row0 + len + pre] = buf[m];
      len += tot;
    }
    if (!kFill) {
      if (tid == 0) p.v_ptr[i + 1] = len;
    } else {
      __syncthreads();  // v_col of this row written by the whole block
      const T norm = rowmax[i] > T(0) ? rowmax[i] : T(1);
      for (int64_t e = warp; e < len; e += nw) {
        const T d = lookup<T, kDense>(p, i, p.v_col[row0 + e], lane);
        if (lane == 0) vval[row0 + e] = acc_exp_precise(-(d / norm));
      }
      __syncthreads();
      if (tid == 0) {
        T sum = T(0);
        for (int64_t e = 0; e < len; ++e) sum += vval[row0 + e];  // the CPU's order
        wsum = sum;
      }
      __syncthreads();
      for (int64_t e = tid; e < len; e += nt) vval[row0 + e] = vval[row0 + e] / wsum;
    }
    __syncthreads();  // buf is reused by the next row
  }
}

// Local query expansion. Scratch per block: keys [mcap] u64, vals [mcap] T, off [kq + 1] int64.
template <class T, bool kFill>
__global__ void __launch_bounds__(kRowThreads) expand_kernel(RerankParams p, int64_t mcap, bool in_smem) {
  UPREID_DYNAMIC_SMEM(dyn, 16);
  __shared__ int red[32];
  const size_t slice = size_t(mcap) * (8 + sizeof(T)) + size_t(p.kq + 1) * 8;
  unsigned char* base = in_smem ? dyn : static_cast<unsigned char*>(p.scratch) + size_t(blockIdx.x) * slice;
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(base);
  T* gv = reinterpret_cast<T*>(keys + mcap);
  int64_t* off = reinterpret_cast<int64_t*>(gv + mcap);
  const int tid = threadIdx.x, nt = blockDim.x;
  const int K = int(p.K), kq = int(p.kq);
  const T* vval = static_cast<const T*>(p.v_val);
  T* eval = static_cast<T*>(p.e_val);

  for (int64_t i = blockIdx.x; i < p.N; i += gridDim.x) {
    const int* ni = p.nbr + i * K;
    if (tid == 0) {
      off[0] = 0;
      for (int t = 0; t < kq; ++t) off[t + 1] = off[t] + (p.v_ptr[ni[t] + 1] - p.v_ptr[ni[t]]);
    }
    __syncthreads();
    const int64_t M = off[kq];
    for (int t = 0; t < kq; ++t) {
      const int64_t s0 = p.v_ptr[ni[t]], o = off[t], len = off[t + 1] - o;
      for (int64_t e = tid; e < len; e += nt) {
        // (column, position): equal columns stay in neighbour order
        keys[o + e] = (static_cast<unsigned long long>(p.v_col[s0 + e]) << 32) |
                      static_cast<unsigned long long>(o + e);
        gv[o + e] = vval[s0 + e];
      }
    }
    const int64_t n = next_pow2_dev(M);
    for (int64_t m = M + tid; m < n; m += nt) keys[m] = ~0ull;
    __syncthreads();
    block_bitonic(keys, n);
    const int64_t row0 = kFill ? p.e_ptr[i] : 0;
    int64_t len = 0;
    for (int64_t b = 0; b < n; b += nt) {
      const int64_t m = b + tid;
      const bool f = m < M && (m == 0 || (keys[m] >> 32) != (keys[m - 1] >> 32));
      int tot = 0;
      const int pre = block_flag_scan(f, red, &tot);
      if (kFill && f) {
        const unsigned long long col = keys[m] >> 32;
        T sum = T(0);
        for (int64_t q = m; q < M && (keys[q] >> 32) == col; ++q) sum += gv[keys[q] & 0xffffffffull];
        p.e_col[row0 + len + pre] = int(col);
        eval[row0 + len + pre] = sum / static_cast<T>(kq);
      }
      len += tot;
    }
    if (!kFill && tid == 0) p.e_ptr[i + 1] = len;
    __syncthreads();  // scratch reused by the next row
  }
}

// Inverted index over the gallery rows of the final CSR (ptr, col, val).
template <class T, bool kFill>
__global__ void invert_kernel(RerankParams p, const int64_t* ptr, const int32_t* col, const T* val) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  T* ival = static_cast<T*>(p.i_val);
  for (int64_t j = p.Q + ((int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5); j < p.N; j += warps) {
    for (int64_t e = ptr[j] + lane; e < ptr[j + 1]; e += 32) {
      const int k = col[e];
      if (!kFill) {
        atomicAdd(reinterpret_cast<unsigned long long*>(p.i_ptr + k + 1), 1ull);
      } else {
        const int64_t at = p.i_ptr[k] + atomicAdd(p.i_fill + k, 1);
        p.i_col[at] = int(j - p.Q);
        ival[at] = val[e];
      }
    }
  }
}

constexpr int kJacThreads = 256;

template <class T>
__global__ void __launch_bounds__(kJacThreads) jaccard_kernel(RerankParams p, const int64_t* ptr,
                                                              const int32_t* col, const T* val,
                                                              bool in_smem) {
  UPREID_DYNAMIC_SMEM(dyn, 16);
  const int64_t G = p.N - p.Q;
  T* tmin = in_smem ? reinterpret_cast<T*>(dyn) : static_cast<T*>(p.scratch) + size_t(blockIdx.x) * size_t(G);
  const int tid = threadIdx.x, nt = blockDim.x;
  const T* ival = static_cast<const T*>(p.i_val);
  const T* rowmax = static_cast<const T*>(p.rowmax);
  const T lam = static_cast<T>(p.lambda), oml = static_cast<T>(1.0 - p.lambda);
  for (int64_t g = tid; g < G; g += nt) tmin[g] = T(0);
  __syncthreads();
  for (int64_t i = blockIdx.x; i < p.Q; i += gridDim.x) {
    for (int64_t e = ptr[i]; e < ptr[i + 1]; ++e) {  // ascending column: the CPU's summation order
      const int k = col[e];
      const T vi = val[e];
      for (int64_t f = p.i_ptr[k] + tid; f < p.i_ptr[k + 1]; f += nt) {
        const int g = p.i_col[f];
        const T w = ival[f];
        tmin[g] += vi < w ? vi : w;  // a gallery item occurs once per column: no conflict
      }
      __syncthreads();
    }
    const T norm = rowmax[i] > T(0) ? rowmax[i] : T(1);
    float* o = p.out + i * G;
    for (int64_t g = tid; g < G; g += nt) {
      const T t = tmin[g];
      const T jac = T(1) - t / (T(2) - t);
      const T orig = static_cast<T>(o[g]) / norm;
      o[g] = static_cast<float>(mul_rn(jac, oml) + mul_rn(orig, lam));
      tmin[g] = T(0);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// host side

template <class F>
cudaError_t dispatch(DType dt, F&& f) {
  if (dt == DType::kF64) return f(double());
  if (dt == DType::kF32) return f(float());
  return cudaErrorInvalidValue;
}

constexpr size_t kRowSmem = 40 << 10;  // dynamic shared memory of the per-row kernels, at most

int64_t sets_lcap(const RerankParams& p) { return next_pow2(p.K * (1 + p.hk)); }
int64_t expand_mcap(const RerankParams& p) {
  return next_pow2(p.kq * std::min<int64_t>(p.N, p.K * (1 + p.hk)));
}
size_t expand_slice(const RerankParams& p, size_t tsize) {
  return size_t(expand_mcap(p)) * (8 + tsize) + size_t(p.kq + 1) * 8;
}
int64_t row_blocks(const RerankParams& p, const Dev& dev, bool in_smem) {
  return std::max<int64_t>(1, std::min<int64_t>(p.N, in_smem ? 1 << 20 : int64_t(dev.sms) * 4));
}
bool jaccard_in_smem(const RerankParams& p, const Dev& dev, size_t tsize) {
  return size_t(p.N - p.Q) * tsize <= size_t(dev.smem_optin) - 1024;
}
int64_t jaccard_global_blocks(const RerankParams& p, const Dev& dev) {
  return std::max<int64_t>(1, std::min<int64_t>(p.Q, int64_t(dev.sms) * 2));
}

}  // namespace

cudaError_t rerank_scratch_bytes(const RerankParams& p, size_t* bytes) {
  *bytes = 0;
  if (p.N == 0) return cudaSuccess;
  const Dev dev = device();
  const size_t ts = p.dtype == DType::kF64 ? 8 : 4;
  size_t need = 0;
  const size_t sets = size_t(sets_lcap(p)) * 4;
  if (sets > kRowSmem) need = std::max(need, sets * size_t(row_blocks(p, dev, false)));
  if (p.k2 != 1) {
    const size_t ex = expand_slice(p, ts);
    if (ex > kRowSmem) need = std::max(need, ex * size_t(row_blocks(p, dev, false)));
  }
  if (!jaccard_in_smem(p, dev, ts)) {
    need = std::max(need, size_t(p.N - p.Q) * ts * size_t(jaccard_global_blocks(p, dev)));
  }
  *bytes = need;
  return cudaSuccess;
}

namespace {
// The diagonal tiles, then the rounds of off-diagonal pairs (one launch each: a launch boundary is
// the only grid-wide order between two blocks that feed the same panel's lists).
template <class T, bool kTc>
cudaError_t launch_pairs(const RerankParams& p, int64_t panels, cudaStream_t stream) {
  launch(pair_neighbors_kernel<T, kTc>, unsigned(panels), kNbThreads, 0, stream, p, int64_t(-1), panels);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  const unsigned slots = unsigned(rerank_round_slots(panels));
  for (int64_t r = 0; r < rerank_rounds(panels); ++r) {
    launch(pair_neighbors_kernel<T, kTc>, slots, kNbThreads, 0, stream, p, r, panels);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  return cudaSuccess;
}
}  // namespace

cudaError_t rerank_neighbors(const RerankParams& p, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const int64_t panels = (p.N + kNbM - 1) / kNbM;
    const unsigned init_grid = unsigned(std::min<int64_t>((p.N * p.K + 255) / 256, 1 << 16));
    launch(nb_init_kernel<T>, init_grid, 256, 0, stream, p);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if (p.x == nullptr) {
      launch(dense_neighbors_kernel<T>, unsigned(panels), kNbThreads, 0, stream, p);
      return cudaGetLastError();
    }
    const unsigned sq_grid = unsigned(std::min<int64_t>((p.N + 7) / 8, 1 << 16));
    launch(sq_norm_kernel<T>, sq_grid, 256, 0, stream, p);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    if constexpr (std::is_same<T, float>::value) {
      if (p.fp32_precision != int(Fp32Precision::kHighest)) {
        const Dev dev = device();
        if (dev.major >= 8 && dev.arch >= 80) return launch_pairs<float, true>(p, panels, stream);
      }
    }
    return launch_pairs<T, false>(p, panels, stream);
  });
}

cudaError_t rerank_sets(const RerankParams& p, bool fill, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  const Dev dev = device();
  const int64_t lcap = sets_lcap(p);
  const bool in_smem = size_t(lcap) * 4 <= kRowSmem;
  if (!in_smem && p.scratch == nullptr) return cudaErrorInvalidValue;
  const unsigned grid = unsigned(row_blocks(p, dev, in_smem));
  const size_t smem = in_smem ? size_t(lcap) * 4 : 0;
  cudaError_t e = cudaSuccess;
  if (!fill) {
    launch(half_sets_kernel, unsigned(std::min<int64_t>((p.N + 255) / 256, 1 << 16)), 256, 0, stream, p);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  e = dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool dense = p.x == nullptr;
    if (fill) {
      if (dense) launch(sets_kernel<T, true, true>, grid, kRowThreads, smem, stream, p, lcap, in_smem);
      else launch(sets_kernel<T, true, false>, grid, kRowThreads, smem, stream, p, lcap, in_smem);
    } else {
      if (dense) launch(sets_kernel<T, false, true>, grid, kRowThreads, smem, stream, p, lcap, in_smem);
      else launch(sets_kernel<T, false, false>, grid, kRowThreads, smem, stream, p, lcap, in_smem);
    }
    return cudaGetLastError();
  });
  if (e != cudaSuccess || fill) return e;
  return launch_scan(p.v_ptr, p.N, stream);
}

cudaError_t rerank_expand(const RerankParams& p, bool fill, cudaStream_t stream) {
  if (p.N == 0 || p.k2 == 1) return cudaSuccess;
  const Dev dev = device();
  const int64_t mcap = expand_mcap(p);
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t slice = expand_slice(p, sizeof(T));
    const bool in_smem = slice <= kRowSmem;
    if (!in_smem && p.scratch == nullptr) return cudaErrorInvalidValue;
    const unsigned grid = unsigned(row_blocks(p, dev, in_smem));
    const size_t smem = in_smem ? slice : 0;
    if (fill) launch(expand_kernel<T, true>, grid, kRowThreads, smem, stream, p, mcap, in_smem);
    else launch(expand_kernel<T, false>, grid, kRowThreads, smem, stream, p, mcap, in_smem);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess || fill) return e;
    return launch_scan(p.e_ptr, p.N, stream);
  });
}

cudaError_t rerank_invert(const RerankParams& p, cudaStream_t stream) {
  if (p.N == 0) return cudaSuccess;
  const bool qe = p.k2 != 1;
  const int64_t* ptr = qe ? p.e_ptr : p.v_ptr;
  const int32_t* col = qe ? p.e_col : p.v_col;
  const unsigned grid = unsigned(std::min<int64_t>((p.N - p.Q + 7) / 8, 1 << 16));
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* val = static_cast<const T*>(qe ? p.e_val : p.v_val);
    launch(invert_kernel<T, false>, grid, 256, 0, stream, p, ptr, col, val);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    if ((e = launch_scan(p.i_ptr, p.N, stream)) != cudaSuccess) return e;
    launch(invert_kernel<T, true>, grid, 256, 0, stream, p, ptr, col, val);
    return cudaGetLastError();
  });
}

cudaError_t rerank_jaccard(const RerankParams& p, cudaStream_t stream) {
  if (p.Q == 0 || p.N == p.Q) return cudaSuccess;
  const Dev dev = device();
  const bool qe = p.k2 != 1;
  const int64_t* ptr = qe ? p.e_ptr : p.v_ptr;
  const int32_t* col = qe ? p.e_col : p.v_col;
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* val = static_cast<const T*>(qe ? p.e_val : p.v_val);
    const bool in_smem = jaccard_in_smem(p, dev, sizeof(T));
    int64_t blocks = 0;
    size_t smem = 0;
    if (in_smem) {
      smem = size_t(p.N - p.Q) * sizeof(T);
      cudaError_t e = cudaFuncSetAttribute(jaccard_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(smem));
      if (e != cudaSuccess) return e;
      int per_sm = 1;
      e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, jaccard_kernel<T>, kJacThreads, smem);
      if (e != cudaSuccess) return e;
      blocks = std::min<int64_t>(p.Q, int64_t(dev.sms) * std::max(per_sm, 1));
    } else {
      if (p.scratch == nullptr) return cudaErrorInvalidValue;
      blocks = jaccard_global_blocks(p, dev);
    }
    launch(jaccard_kernel<T>, unsigned(blocks), kJacThreads, smem, stream, p, ptr, col, val, in_smem);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace upreid

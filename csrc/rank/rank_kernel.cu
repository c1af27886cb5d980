// rank_metrics CUDA kernels.
//
// Pass 1 (one block per query, grid-stride): counts the query's positives (same pid, other
// camera), the maximum over queries and a NaN/Inf flag. The host reads the two numbers back (one
// small copy) to size pass 2 and to raise the error the CPU path raises.
// Pass 2 (one block per query, grid-stride): the block gathers the positives' keys (distance bits,
// gallery index) into shared memory (or a per-block global slice when a query has more than
// kSmemPos positives), sorts them (bitonic), then every thread takes gallery items: each valid
// negative (other pid) that precedes the last positive is placed among the sorted positives by a
// branch-free binary search and counted in cnt[position] (integer atomics: order-free, so the
// result is deterministic). One thread then walks the P positives in order: rank of positive k =
// k + negatives before it, giving AP (summed in double in the CPU's order), the first-match rank
// and INP exactly as rank_cpu.cpp does. O(G log P) per query, O(Q + G) workspace.
// CMC: integer histogram of first-match ranks (atomics), then one thread cumulates in double.
// Order: ascending distance, ties by gallery index; -0 equals +0 (keys from distance + 0.0).
#include "rank/rank_kernel.cuh"

#include <algorithm>

namespace upreid {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSmemPos = 2048;  // positives per query kept in shared memory (32 KB)
constexpr size_t kEntryBytes = 8 + 4 + 4;  // key, index, count

__device__ __forceinline__ double load_dist(const float* p, int64_t i) { return double(p[i]); }
__device__ __forceinline__ double load_dist(const double* p, int64_t i) { return p[i]; }
__device__ __forceinline__ double load_dist(const __half* p, int64_t i) {
  return double(__half2float(p[i]));
}
__device__ __forceinline__ double load_dist(const __nv_bfloat16* p, int64_t i) {
  return double(__bfloat162float(p[i]));
}

// Order-preserving bits of a double (after -0 -> +0); float/half/bf16 values convert exactly.
__device__ __forceinline__ unsigned long long order_bits(double d) {
  d += 0.0;
  unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(d));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

__device__ __forceinline__ bool key_less(unsigned long long ka, unsigned ia, unsigned long long kb,
                                         unsigned ib) {
  return ka < kb || (ka == kb && ia < ib);
}

int64_t next_pow2(int64_t n) {
  int64_t c = 1;
  while (c < n) c <<= 1;
  return c;
}

template <class T>
__global__ void __launch_bounds__(kThreads) count_positives_kernel(RankParams p) {
  __shared__ int count;
  const T* dist = static_cast<const T*>(p.dist);
  for (int64_t q = blockIdx.x; q < p.Q; q += gridDim.x) {
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    const int64_t qp = p.q_pids[q], qc = p.q_camids[q];
    const T* row = dist + q * p.G;
    int c = 0;
    bool finite = true;
    for (int64_t g = threadIdx.x; g < p.G; g += blockDim.x) {
      finite &= isfinite(load_dist(row, g));
      c += (p.g_pids[g] == qp && p.g_camids[g] != qc) ? 1 : 0;
    }
    if (!finite) p.stats[1] = 1;  // benign race: every writer writes 1
    if (c > 0) atomicAdd(&count, c);
    __syncthreads();
    if (threadIdx.x == 0) {
      p.num_pos[q] = count;
      atomicMax(&p.stats[0], count);
    }
    __syncthreads();  // `count` is reset by the next query
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) rank_kernel(RankParams p, int64_t cap, bool in_smem) {
  UPREID_DYNAMIC_SMEM(smem, 16);
  __shared__ int counter;
  unsigned char* base =
      in_smem ? smem : static_cast<unsigned char*>(p.scratch) + size_t(blockIdx.x) * size_t(cap) * kEntryBytes;
  unsigned long long* keys = reinterpret_cast<unsigned long long*>(base);
  unsigned* idx = reinterpret_cast<unsigned*>(keys + cap);
  int* cnt = reinterpret_cast<int*>(idx + cap);
  const T* dist = static_cast<const T*>(p.dist);
  const int tid = threadIdx.x, nt = blockDim.x;

  for (int64_t q = blockIdx.x; q < p.Q; q += gridDim.x) {
    const int64_t P = p.num_pos[q];  // block-uniform
    if (P == 0) {
      if (tid == 0) {
        p.ap[q] = 0.f;
        p.inp[q] = 0.f;
        p.valid[q] = false;
        p.first[q] = -1;
      }
      continue;
    }
    int64_t n = 1;  // bitonic size: next power of two >= P (P <= cap, cap a power of two)
    while (n < P) n <<= 1;
    const int64_t qp = p.q_pids[q], qc = p.q_camids[q];
    const T* row = dist + q * p.G;
    if (tid == 0) counter = 0;
    for (int64_t k = tid; k < n; k += nt) {
      keys[k] = ~0ull;  // padding sorts last
      idx[k] = 0xffffffffu;
      cnt[k] = 0;
    }
    __syncthreads();
    for (int64_t g = tid; g < p.G; g += nt) {
      if (p.g_pids[g] == qp && p.g_camids[g] != qc) {
        const int slot = atomicAdd(&counter, 1);
        keys[slot] = order_bits(load_dist(row, g));
        idx[slot] = unsigned(g);
      }
    }
    __syncthreads();
    // Bitonic sort of (key, index) ascending; the gather order does not matter (keys are unique).
    for (int64_t k = 2; k <= n; k <<= 1) {
      for (int64_t j = k >> 1; j > 0; j >>= 1) {
        for (int64_t i = tid; i < n; i += nt) {
          const int64_t l = i ^ j;
          if (l > i) {
            const bool up = (i & k) == 0;
            const unsigned long long ka = keys[i], kb = keys[l];
            const unsigned ia = idx[i], ib = idx[l];
            if (key_less(kb, ib, ka, ia) == up) {
              keys[i] = kb;
              keys[l] = ka;
              idx[i] = ib;
              idx[l] = ia;
            }
          }
        }
        __syncthreads();
      }
    }
    const unsigned long long klast = keys[P - 1];
    const unsigned ilast = idx[P - 1];
    for (int64_t g = tid; g < p.G; g += nt) {
      if (p.g_pids[g] == qp) continue;  // a positive, or removed (same pid and camera)
      const unsigned long long kg = order_bits(load_dist(row, g));
      const unsigned ig = unsigned(g);
      if (key_less(klast, ilast, kg, ig)) continue;  // after every positive: changes no rank
      // lower_bound over keys[0, P): number of positives before (kg, ig)
      int64_t lo = 0, len = P;
      while (len > 1) {
        const int64_t half = len >> 1;
        lo = key_less(keys[lo + half], idx[lo + half], kg, ig) ? lo + half : lo;
        len -= half;
      }
      const int64_t pos = lo + (key_less(keys[lo], idx[lo], kg, ig) ? 1 : 0);
      atomicAdd(&cnt[pos], 1);
    }
    __syncthreads();
    if (tid == 0) {
      double ap_sum = 0.0;
      int64_t neg_before = 0, rank = 0;
      for (int64_t k = 0; k < P; ++k) {
        neg_before += cnt[k];
        rank = k + neg_before;
        if (k == 0) p.first[q] = rank;
        ap_sum += static_cast<double>(k + 1) / static_cast<double>(rank + 1);
      }
      p.ap[q] = static_cast<float>(ap_sum / static_cast<double>(P));
      p.inp[q] = static_cast<float>(static_cast<double>(P) / static_cast<double>(rank + 1));
      p.valid[q] = true;
    }
    __syncthreads();  // the buffers and `counter` are reused by the next query
  }
}

__global__ void __launch_bounds__(kThreads) histogram_kernel(RankParams p) {
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < p.Q;
       q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t f = p.first[q];
    if (f < 0) continue;
    atomicAdd(&p.hist[p.max_rank], 1);
    if (f < p.max_rank) atomicAdd(&p.hist[f], 1);
  }
}

__global__ void cmc_kernel(RankParams p) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const int64_t num_valid = p.hist[p.max_rank];
  double acc = 0.0;
  for (int64_t r = 0; r < p.max_rank; ++r) {
    acc += double(p.hist[r]);
    p.cmc[r] = num_valid > 0 ? static_cast<float>(acc / static_cast<double>(num_valid)) : 0.f;
  }
}

template <class F>
cudaError_t dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::kF32:
      return f(float());
    case DType::kF64:
      return f(double());
    case DType::kF16:
      return f(__half());
    case DType::kBF16:
      return f(__nv_bfloat16());
  }
  return cudaErrorInvalidValue;
}

int sm_count() {
  int dev = 0, sms = 1;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1;
  return std::max(sms, 1);
}

// Blocks of pass 2 when the positives live in global scratch: enough to fill the GPU, fewer when
// one slice is large (at most 256 MB of scratch in all).
int64_t global_blocks(const RankParams& p, int64_t cap) {
  const int64_t budget = int64_t(256) << 20;
  int64_t b = std::min<int64_t>(int64_t(sm_count()) * 4, budget / (cap * int64_t(kEntryBytes)));
  return std::max<int64_t>(1, std::min<int64_t>(b, p.Q));
}

}  // namespace

cudaError_t rank_count_positives(const RankParams& p, cudaStream_t stream) {
  if (p.Q == 0 || p.G == 0) return cudaSuccess;
  const unsigned grid = unsigned(std::min<int64_t>(p.Q, 1 << 20));
  return dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch(count_positives_kernel<T>, grid, kThreads, 0, stream, p);
    return cudaGetLastError();
  });
}

cudaError_t rank_scratch_bytes(const RankParams& p, int64_t max_pos, size_t* bytes) {
  *bytes = 0;
  const int64_t cap = next_pow2(std::max<int64_t>(max_pos, 1));
  if (p.Q == 0 || cap <= kSmemPos) return cudaSuccess;
  *bytes = size_t(global_blocks(p, cap)) * size_t(cap) * kEntryBytes;
  return cudaSuccess;
}

cudaError_t rank_metrics_run(const RankParams& p, int64_t max_pos, cudaStream_t stream) {
  cudaError_t e = cudaSuccess;
  if (p.Q > 0) {
    const int64_t cap = next_pow2(std::max<int64_t>(max_pos, 1));
    const bool in_smem = cap <= kSmemPos;
    if (!in_smem && p.scratch == nullptr) return cudaErrorInvalidValue;
    const int64_t blocks = in_smem ? std::min<int64_t>(p.Q, 1 << 20) : global_blocks(p, cap);
    const size_t smem = in_smem ? size_t(cap) * kEntryBytes : 0;
    e = dispatch(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      launch(rank_kernel<T>, unsigned(blocks), kThreads, smem, stream, p, cap, in_smem);
      return cudaGetLastError();
    });
    if (e != cudaSuccess) return e;
    const unsigned hb = unsigned(std::min<int64_t>((p.Q + kThreads - 1) / kThreads, 4096));
    launch(histogram_kernel, hb, kThreads, 0, stream, p);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  launch(cmc_kernel, 1, 32, 0, stream, p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace upreid

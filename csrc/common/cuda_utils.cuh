// Torch-free CUDA helpers shared by the fused operators: the dtype enum the host launchers take,
// dtype conversions, warp reductions, online logsumexp, and small host utilities.
//
// This header is included by the torch glue (host compiler) through the <op>_kernel.cuh headers, so
// everything that needs nvcc sits behind `#ifdef __CUDACC__`; the host compiler only sees the enum.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace upreid {
namespace cuda {

// Element type of the feature tensors. Accumulation is fp32 for the first three, fp64 for kF64.
enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

}  // namespace cuda
}  // namespace upreid

#ifdef __CUDACC__

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cmath>
#include <utility>

namespace upreid {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Every kernel is launched through launch() and declares its dynamic shared memory with
// UPREID_DYNAMIC_SMEM: the CPU emulation harness (tests/emu) supplies its own versions of both and
// then compiles these same sources with the host compiler.
#ifdef UPREID_CUDA_EMU
using ::upreid_emu::launch;
#else
template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   A&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
}
#define UPREID_DYNAMIC_SMEM(name, align) extern __shared__ __align__(align) unsigned char name[]
#endif

// ---------------------------------------------------------------------------------------------
// dtype conversions
template <class Acc, class T>
__device__ __forceinline__ Acc to_acc(T v);
template <>
__device__ __forceinline__ float to_acc<float, float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ double to_acc<double, double>(double v) { return v; }

// Out <- In for the pairs the kernels need (accumulator -> storage type).
template <class Out, class In>
__device__ __forceinline__ Out convert(In v);
template <>
__device__ __forceinline__ float convert<float, float>(float v) { return v; }
template <>
__device__ __forceinline__ __half convert<__half, float>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 convert<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ double convert<double, double>(double v) { return v; }

// ---------------------------------------------------------------------------------------------
// math in the accumulation type: acc_exp is the fast hardware exp for fp32 (tensor-core tiles),
// acc_exp_precise the libm one (SIMT tiles, finalisation); fp64 is always exact (gradcheck)
__device__ __forceinline__ float acc_exp(float x) { return __expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_exp_precise(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp_precise(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }
template <class Acc>
__device__ __forceinline__ Acc neg_inf() { return -static_cast<Acc>(INFINITY); }

// ---------------------------------------------------------------------------------------------
// warp reductions: every lane of the warp gets the result (all 32 lanes must call)
template <class Acc>
__device__ __forceinline__ Acc warp_sum(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class Acc>
__device__ __forceinline__ Acc warp_max(Acc v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Dot product of two rows of length D in the accumulation type; every lane gets the result.
template <class Acc, class T>
__device__ __forceinline__ Acc warp_dot(const T* a, const T* b, int64_t D, int lane) {
  Acc s = Acc(0);
  for (int64_t d = lane; d < D; d += 32) s += to_acc<Acc>(a[d]) * to_acc<Acc>(b[d]);
  return warp_sum(s);
}

// Block-wide max of non-negative values (blockDim.x a multiple of 32, at most 1024); every thread
// gets the result. Uses 32 words of the caller's shared memory.
template <class Acc>
__device__ __forceinline__ Acc block_max(Acc v, Acc* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < nw ? red[lane] : Acc(0);
  v = warp_max(v);
  __syncthreads();
  return v;
}

// ---------------------------------------------------------------------------------------------
// Online logsumexp state: m = running max, l = sum of exp(x - m). Safe when nothing was folded yet
// (m = -inf, l = 0) and when a fold contains only -inf.
template <class Acc>
struct OnlineLse {
  Acc m, l;
  __device__ __forceinline__ OnlineLse() : m(neg_inf<Acc>()), l(Acc(0)) {}
  // The max to subtract from new values once `tile_max` is folded in (0 when still empty, so
  // exp(-inf - 0) = 0 rather than NaN).
  __device__ __forceinline__ Acc pivot(Acc tile_max) const {
    const Acc mn = fmax(m, tile_max);
    return mn == neg_inf<Acc>() ? Acc(0) : mn;
  }
  // Folds sum_j exp(x_j - pivot) computed against pivot(tile_max).
  __device__ __forceinline__ void fold(Acc tile_max, Acc sum_exp) {
    const Acc mn = fmax(m, tile_max);
    const Acc pv = mn == neg_inf<Acc>() ? Acc(0) : mn;
    l = (m == neg_inf<Acc>() ? Acc(0) : l * acc_exp_precise(m - pv)) + sum_exp;
    m = mn;
  }
  // Folds a single logit (or a partial logsumexp value).
  __device__ __forceinline__ void add(Acc x) {
    const Acc mn = fmax(m, x);
    if (mn == neg_inf<Acc>()) return;
    l = (m == neg_inf<Acc>() ? Acc(0) : l * acc_exp_precise(m - mn)) + acc_exp_precise(x - mn);
    m = mn;
  }
  __device__ __forceinline__ Acc value() const { return l > Acc(0) ? m + acc_log(l) : neg_inf<Acc>(); }
};

}  // namespace cuda
}  // namespace upreid

#endif  // __CUDACC__

namespace upreid {
namespace cuda {

// Host helpers (plain C++).
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_up(size_t x, size_t a = 256) { return (x + a - 1) / a * a; }
inline size_t dtype_size(DType t) {
  return t == DType::kF64 ? 8 : (t == DType::kF32 ? 4 : 2);
}
inline size_t acc_size(DType t) { return t == DType::kF64 ? 8 : 4; }

}  // namespace cuda
}  // namespace upreid

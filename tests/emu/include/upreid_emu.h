// CPU emulation of the CUDA subset that upreid's kernels use (see tests/emu/README.md).
//
// The kernel sources are compiled unmodified by the host compiler with this directory first on the
// include path: <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and <mma.h> resolve here. Every CUDA
// thread of a block runs either as a fiber (functional mode: one OS thread, fast) or as an OS thread
// (race mode, UPREID_EMU_RACE: built with ThreadSanitizer; the emulator's own bookkeeping is hidden
// from TSan and only the CUDA synchronisation points create happens-before edges). Blocks run one
// after the other, so static __shared__ variables can be plain statics.
#pragma once

#ifndef UPREID_CUDA_EMU
#define UPREID_CUDA_EMU 1
#endif

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- keywords -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static const

// float overloads of the math functions in the global namespace, as CUDA has them
using std::exp;
using std::fabs;
using std::fma;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::isnan;
using std::log;
using std::sqrt;

// ---- vector types ---------------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct __align__(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
struct __align__(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
constexpr int warpSize = 32;

// CUDA's device min/max overloads for mixed arithmetic types
template <class A, class B, class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type min(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B, class = typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value>::type>
inline typename std::common_type<A, B>::type max(A a, B b) {
  using C = typename std::common_type<A, B>::type;
  return C(a) < C(b) ? C(b) : C(a);
}

// ---- runtime API types ---------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorAssert = 710,
  cudaErrorIllegalInstruction = 715,
  cudaErrorLaunchFailure = 719,
};
typedef cudaError_t cudaError;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes, constSizeBytes, localSizeBytes;
  int maxThreadsPerBlock, numRegs, ptxVersion, binaryVersion, cacheModeCA;
  int maxDynamicSharedSizeBytes, preferredShmemCarveout;
};

const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* dev);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int dev);

namespace upreid_emu {

// ---- per-thread view of the launch ---------------------------------------------------------------
struct Block;
struct Thread {
  uint3 tid, bid;
  dim3 bdim, gdim;
  int linear = 0;  // threadIdx linearised
  Block* block = nullptr;
  unsigned nbar = 0, nwarp = 0;  // barriers passed (happens-before bookkeeping)
  const char* wait_what = nullptr;
  const char* wait_file = nullptr;
  int wait_line = 0;
  // cp.async (cuda_pipeline_primitives.h): copies issued and not yet waited for, each with the
  // number of its commit group (== `committed` while the group is still open)
  struct AsyncCopy {
    void* dst;
    const void* src;
    size_t bytes, zfill;
    uint64_t group;
  };
  std::vector<AsyncCopy> async;
  uint64_t committed = 0;
};
extern thread_local Thread* t_cur;

using Body = std::function<void()>;
void run_launch(const void* kernel, dim3 grid, dim3 block, size_t smem, const Body& body);
unsigned char* dynamic_smem();

cudaError_t func_set_attribute(const void* kernel, int attr, int value);
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel);
cudaError_t occupancy(int* blocks, const void* kernel, int block_size, size_t smem);

// ---- synchronisation and warp collectives --------------------------------------------------------
void syncthreads(const char* file, int line);
void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu);
enum class Op : int { kShfl = 1, kShflXor, kShflUp, kShflDown, kBallot, kAny, kAll, kMma };
// Every lane of `mask` deposits `value`; returns what the op gives this lane (bit pattern).
uint64_t warp_op(const char* file, int line, Op op, unsigned mask, uint64_t value, int arg, int width);
// WMMA 16x16x16: each lane passes its 8 elements of a, b, c (frag_elem below: which elements of
// the row-major logical tiles A, B, C) and receives its 8 elements of D = A B + C.
void warp_mma(const char* file, int line, const float* a, const float* b, const float* c, float* d);
// Which element of a 16 x 16 fragment lane `lane` holds as its i-th (i < 8): row-major index
// r * 16 + c, in the register layout of the hardware's 16x16 mma fragments (lane / 4 picks the row
// pair, lane % 4 the column pair), not a simple stride, so code that reads back its own stores
// with another mapping has to synchronise the warp.
inline int frag_elem(int lane, int i) {
  const int r = (lane >> 2) + 8 * ((i >> 1) & 1);
  const int c = (lane & 3) * 2 + (i & 1) + 8 * (i >> 2);
  return r * 16 + c;
}
[[noreturn]] void trap(const char* file, int line);
// cp.async stand-ins: a copy is recorded when issued and performed only when a wait covers its
// group, so data read before the wait (or by another thread before a barrier) is stale or poisoned.
void async_copy(const char* file, int line, void* dst, const void* src, size_t bytes, size_t zfill = 0);
void async_commit();
void async_wait_prior(size_t prior);

template <class T>
inline uint64_t bits_of(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp op on a type > 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
template <class T>
inline T shfl(const char* f, int l, Op op, unsigned mask, T v, int arg, int width = 32) {
  return from_bits<T>(warp_op(f, l, op, mask, bits_of(v), arg, width));
}

// ---- launch ----------------------------------------------------------------------------------------
template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t,
                   A&&... args) {
  std::tuple<typename std::decay<P>::type...> targs(std::forward<A>(args)...);
  run_launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [&]() { std::apply(kernel, targs); });
}

}  // namespace upreid_emu

// ---- the names kernel code sees ------------------------------------------------------------------
#define threadIdx (::upreid_emu::t_cur->tid)
#define blockIdx (::upreid_emu::t_cur->bid)
#define blockDim (::upreid_emu::t_cur->bdim)
#define gridDim (::upreid_emu::t_cur->gdim)

#define UPREID_DYNAMIC_SMEM(name, align) unsigned char* name = ::upreid_emu::dynamic_smem()

#define __syncthreads() ::upreid_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::upreid_emu::syncwarp(__FILE__, __LINE__, ##__VA_ARGS__)
#define __trap() ::upreid_emu::trap(__FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...) \
  ::upreid_emu::shfl(__FILE__, __LINE__, ::upreid_emu::Op::kShfl, mask, v, src, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, v, lm, ...) \
  ::upreid_emu::shfl(__FILE__, __LINE__, ::upreid_emu::Op::kShflXor, mask, v, lm, ##__VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) \
  ::upreid_emu::shfl(__FILE__, __LINE__, ::upreid_emu::Op::kShflUp, mask, v, d, ##__VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) \
  ::upreid_emu::shfl(__FILE__, __LINE__, ::upreid_emu::Op::kShflDown, mask, v, d, ##__VA_ARGS__)
#define __ballot_sync(mask, p) \
  unsigned(::upreid_emu::warp_op(__FILE__, __LINE__, ::upreid_emu::Op::kBallot, mask, (p) ? 1u : 0u, 0, 32))
#define __any_sync(mask, p) \
  int(::upreid_emu::warp_op(__FILE__, __LINE__, ::upreid_emu::Op::kAny, mask, (p) ? 1u : 0u, 0, 32))
#define __all_sync(mask, p) \
  int(::upreid_emu::warp_op(__FILE__, __LINE__, ::upreid_emu::Op::kAll, mask, (p) ? 1u : 0u, 0, 32))

template <class F>
inline cudaError_t cudaFuncSetAttribute(F kernel, cudaFuncAttribute attr, int value) {
  return ::upreid_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
template <class F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F kernel) {
  return ::upreid_emu::func_get_attributes(attr, reinterpret_cast<const void*>(kernel));
}
template <class F>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F kernel, int block_size,
                                                                 size_t smem) {
  return ::upreid_emu::occupancy(n, reinterpret_cast<const void*>(kernel), block_size, smem);
}

// ---- intrinsics ----------------------------------------------------------------------------------
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;  // never contracted into an FMA
  return r;
}
inline double __dmul_rn(double a, double b) {
  volatile double r = a * b;
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline double __dadd_rn(double a, double b) {
  volatile double r = a + b;
  return r;
}
inline long long __double_as_longlong(double d) {
  long long v;
  std::memcpy(&v, &d, 8);
  return v;
}
inline double __longlong_as_double(long long v) {
  double d;
  std::memcpy(&d, &v, 8);
  return d;
}
inline int __float_as_int(float f) {
  int v;
  std::memcpy(&v, &f, 4);
  return v;
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline unsigned __float_as_uint(float f) { return unsigned(__float_as_int(f)); }
inline float __uint_as_float(unsigned v) { return __int_as_float(int(v)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
template <class T>
inline T __ldg(const T* p) { return *p; }

// Atomics are relaxed, as CUDA's are: they order nothing, so they hide no race from TSan.
template <class T>
inline T emu_atomic_add_int(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return emu_atomic_add_int(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return emu_atomic_add_int(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return emu_atomic_add_int(p, v);
}
template <class F, class U>
inline F emu_atomic_float_rmw(F* p, F v, F (*op)(F, F)) {
  static_assert(sizeof(F) == sizeof(U), "size");
  U* up = reinterpret_cast<U*>(p);
  U old = __atomic_load_n(up, __ATOMIC_RELAXED);
  for (;;) {
    F of;
    std::memcpy(&of, &old, sizeof(F));
    const F nf = op(of, v);
    U nu;
    std::memcpy(&nu, &nf, sizeof(F));
    if (__atomic_compare_exchange_n(up, &old, nu, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return of;
  }
}
inline float emu_addf(float a, float b) { return a + b; }
inline double emu_addd(double a, double b) { return a + b; }
inline float atomicAdd(float* p, float v) { return emu_atomic_float_rmw<float, uint32_t>(p, v, emu_addf); }
inline double atomicAdd(double* p, double v) {
  return emu_atomic_float_rmw<double, uint64_t>(p, v, emu_addd);
}
template <class T>
inline T emu_atomic_minmax(T* p, T v, bool is_max) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while ((is_max ? old < v : v < old) &&
         !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) { return emu_atomic_minmax(p, v, true); }
inline unsigned atomicMax(unsigned* p, unsigned v) { return emu_atomic_minmax(p, v, true); }
inline int atomicMin(int* p, int v) { return emu_atomic_minmax(p, v, false); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline int atomicCAS(int* p, int cmp, int v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  __atomic_compare_exchange_n(p, &cmp, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return cmp;
}

// ---- fp16 / bf16 storage types (conversions round to nearest even, as the _rn intrinsics) --------
struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
typedef __half half;
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h, 2);
  return float(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h, &f, 2);
  return h;
}
inline __half __float2half(float v) { return __float2half_rn(v); }
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.__x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float v) { return __float2bfloat16_rn(v); }

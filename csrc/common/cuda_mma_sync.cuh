// Tensor-core operand loads and products below the WMMA API: ldmatrix (shared memory -> the
// registers of mma fragments, 16-byte rows, one instruction per four 8 x 8 matrices) and
// mma.sync.m16n8k16 with fp16/bf16 operands and fp32 accumulation. nvcc lowers bf16 WMMA fragment
// loads to plain 32-bit shared loads; these keep them on ldmatrix.
//
// Fragment layouts (PTX ISA, mma.m16n8k16; lane = 4 g + t):
//   A [16 x 16]: a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
//   B [16 x 8]:  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
//   C [16 x 8]:  c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// A 16 x 16 x 16 product is two m16n8k16 (columns 0-7, 8-15): b[0..1] and d[0..3] belong to the first,
// b[2..3] and d[4..7] to the second. So d[i] is C[g + 8 ((i >> 1) & 1)][2t + (i & 1) + 8 (i >> 2)].
//
// Under the emulation harness the same functions are built from warp shuffles and the harness's
// 16 x 16 x 16 warp product (tests/emu), so the fragment layouts above are what the tests check.
#pragma once

#include <cstdint>

#include "common/cuda_utils.cuh"

namespace upreid {
namespace cuda {

// The four 8 x 8 matrices of ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8
// (16 bytes of 16-bit elements, 16-byte aligned, shared memory). Lane 4 g + t receives in r[i] the
// elements (g, 2t) and (g, 2t + 1) of matrix i, or with kTrans (2t, g) and (2t + 1, g).
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#if defined(UPREID_CUDA_EMU)
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const unsigned long long mine = reinterpret_cast<unsigned long long>(row);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (!kTrans) {
      const auto* p = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * i + g));
      r[i] = uint32_t(p[2 * t]) | (uint32_t(p[2 * t + 1]) << 16);
    } else {
      const auto* p0 = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * i + 2 * t));
      const auto* p1 = reinterpret_cast<const uint16_t*>(__shfl_sync(0xffffffffu, mine, 8 * i + 2 * t + 1));
      r[i] = uint32_t(p0[g]) | (uint32_t(p1[g]) << 16);
    }
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  }
#else
  (void)r, (void)row;
  __trap();
#endif
}

#if defined(UPREID_CUDA_EMU)
namespace detail {
inline float half_bits_to_float(uint16_t v, const __half*) {
  __half h;
  std::memcpy(&h, &v, 2);
  return __half2float(h);
}
inline float half_bits_to_float(uint16_t v, const __nv_bfloat16*) {
  __nv_bfloat16 h;
  std::memcpy(&h, &v, 2);
  return __bfloat162float(h);
}
}  // namespace detail
#endif

// d[8] += A[16 x 16] B[16 x 16] (T: __half or __nv_bfloat16 operands, fp32 accumulation).
template <class T>
__device__ __forceinline__ void mma_16x16x16(float (&d)[8], const uint32_t (&a)[4], const uint32_t (&b)[4]) {
#if defined(UPREID_CUDA_EMU)
  // The harness's warp product takes every operand in d's element order (row g + 8 ((i >> 1) & 1),
  // column 2t + (i & 1) + 8 (i >> 2)); A's registers already are in that order, B's element (k, n)
  // sits in lane 4 (n % 8) + (k % 8) / 2, register 2 (n >= 8) + (k >= 8), half k % 2.
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const T* tag = nullptr;
  float fa[8], fb[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) fa[i] = detail::half_bits_to_float(uint16_t(a[i >> 1] >> (16 * (i & 1))), tag);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int k = g + 8 * ((i >> 1) & 1), n = 2 * t + (i & 1) + 8 * (i >> 2);
    const int reg = 2 * (n >= 8) + (k >= 8);
    uint32_t v = 0;
    switch (reg) {  // every lane asks for the same register index for a given i
      case 0: v = __shfl_sync(0xffffffffu, b[0], 4 * (n % 8) + (k % 8) / 2); break;
      case 1: v = __shfl_sync(0xffffffffu, b[1], 4 * (n % 8) + (k % 8) / 2); break;
      case 2: v = __shfl_sync(0xffffffffu, b[2], 4 * (n % 8) + (k % 8) / 2); break;
      default: v = __shfl_sync(0xffffffffu, b[3], 4 * (n % 8) + (k % 8) / 2); break;
    }
    fb[i] = detail::half_bits_to_float(uint16_t(v >> (16 * (k % 2))), tag);
  }
  float c[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) c[i] = d[i];
  ::upreid_emu::warp_mma(__FILE__, __LINE__, fa, fb, c, d);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[4 * h]), "+f"(d[4 * h + 1]), "+f"(d[4 * h + 2]), "+f"(d[4 * h + 3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[2 * h]), "r"(b[2 * h + 1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
          "{%8, %9}, {%0, %1, %2, %3};\n"
          : "+f"(d[4 * h]), "+f"(d[4 * h + 1]), "+f"(d[4 * h + 2]), "+f"(d[4 * h + 3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[2 * h]), "r"(b[2 * h + 1]));
    }
  }
#else
  (void)d, (void)a, (void)b;
  __trap();
#endif
}

}  // namespace cuda
}  // namespace upreid

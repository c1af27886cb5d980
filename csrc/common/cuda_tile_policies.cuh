// Tile policies of the fused contrastive kernels (see common/cuda_tiles.cuh for the block loop that
// uses them): how a warp forms its [16 x BN] logits tile S and accumulates its output O.
//   TcPolicy<T, G>    WMMA 16x16x16 tensor cores (fp16/bf16; fp32 inputs rounded to bf16: "medium")
//   TcSplitPolicy     fp32 "high": split-bf16, three tensor-core products per product
//   TcWide<P>         P with O in shared memory: one output pass covers 256 features
//   SimtPolicy<T, A>  CUDA-core FMAs, O of 128 features per pass in registers
#pragma once

#include "common/cuda_mma_sync.cuh"
#include "common/cuda_utils.cuh"

#ifdef __CUDACC__

#include <mma.h>

#include <cstdint>
#include <type_traits>

// Minimum resident blocks per SM requested for the fp32-accumulating CUDA-core tile kernels (a
// build-time knob, so a GPU benchmark can compare: -DUPREID_SIMT_F32_MIN_BLOCKS=0 lifts the cap).
#ifndef UPREID_SIMT_F32_MIN_BLOCKS
#define UPREID_SIMT_F32_MIN_BLOCKS 3
#endif
// Only parts with room for three such blocks in shared memory get the cap (sm_80, sm_87, sm_90,
// sm_100: 164 KB or more per SM); on the others (sm_75, sm_86, sm_89, sm_120: 64-128 KB) a third
// block could not be resident anyway, and spills would buy nothing.
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870 || \
                               (__CUDA_ARCH__ >= 900 && __CUDA_ARCH__ < 1200))
#define UPREID_ROOM_FOR_3_SIMT_BLOCKS 1
#else
#define UPREID_ROOM_FOR_3_SIMT_BLOCKS 0
#endif
// __launch_bounds__'s second argument for a tile kernel of policy Pol: 0 (no minimum: ptxas's own
// allocation, which an explicit 1 would change) except for the capped CUDA-core kernels.
#define UPREID_TILE_MIN_BLOCKS(Pol) (UPREID_ROOM_FOR_3_SIMT_BLOCKS ? (Pol::kMinBlocks) : 0)

namespace upreid {
namespace cuda {

// Block shape shared by the policies and the block loop: 4 warps, each owning 16 rows.
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBM = kWarps * 16;  // rows per block

// ---------------------------------------------------------------------------------------------
// Tensor-core policy (sm_80+: bf16 WMMA needs it; fp16 uses the same path for simplicity).
template <class T_, class G_ = T_>
struct TcPolicy {
  using T = T_;   // operands in shared memory and on the tensor cores
  using G = G_;   // the inputs in global memory: T, or float rounded to T on load ("medium")
  using Acc = float;
  using WT = T_;  // W is rounded to the input type to feed the second product
  static constexpr bool kTensorCore = true;
  static constexpr bool kWInS = false;   // W has its own buffer (different element size)
  static constexpr bool kSmemVec = true; // LDX * sizeof(T) is a multiple of 16 bytes
  // Column tiles are copied global -> shared with cp.async, double-buffered (the inputs are staged
  // as they are: no conversion on the way).
  static constexpr bool kAsync = std::is_same<T_, G_>::value;
  static constexpr int kMinBlocks = 0;  // no __launch_bounds__ minimum (UPREID_TILE_MIN_BLOCKS)
  static constexpr int BN = 64, DC = 128, KSTEP = 16;
  static constexpr int LDX = DC + 8, LDS = BN + 4, LDW = BN + 8;
  static constexpr int kPlanes = 1;  // TcSplitPolicy: 2 (hi and lo parts of every operand)
  static constexpr int NSLOT = 1, OW = DC;  // output columns per pass: O[16 x DC] in registers
  static constexpr bool kOSmem = false;     // TcWide: O in shared memory
  static constexpr bool kMmaSync = false;   // TcMmaPolicy: ldmatrix / mma.sync instead of WMMA
  // Online-softmax output: the running max may exceed O's reference by this much before O is
  // rescaled (P <= e^8 ~ 3e3 is exact enough in fp16/bf16 and far from fp16's 65504).
  static constexpr float kOSlack = 8.f;
  __device__ static __forceinline__ float ex(float x) { return __expf(x); }

  using FragAcc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragBc = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragBr = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::row_major>;
  struct SAcc {
    FragAcc f[BN / 16];
  };
  struct OAcc {
    FragAcc f[DC / 16];
  };

  template <class A>
  __device__ static __forceinline__ void zero(A& a) {
#pragma unroll
    for (int i = 0; i < int(sizeof(a.f) / sizeof(a.f[0])); ++i) nvcuda::wmma::fill_fragment(a.f[i], 0.f);
  }
  // W[r][c] = w for the second product (wrow: row r of the warp's W buffer)
  __device__ static __forceinline__ void put_w(WT* wrow, int c, float w) { wrow[c] = convert<WT>(w); }
  // S[16 x BN] += Qw[16 x klen] @ C[BN x klen]^T   (Qw: the warp's 16 rows, ld LDX)
  __device__ static __forceinline__ void mma_s(SAcc& acc, const T* sQw, const T* sC, int klen, int) {
    for (int k = 0; k < klen; k += 16) {
      FragA a;
      nvcuda::wmma::load_matrix_sync(a, sQw + k, LDX);
#pragma unroll
      for (int n = 0; n < BN / 16; ++n) {
        FragBc b;  // B(k, n) = C[n][k]: column-major view of the row-major C tile
        nvcuda::wmma::load_matrix_sync(b, sC + n * 16 * LDX + k, LDX);
        nvcuda::wmma::mma_sync(acc.f[n], a, b, acc.f[n]);
      }
    }
  }
  __device__ static __forceinline__ void store_s(const SAcc& acc, float* sSw, int) {
#pragma unroll
    for (int n = 0; n < BN / 16; ++n)
      nvcuda::wmma::store_matrix_sync(sSw + n * 16, acc.f[n], LDS, nvcuda::wmma::mem_row_major);
  }
  // O[16 x DC] += W[16 x BN] @ C[BN x dlen]  (one D chunk per pass: slot is 0)
  __device__ static __forceinline__ void mma_o(OAcc& acc, const T* sWw, const T* sC, int dlen, int, int) {
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      FragA a;
      nvcuda::wmma::load_matrix_sync(a, sWw + kk, LDW);
#pragma unroll
      for (int n = 0; n < DC / 16; ++n) {
        if (n * 16 < dlen) {
          FragBr b;
          nvcuda::wmma::load_matrix_sync(b, sC + kk * LDX + n * 16, LDX);
          nvcuda::wmma::mma_sync(acc.f[n], a, b, acc.f[n]);
        }
      }
    }
  }
  // O[r, :] *= alpha[r] (alpha: the warp's 16 factors in shared memory). The accumulator layout of
  // a WMMA fragment is unspecified, so each fragment goes through `scratch` ([16 x LDS] fp32).
  __device__ static __forceinline__ void rescale_o(OAcc& acc, const float* alpha, float* scratch,
                                                   int dlen, int lane) {
#pragma unroll
    for (int n = 0; n < DC / 16; ++n) {
      if (n * 16 < dlen) {  // the other fragments are never accumulated (mma_o) and stay zero
        nvcuda::wmma::store_matrix_sync(scratch, acc.f[n], LDS, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e, r = idx >> 4, c = idx & 15;
          scratch[r * LDS + c] *= alpha[r];
        }
        __syncwarp();
        nvcuda::wmma::load_matrix_sync(acc.f[n], scratch, LDS, nvcuda::wmma::mem_row_major);
        __syncwarp();
      }
    }
  }
  // out[row, d0 + d] = O[r, d] * rs(row) for the valid rows/columns; `scratch` is the warp's
  // [16 x LDS] fp32 area.
  template <class RS>
  __device__ static __forceinline__ void store_o(const OAcc& acc, float* scratch, float* out,
                                                 int64_t wrow0, int64_t nrows, int64_t d0,
                                                 int64_t D, int lane, const RS& rs) {
#pragma unroll
    for (int n = 0; n < DC / 16; ++n) {
      if (d0 + n * 16 < D) {
        nvcuda::wmma::store_matrix_sync(scratch, acc.f[n], LDS, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e, r = idx >> 4, c = idx & 15;
          const int64_t row = wrow0 + r, d = d0 + n * 16 + c;
          if (row < nrows && d < D) out[row * D + d] = scratch[r * LDS + c] * rs(row);
        }
        __syncwarp();
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 inputs on the tensor cores below the WMMA API (common/cuda_mma_sync.cuh): operands
// through ldmatrix, products by mma.sync.m16n8k16, accumulators in registers in the documented
// fragment layout (so the output rescale and store need no round trip through shared memory).
// Same tiles, staging and shared memory as TcPolicy<T>; for D > DC the host takes
// TcWide<TcPolicy<T>> (kMmaSync tells maybe_wide).
template <class T_>
struct TcMmaPolicy : TcPolicy<T_> {
  using Base = TcPolicy<T_>;
  using T = T_;
  using Base::BN;
  using Base::DC;
  using Base::LDS;
  using Base::LDW;
  using Base::LDX;
  static constexpr bool kMmaSync = true;
  struct SAcc {
    float v[BN / 16][8];  // the warp's S[16 x BN], 16 x 16 blocks in mma_16x16x16's element order
  };
  struct OAcc {
    float v[DC / 16][8];
  };
  template <class A>
  __device__ static __forceinline__ void zero(A& a) {
#pragma unroll
    for (int n = 0; n < int(sizeof(a.v) / sizeof(a.v[0])); ++n)
#pragma unroll
      for (int i = 0; i < 8; ++i) a.v[n][i] = 0.f;
  }
  // This lane's A fragment of rows 0-15, columns k..k+15 of a row-major tile (ld elements).
  __device__ static __forceinline__ void load_a(uint32_t (&a)[4], const T* base, int ld, int k, int lane) {
    ldmatrix_x4<false>(a, base + (lane & 15) * ld + k + 8 * (lane >> 4));
  }
  // S[16 x BN] += Qw[16 x klen] @ C[BN x klen]^T: B(k, n) = C[n][k], the C rows read as they are
  __device__ static __forceinline__ void mma_s(SAcc& acc, const T* sQw, const T* sC, int klen, int lane) {
    for (int k = 0; k < klen; k += 16) {
      uint32_t a[4];
      load_a(a, sQw, LDX, k, lane);
#pragma unroll
      for (int n = 0; n < BN / 16; ++n) {
        uint32_t b[4];  // matrix i: C rows n16 + 8 (i / 2) .., columns k + 8 (i % 2) ..
        const int i = lane >> 3;
        ldmatrix_x4<false>(b, sC + (n * 16 + (lane & 7) + 8 * (i >> 1)) * LDX + k + 8 * (i & 1));
        mma_16x16x16<T>(acc.v[n], a, b);
      }
    }
  }
  __device__ static __forceinline__ void store_s(const SAcc& acc, float* sSw, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < BN / 16; ++n)
#pragma unroll
      for (int i = 0; i < 8; ++i)
        sSw[(g + 8 * ((i >> 1) & 1)) * LDS + n * 16 + 2 * t + (i & 1) + 8 * (i >> 2)] = acc.v[n][i];
  }
  // O[16 x DC] += W[16 x BN] @ C[BN x dlen]: B(k, n) = C[k][n], read transposed by ldmatrix
  __device__ static __forceinline__ void mma_o(OAcc& acc, const T* sWw, const T* sC, int dlen, int lane, int) {
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      uint32_t a[4];
      load_a(a, sWw, LDW, kk, lane);
#pragma unroll
      for (int n = 0; n < DC / 16; ++n) {
        if (n * 16 < dlen) {
          uint32_t b[4];  // matrix i: C rows kk + 8 (i % 2) .., columns n16 + 8 (i / 2) ..
          const int i = lane >> 3;
          ldmatrix_x4<true>(b, sC + (kk + (lane & 7) + 8 * (i & 1)) * LDX + n * 16 + 8 * (i >> 1));
          mma_16x16x16<T>(acc.v[n], a, b);
        }
      }
    }
  }
  // O[r, :] *= alpha[r]: each lane holds rows g and g + 8
  __device__ static __forceinline__ void rescale_o(OAcc& acc, const float* alpha, float*, int, int lane) {
    const float lo = alpha[lane >> 2], hi = alpha[(lane >> 2) + 8];
#pragma unroll
    for (int n = 0; n < DC / 16; ++n)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc.v[n][i] *= ((i >> 1) & 1) ? hi : lo;
  }
  template <class RS>
  __device__ static __forceinline__ void store_o(const OAcc& acc, float*, float* out, int64_t wrow0,
                                                 int64_t nrows, int64_t d0, int64_t D, int lane, const RS& rs) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int n = 0; n < DC / 16; ++n) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int r = g + 8 * ((i >> 1) & 1);
        const int64_t row = wrow0 + r, d = d0 + n * 16 + 2 * t + (i & 1) + 8 * (i >> 2);
        if (row < nrows && d < D) out[row * D + d] = acc.v[n][i] * rs(row);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// fp32 "high" precision on bf16 tensor cores, split-bf16 ("3xBF16"): every fp32 operand x is staged
// as two bf16 planes, hi = bf16(x) and lo = bf16(x - hi), and each product is formed from three
// tensor-core products, lo*hi + hi*lo + hi*hi, accumulated in fp32 (lo*lo, ~2^-18 relative, is
// dropped). hi + lo keeps 16 significant bits, so a product is accurate to ~1e-5 relative, against
// ~4e-3 for one bf16 product ("medium") and ~1e-3 for TF32. W (the epilogue's fp32 weights, the A
// operand of the second product) is split the same way. The lo plane of a staged tile of ROWS rows
// follows its hi plane (ROWS * LDX elements further); the lo plane of a warp's W is 16 * LDW further.
struct TcSplitPolicy : TcPolicy<__nv_bfloat16, float> {
  using Base = TcPolicy<__nv_bfloat16, float>;
  using T = __nv_bfloat16;
  static constexpr int kPlanes = 2;
  static constexpr int kQLo = kBM * LDX, kCLo = BN * LDX, kWLo = 16 * LDW;
  static_assert(kBM == BN, "mma_s finds the lo plane of rows and columns tiles alike");

  __device__ static __forceinline__ void put_w(T* wrow, int c, float w) {
    const T hi = convert<T>(w);
    wrow[c] = hi;
    wrow[kWLo + c] = convert<T>(w - to_acc<float>(hi));
  }
  // S[16 x BN] += Qw[16 x klen] @ C[BN x klen]^T, three products per fragment pair
  // (function templates, so that a build for pre-sm_80 parts, where bf16 WMMA fragments are
  // incomplete types, never instantiates them)
  template <class SA>
  __device__ static __forceinline__ void mma_s(SA& acc, const T* sQw, const T* sC, int klen, int) {
    for (int k = 0; k < klen; k += 16) {
      FragA a, al;
      nvcuda::wmma::load_matrix_sync(a, sQw + k, LDX);
      nvcuda::wmma::load_matrix_sync(al, sQw + kQLo + k, LDX);
#pragma unroll
      for (int n = 0; n < BN / 16; ++n) {
        FragBc b, bl;
        nvcuda::wmma::load_matrix_sync(b, sC + n * 16 * LDX + k, LDX);
        nvcuda::wmma::load_matrix_sync(bl, sC + kCLo + n * 16 * LDX + k, LDX);
        nvcuda::wmma::mma_sync(acc.f[n], al, b, acc.f[n]);
        nvcuda::wmma::mma_sync(acc.f[n], a, bl, acc.f[n]);
        nvcuda::wmma::mma_sync(acc.f[n], a, b, acc.f[n]);
      }
    }
  }
  // O[16 x DC] += W[16 x BN] @ C[BN x dlen], three products per fragment pair
  template <class OA>
  __device__ static __forceinline__ void mma_o(OA& acc, const T* sWw, const T* sC, int dlen, int, int) {
#pragma unroll
    for (int kk = 0; kk < BN; kk += 16) {
      FragA a, al;
      nvcuda::wmma::load_matrix_sync(a, sWw + kk, LDW);
      nvcuda::wmma::load_matrix_sync(al, sWw + kWLo + kk, LDW);
#pragma unroll
      for (int n = 0; n < DC / 16; ++n) {
        if (n * 16 < dlen) {
          FragBr b, bl;
          nvcuda::wmma::load_matrix_sync(b, sC + kk * LDX + n * 16, LDX);
          nvcuda::wmma::load_matrix_sync(bl, sC + kCLo + kk * LDX + n * 16, LDX);
          nvcuda::wmma::mma_sync(acc.f[n], al, b, acc.f[n]);
          nvcuda::wmma::mma_sync(acc.f[n], a, bl, acc.f[n]);
          nvcuda::wmma::mma_sync(acc.f[n], a, b, acc.f[n]);
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Tensor cores for 128 < D: O of a whole pass (OW = 256 features, two D chunks) does not fit in
// registers, so each warp keeps its O[16 x OW] in shared memory (fp32, ld LDO) and an output update
// loads the fragments of one D chunk, multiplies with P's mma_o and stores them back. The column
// chunks are restaged one at a time for O (one staging slot), so the logits tile is still formed
// once per pass: for D <= 256 once. The host takes this policy only where its shared memory fits the
// device (SmemLayout<TcWide<P>, ...>::bytes <= the opt-in maximum); otherwise P, with D/128 passes.
template <class P>
struct TcWide : P {
  static constexpr int DC = P::DC;
  static constexpr int NSLOT = 1, OW = 2 * DC;
  static constexpr bool kOSmem = true;
  static constexpr int LDO = OW + 4;
  struct OAcc {
    float* o;  // this warp's [16 x LDO] rows in shared memory
  };
  using P::zero;
  // Elementwise passes over O use lane + 32 e; the fragment loads and stores of mma_o use the
  // fragment layout: each side is separated from the other by __syncwarp.
  __device__ static __forceinline__ void zero(OAcc& a) {
    const int lane = threadIdx.x & 31;
    __syncwarp();
    for (int idx = lane; idx < 16 * OW; idx += 32) a.o[(idx / OW) * LDO + idx % OW] = 0.f;
    __syncwarp();
  }
  // O[:, chunk cc of the pass] += W[16 x BN] @ C[BN x dlen]
  __device__ static __forceinline__ void mma_o(OAcc& acc, const typename P::T* sWw, const typename P::T* sC,
                                               int dlen, int lane, int cc) {
    typename P::OAcc r;
    float* base = acc.o + cc * DC;
#pragma unroll
    for (int n = 0; n < DC / 16; ++n) {
      if (n * 16 < dlen) {
        nvcuda::wmma::load_matrix_sync(r.f[n], base + n * 16, LDO, nvcuda::wmma::mem_row_major);
      } else {
        nvcuda::wmma::fill_fragment(r.f[n], 0.f);
      }
    }
    P::mma_o(r, sWw, sC, dlen, lane, 0);
#pragma unroll
    for (int n = 0; n < DC / 16; ++n)
      if (n * 16 < dlen) nvcuda::wmma::store_matrix_sync(base + n * 16, r.f[n], LDO, nvcuda::wmma::mem_row_major);
  }
  __device__ static __forceinline__ void rescale_o(OAcc& acc, const float* alpha, float*, int dlen, int lane) {
    __syncwarp();
    for (int idx = lane; idx < 16 * OW; idx += 32) {
      const int r = idx / OW, c = idx % OW;
      if (c < dlen) acc.o[r * LDO + c] *= alpha[r];
    }
    __syncwarp();
  }
  template <class RS>
  __device__ static __forceinline__ void store_o(const OAcc& acc, float*, float* out, int64_t wrow0,
                                                 int64_t nrows, int64_t d0, int64_t D, int lane,
                                                 const RS& rs) {
    __syncwarp();
    for (int idx = lane; idx < 16 * OW; idx += 32) {
      const int r = idx / OW, c = idx % OW;
      const int64_t row = wrow0 + r, d = d0 + c;
      if (row < nrows && d < D) out[row * D + d] = acc.o[r * LDO + c] * rs(row);
    }
    __syncwarp();
  }
};

// ---------------------------------------------------------------------------------------------
// SIMT policy. Lane l owns rows rg + 4i (rg = l / 8) and columns cg + 8j (cg = l % 8), i, j < 4, of
// the S tile, and of O the same rows and columns cg + 8j + DC * s of each D chunk s < NSLOT: one
// pass covers OW = NSLOT * DC = 128 features, so for D <= 128 every logits tile is formed once.
template <class T_, class Acc_>
struct SimtPolicy {
  using T = T_;
  using G = T_;
  using Acc = Acc_;
  using WT = Acc_;  // W overwrites the S scratch in place
  static constexpr bool kTensorCore = false;
  static constexpr bool kWInS = true;
  static constexpr bool kSmemVec = false;  // odd padding: stores are element-wise
  static constexpr bool kAsync = false;    // cp.async needs 16-byte aligned rows in shared memory
  // Occupancy: with fp32 accumulation the tile kernels are register-bound (ptxas gives them up to
  // 255 registers, 2 blocks of 128 threads per SM); capping them at 168 registers lets 3 blocks run,
  // at the price of spills: fp32 on sm_90 48-88 bytes a thread (bank_kl's backward 248), on sm_80
  // 104-152 (208). Whether the third block pays for them only a GPU can tell (build with
  // -DUPREID_SIMT_F32_MIN_BLOCKS=1 to compare). tools/cuda_compile_check.sh prints every tile
  // kernel's registers and spills and fails if the cap is not met.
  static constexpr int kMinBlocks = std::is_same<Acc_, float>::value ? UPREID_SIMT_F32_MIN_BLOCKS : 0;
  static constexpr int BN = 32, DC = 32, KSTEP = 1;
  static constexpr int NSLOT = 4, OW = NSLOT * DC;
  static constexpr bool kOSmem = false;
  static constexpr int LDX = DC + 1, LDS = BN + 1, LDW = LDS;
  static constexpr Acc kOSlack = Acc(0);  // O lives in registers: rescaling is cheap, do it exactly
  static constexpr int kPlanes = 1;
  __device__ static __forceinline__ Acc ex(Acc x) { return acc_exp_precise(x); }
  // in place: W overwrites the element of S just read
  __device__ static __forceinline__ void put_w(WT* wrow, int c, Acc w) { wrow[c] = w; }

  struct SAcc {
    Acc v[4][4];
  };
  struct OAcc {
    Acc v[4][4 * NSLOT];  // [i][s * 4 + j]
  };

  template <class A>
  __device__ static __forceinline__ void zero(A& a) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < int(sizeof(a.v[0]) / sizeof(Acc)); ++j) a.v[i][j] = Acc(0);
  }
  __device__ static __forceinline__ void mma_s(SAcc& acc, const T* sQw, const T* sC, int klen, int lane) {
    const int rg = lane >> 3, cg = lane & 7;
    for (int k = 0; k < klen; ++k) {
      Acc q[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) q[i] = to_acc<Acc>(sQw[(rg + 4 * i) * LDX + k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) c[j] = to_acc<Acc>(sC[(cg + 8 * j) * LDX + k]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc.v[i][j] = fma(q[i], c[j], acc.v[i][j]);
    }
  }
  __device__ static __forceinline__ void store_s(const SAcc& acc, Acc* sSw, int lane) {
    const int rg = lane >> 3, cg = lane & 7;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sSw[(rg + 4 * i) * LDS + cg + 8 * j] = acc.v[i][j];
  }
  // O[:, chunk `slot`] += W[16 x BN] @ C[BN x DC]  (sC: that chunk's staged tile)
  __device__ static __forceinline__ void mma_o(OAcc& acc, const Acc* sWw, const T* sC, int, int lane, int slot) {
    const int rg = lane >> 3, cg = lane & 7;
#pragma unroll
    for (int sl = 0; sl < NSLOT; ++sl) {
      if (sl != slot) continue;  // constant register indices after unrolling
      for (int c = 0; c < BN; ++c) {
        Acc w[4], x[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = sWw[(rg + 4 * i) * LDW + c];
#pragma unroll
        for (int j = 0; j < 4; ++j) x[j] = to_acc<Acc>(sC[c * LDX + cg + 8 * j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc.v[i][sl * 4 + j] = fma(w[i], x[j], acc.v[i][sl * 4 + j]);
      }
    }
  }
  __device__ static __forceinline__ void rescale_o(OAcc& acc, const Acc* alpha, Acc*, int, int lane) {
    const int rg = lane >> 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const Acc a = alpha[rg + 4 * i];
#pragma unroll
      for (int j = 0; j < 4 * NSLOT; ++j) acc.v[i][j] *= a;
    }
  }
  template <class RS>
  __device__ static __forceinline__ void store_o(const OAcc& acc, Acc*, Acc* out, int64_t wrow0,
                                                 int64_t nrows, int64_t d0, int64_t D, int lane,
                                                 const RS& rs) {
    const int rg = lane >> 3, cg = lane & 7;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = wrow0 + rg + 4 * i;
      if (row >= nrows) continue;
      const Acc scale = rs(row);
#pragma unroll
      for (int j = 0; j < 4 * NSLOT; ++j) {
        const int64_t d = d0 + (j >> 2) * DC + cg + 8 * (j & 3);
        if (d < D) out[row * D + d] = acc.v[i][j] * scale;
      }
    }
  }
};

}  // namespace cuda
}  // namespace upreid

#endif  // __CUDACC__

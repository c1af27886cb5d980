// Torch-free tile engine shared by the fused contrastive kernels (info_nce, bank_kl).
//
// Tiling (flash-attention style; the [rows x cols] logits never leave the SM):
//   * A thread block (4 warps, 128 threads) owns kBM = 64 "rows" (query rows; for the grad_keys
//     kernel, key rows). Each warp owns 16 of them for the whole kernel, so per-row statistics
//     (running max / sum of the online logsumexp) live in the warp's registers and need only
//     intra-warp shuffles, never a block-wide reduction.
//   * The block streams tiles of BN "cols" (bank rows and/or keys; for grad_keys, query rows)
//     through shared memory. Blocks with the same rows but different blockIdx.y take disjoint
//     ranges of tiles ("splits", as in flash-decoding) so that a small M still fills the GPU; the
//     per-split partial results are combined by a small finalisation kernel.
//   * D is visited in chunks of DC features: the logits tile S[16 x BN] of a warp accumulates
//     over the chunks (rows chunk and cols chunk both staged in shared memory, zero-filled
//     outside the matrix, so no bound checks are needed in the inner loops). When D <= DC the
//     rows chunk is loaded once per block and stays resident.
//   * Tensor cores with 16-byte rows (Pol::kAsync, `vec`): the column tiles are double-buffered and
//     copied global -> shared by cp.async (sm_80+; the pipeline primitives), the first D chunk of
//     tile t + 1 while tile t is formed. Other policies (fp32 rounded to bf16 on load, the CUDA-core
//     tiles with odd padding) and unaligned rows load through registers.
//   * The accumulated S tile is stored to a per-warp shared scratch (fp32/fp64) and handed to an
//     operator-specific epilogue (online logsumexp in forward; gradient weights W in backward).
//   * Backward: the epilogue writes W[16 x BN] (storage type for the tensor-core path, so it can
//     be the A operand of the next product) and the warp accumulates O[16 x OW] += W @ C in
//     registers, OW = NSLOT * DC features per pass (SIMT: 4 chunks of 32; tensor cores: one of 128).
//     The D chunks of a column tile are staged in NSLOT slots, so for D <= OW the chunks S was
//     formed from are still there for O: each logits tile is formed once (2 products per tile;
//     bank_kl's backward 3). For D > OW the output takes D/OW passes, each re-forming S and
//     restaging its chunks (the output accumulator of a whole row would not fit in registers).
//   * Forward with an output (kTrain, info_nce's bank_mean): as the backward, but the epilogue
//     keeps an online-softmax reference max per row; P = exp(S - ref) is the A operand and, when
//     the reference grows, O is rescaled first (Pol::rescale_o). The tensor-core policy lets the
//     row max run up to kOSlack above the reference before it rescales (P <= e^kOSlack stays in
//     fp16 range), so the round trip of O through shared memory is rare; SIMT rescales exactly.
//
// The policies (common/cuda_tile_policies.cuh) implement the products:
//   TcMmaPolicy<half|bf16>: fp16/bf16 inputs, D <= 128 and any D without an output: ldmatrix +
//                         mma.sync.m16n8k16, register accumulators (common/cuda_mma_sync.cuh).
//   TcPolicy<half|bf16>:  WMMA 16x16x16 tensor-core fragments with fp32 accumulation,
//                         BN = 64, DC = 128 (D = 128 in one chunk). TcPolicy<bf16, float>: fp32
//                         inputs rounded to bf16 as they are staged (fp32 precision "medium").
//   TcSplitPolicy:        fp32 precision "high": fp32 inputs staged as bf16 hi + lo planes, three
//                         bf16 WMMA products per product (split-bf16).
//   TcWide<P>:            P with each warp's O in shared memory (one pass covers 256 features).
//   SimtPolicy<T, Acc>:   CUDA-core FMAs, each lane a 4x4 micro-tile, BN = 32, DC = 32; fp32
//                         accumulation for fp32 (and fp16/bf16 on pre-sm80 devices), fp64 for fp64.
// Shared-memory rows are padded (LDX, LDS, LDW) against bank conflicts; every region starts on a
// 128-byte boundary (WMMA needs 32-byte aligned pointers).
#pragma once

#include "common/cuda_tile_policies.cuh"
#include "common/cuda_utils.cuh"
#include "common/precision.h"

#ifdef __CUDACC__

#include <cuda_pipeline_primitives.h>

#include <type_traits>

#include <cstring>
#include <initializer_list>

namespace upreid {
namespace cuda {

// Rows [0, n0) come from p0, rows [n0, n0 + n1) from p1 (both [*, D] row-major), others are zero.
struct RowSrc {
  const void* p0;
  int64_t n0;
  const void* p1;
  int64_t n1;
};

template <class T>
__device__ __forceinline__ const T* row_ptr(const RowSrc& s, int64_t g, int64_t D) {
  if (g < s.n0) return static_cast<const T*>(s.p0) + g * D;
  if (g < s.n0 + s.n1) return static_cast<const T*>(s.p1) + (g - s.n0) * D;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Leading dimension of a shared-memory O (TcWide), 0 for the policies that keep O in registers.
template <class Pol>
constexpr int o_ld() {
  if constexpr (Pol::kOSmem) {
    return Pol::LDO;
  } else {
    return 0;
  }
}

// Shared-memory carve-up of one block (host and device agree on it through this struct).
template <class Pol, int NQ, bool kBwd>
struct SmemLayout {
  using T = typename Pol::T;
  using Acc = typename Pol::Acc;
  using WT = typename Pol::WT;
  static constexpr size_t al(size_t x) { return (x + 127) / 128 * 128; }
  static constexpr size_t q_stride = al(size_t(Pol::kPlanes) * kBM * Pol::LDX * sizeof(T));
  // NSLOT staged D chunks of the column tile (each with its kPlanes planes)
  static constexpr size_t c_slot = size_t(Pol::kPlanes) * Pol::BN * Pol::LDX;  // elements
  static constexpr size_t c_bytes = al(size_t(Pol::NSLOT) * c_slot * sizeof(T));
  static constexpr size_t s_stride = al(size_t(16) * Pol::LDS * sizeof(Acc));
  static constexpr size_t w_stride =
      (kBwd && !Pol::kWInS) ? al(size_t(Pol::kPlanes) * 16 * Pol::LDW * sizeof(WT)) : 0;
  static constexpr size_t col_bytes = al(size_t(Pol::BN) * (3 * sizeof(Acc) + sizeof(int64_t)));
  static constexpr size_t q_off = 0;
  static constexpr size_t c_off = q_off + NQ * q_stride;
  static constexpr size_t s_off = c_off + c_bytes;
  static constexpr size_t w_off = s_off + size_t(NQ) * kWarps * s_stride;
  static constexpr size_t col_off = w_off + size_t(kWarps) * w_stride;
  static constexpr size_t o_stride = (kBwd && Pol::kOSmem) ? al(size_t(16) * o_ld<Pol>() * sizeof(float)) : 0;
  static constexpr size_t o_off = col_off + col_bytes;
  static constexpr size_t bytes = o_off + size_t(kWarps) * o_stride;
  // With the cp.async pipeline (Pol::kAsync): a second set of column slots past everything else
  // (the next tile's first chunk lands there while the current tile is formed).
  static constexpr size_t c2_off = bytes;
  static constexpr size_t bytes_pipe = Pol::kAsync ? c2_off + c_bytes : bytes;
  // kTrain kernels keep each warp's 16 O-rescale factors in the column-scalar area.
  static_assert(col_bytes >= size_t(kWarps) * 16 * sizeof(Acc), "alpha area");
};

// The premise of UPREID_TILE_MIN_BLOCKS: three blocks of the largest fp32 CUDA-core layout (two row
// sets, with an output), each with the 1 KB the runtime reserves, fit sm_80's 164 KB per SM.
static_assert(3 * (SmemLayout<SimtPolicy<float, float>, 2, true>::bytes + 1024) <= 167936,
              "3 CUDA-core blocks no longer fit an sm_80 SM: revisit UPREID_TILE_MIN_BLOCKS");

// Stages rows [r0, r0 + ROWS) x features [d0, d0 + DC) of `src` into s[ROWS][LDX], zero-filled
// outside the matrix. `vec`: 16-byte global loads are legal (D and the pointers are aligned).
template <class Pol, int ROWS>
__device__ __forceinline__ void load_rows(typename Pol::T* s, const RowSrc& src, int64_t r0,
                                          int64_t D, int64_t d0, bool vec, int tid) {
  using T = typename Pol::T;
  using G = typename Pol::G;
  constexpr int DC = Pol::DC, LDX = Pol::LDX;
  if constexpr (!std::is_same<G, T>::value) {
    // fp32 inputs rounded to the tensor-core type as they are staged (split: hi and lo planes)
    for (int idx = tid; idx < ROWS * DC; idx += kThreads) {
      const int r = idx / DC, c = idx % DC;
      const int64_t d = d0 + c;
      const G* p = row_ptr<G>(src, r0 + r, D);
      const float x = p != nullptr && d < D ? to_acc<float>(p[d]) : 0.f;
      const T hi = convert<T>(x);
      s[r * LDX + c] = hi;
      if constexpr (Pol::kPlanes == 2) s[ROWS * LDX + r * LDX + c] = convert<T>(x - to_acc<float>(hi));
    }
  } else if (vec) {
    constexpr int V = 16 / int(sizeof(T));
    constexpr int VPR = DC / V;
    for (int idx = tid; idx < ROWS * VPR; idx += kThreads) {
      const int r = idx / VPR, v = idx % VPR;
      const int64_t d = d0 + int64_t(v) * V;
      const T* p = row_ptr<T>(src, r0 + r, D);
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (p != nullptr && d < D) val = *reinterpret_cast<const uint4*>(p + d);
      T* dst = s + r * LDX + v * V;
      if constexpr (Pol::kSmemVec) {
        *reinterpret_cast<uint4*>(dst) = val;
      } else {
        T e[V];  // memcpy, not a T* view of the uint4: that would break strict aliasing
        memcpy(e, &val, sizeof(e));
#pragma unroll
        for (int i = 0; i < V; ++i) dst[i] = e[i];
      }
    }
  } else {
    for (int idx = tid; idx < ROWS * DC; idx += kThreads) {
      const int r = idx / DC, c = idx % DC;
      const int64_t d = d0 + c;
      const T* p = row_ptr<T>(src, r0 + r, D);
      T val;
      if (p != nullptr && d < D) {
        val = p[d];
      } else {
        memset(&val, 0, sizeof(T));  // +0.0 in every format
      }
      s[r * LDX + c] = val;
    }
  }
}

// load_rows for Pol::kAsync with 16-byte loads legal (`vec`): the in-range 16-byte pieces are issued
// as cp.async copies (the caller commits and waits), the rest zero-filled by plain stores.
template <class Pol, int ROWS>
__device__ __forceinline__ void load_rows_async(typename Pol::T* s, const RowSrc& src, int64_t r0,
                                                int64_t D, int64_t d0, int tid) {
  using T = typename Pol::T;
  constexpr int V = 16 / int(sizeof(T)), VPR = Pol::DC / V, LDX = Pol::LDX;
  for (int idx = tid; idx < ROWS * VPR; idx += kThreads) {
    const int r = idx / VPR, v = idx % VPR;
    const int64_t d = d0 + int64_t(v) * V;
    const T* p = row_ptr<T>(src, r0 + r, D);
    T* dst = s + r * LDX + v * V;
    if (p != nullptr && d < D) {
      __pipeline_memcpy_async(dst, p + d, 16);
    } else {
      *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// The block loop: rows [blockIdx.x * kBM, +kBM) of NQ row matrices against column tiles
// [t_begin, t_end) of `cols`. Epi (see the operator files) supplies:
//   load_cols(c0, tid)                 block-wide, once per tile before the first barrier
//   tile(sS[NQ], sW, c0, wrow0, lane)  per warp, on the finished logits tile(s)
//   row_scale(row)                     backward / kTrain: factor applied when storing O
//   finish(wrow0, lane)                forward: write the per-row partial statistics
// kTrain (forward with an output O += P @ C) also needs:
//   has_out(c0)                        block-uniform: does this tile feed O (else P is not written)
//   rescale_pending(), alpha()         warp-uniform flag set by tile(); the warp's 16 factors
//   finish_pass(oc, wrow0, lane)       after output pass oc: per-row statistics, reset the state
// Backward and kTrain store O (the split's partial [nrows, D]) to `out`.
template <class Pol, int NQ, bool kBwd, bool kTrain = false, class Epi>
__device__ __forceinline__ void run_tiles(unsigned char* smem, const RowSrc (&qsrc)[NQ],
                                          int64_t nrows, const RowSrc& csrc, int64_t D, int mode,
                                          int64_t t_begin, int64_t t_end,
                                          typename Pol::Acc* out, Epi& epi) {
  using T = typename Pol::T;
  using Acc = typename Pol::Acc;
  using WT = typename Pol::WT;
  static_assert(!(kBwd && kTrain), "kTrain is a forward mode");
  constexpr bool kOut = kBwd || kTrain;  // accumulates O[16 x DC] per warp
  using L = SmemLayout<Pol, NQ, kOut>;
  constexpr int BN = Pol::BN, DC = Pol::DC, LDX = Pol::LDX;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t row0 = int64_t(blockIdx.x) * kBM;
  const int64_t wrow0 = row0 + warp * 16;

  T* sQ[NQ];
  Acc* sS[NQ];
#pragma unroll
  for (int k = 0; k < NQ; ++k) {
    sQ[k] = reinterpret_cast<T*>(smem + L::q_off + k * L::q_stride);
    sS[k] = reinterpret_cast<Acc*>(smem + L::s_off + (size_t(k) * kWarps + warp) * L::s_stride);
  }
  // mode (load_mode()): 0 element loads, 1 16-byte loads, 2 16-byte loads and the cp.async pipeline
  // (Pol::kAsync, the launch has L::bytes_pipe of shared memory; block-uniform): while tile t is
  // formed, its successor's first D chunk is copied into the other column buffer, so for D <= DC
  // every column tile but the first arrives behind the previous tile's products.
  const bool vec = mode != 0, pipe = Pol::kAsync && mode == 2;
  T* const sCb[2] = {reinterpret_cast<T*>(smem + L::c_off), reinterpret_cast<T*>(smem + L::c2_off)};
  WT* sW;
  if constexpr (Pol::kWInS) {
    sW = reinterpret_cast<WT*>(sS[0]);
  } else {
    sW = reinterpret_cast<WT*>(smem + L::w_off + size_t(warp) * L::w_stride);
  }

  const int nD = D > 0 ? int((D + DC - 1) / DC) : 1;
  const bool q_once = nD == 1;  // the rows chunk stays resident for the whole kernel
  // O covers OW = NSLOT chunks per pass; the D chunks of a column tile go to slot dc % NSLOT, so
  // when D <= OW (one pass) every chunk is still staged when O needs it: each logits tile is formed
  // once. Otherwise (D > OW) each pass recomputes the logits and restages its chunks.
  constexpr int NSLOT = Pol::NSLOT;
  constexpr int CPP = Pol::OW / DC;  // D chunks per output pass (NSLOT, or more for TcWide)
  static_assert(NSLOT == CPP || NSLOT == 1, "staging slots: one per chunk of a pass, or one");
  constexpr size_t CSLOT = L::c_slot;
  const bool c_resident = nD <= NSLOT;
  const int nPass = kOut ? (nD + CPP - 1) / CPP : 1;
  if (q_once) {
#pragma unroll
    for (int k = 0; k < NQ; ++k) load_rows<Pol, kBM>(sQ[k], qsrc[k], row0, D, 0, vec, tid);
    // (the barrier after the first column load orders these stores)
  }

  for (int ps = 0; ps < nPass; ++ps) {
    typename Pol::OAcc o;
    if constexpr (Pol::kOSmem) o.o = reinterpret_cast<float*>(smem + L::o_off + size_t(warp) * L::o_stride);
    if constexpr (kOut) Pol::zero(o);
    const int64_t prem = D - int64_t(ps) * Pol::OW;
    const int pdlen = int(prem < Pol::OW ? prem : Pol::OW);  // features of this pass
    (void)pdlen;
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t c0 = t * BN;
      T* const sC = sCb[pipe && ((t - t_begin) & 1)];  // this tile's buffer
      typename Pol::SAcc s[NQ];
#pragma unroll
      for (int k = 0; k < NQ; ++k) Pol::zero(s[k]);
      for (int dc = 0; dc < nD; ++dc) {
        if (dc > 0) {
          __syncthreads();  // every warp is done with the previous chunk
        } else {
          epi.load_cols(c0, tid);
        }
        const int64_t d0 = int64_t(dc) * DC;
        if (!q_once) {
#pragma unroll
          for (int k = 0; k < NQ; ++k) load_rows<Pol, kBM>(sQ[k], qsrc[k], row0, D, d0, vec, tid);
        }
        T* sCd = sC + (dc % NSLOT) * CSLOT;
        bool copied = false;  // the chunk came by cp.async
        if constexpr (Pol::kAsync) {
          if (pipe && dc == 0) {
            // The other buffer was last read by tile t - 1, which every thread has left (its end
            // barrier), so the successor's copy can start now. One commit group per tile.
            if (t == t_begin) {
              load_rows_async<Pol, BN>(sCd, csrc, c0, D, 0, tid);
              __pipeline_commit();
            }
            if (t + 1 < t_end) load_rows_async<Pol, BN>(sCb[sC == sCb[0]], csrc, c0 + BN, D, 0, tid);
            __pipeline_commit();
            __pipeline_wait_prior(1);  // this thread's copies of tile t have landed
            copied = true;
          }
        }
        if (!copied) load_rows<Pol, BN>(sCd, csrc, c0, D, d0, vec, tid);
        __syncthreads();  // every thread's copies and stores of the chunk are visible
        const int64_t rem = D - d0;
        const int kraw = rem <= 0 ? 0 : (rem < DC ? int(rem) : DC);
        const int klen = (kraw + Pol::KSTEP - 1) / Pol::KSTEP * Pol::KSTEP;  // zero-padded to DC
#pragma unroll
        for (int k = 0; k < NQ; ++k) Pol::mma_s(s[k], sQ[k] + warp * 16 * LDX, sCd, klen, lane);
      }
#pragma unroll
      for (int k = 0; k < NQ; ++k) Pol::store_s(s[k], sS[k], lane);
      __syncwarp();
      epi.tile(sS, sW, c0, wrow0, lane);
      __syncwarp();
      if constexpr (kOut) {
        bool use = true;
        if constexpr (kTrain) {
          // sS is free again (P went to sW; SIMT: rescale_o needs no scratch)
          if (epi.rescale_pending()) Pol::rescale_o(o, epi.alpha(), sS[0], pdlen, lane);
          use = epi.has_out(c0);  // block-uniform: the barriers below are safe
        }
        if (use) {
          if (!c_resident && NSLOT == CPP) {  // stage this pass's chunks of the column tile again
            __syncthreads();
            for (int sl = 0; sl < NSLOT; ++sl) {
              const int chunk = ps * CPP + sl;
              if (chunk < nD) load_rows<Pol, BN>(sC + sl * CSLOT, csrc, c0, D, int64_t(chunk) * DC, vec, tid);
            }
            __syncthreads();
          }
          // One staging slot (TcWide): the chunks one by one, last first (chunk nD - 1 is still
          // staged from forming S).
          int staged = nD - 1;
          for (int k = 0; k < CPP; ++k) {
            const int cc = NSLOT == CPP ? k : CPP - 1 - k;
            const int chunk = ps * CPP + cc;
            if (chunk >= nD) continue;
            if (NSLOT != CPP && chunk != staged) {
              __syncthreads();  // every warp is done with the staged chunk
              load_rows<Pol, BN>(sC, csrc, c0, D, int64_t(chunk) * DC, vec, tid);
              __syncthreads();
              staged = chunk;
            }
            const int64_t rem = D - int64_t(chunk) * DC;
            const int dlen = int(rem < DC ? rem : DC);
            Pol::mma_o(o, sW, sC + (NSLOT == CPP ? cc : 0) * CSLOT, dlen, lane, cc);
          }
        }
      }
      __syncthreads();  // sC, sQ and the column scalars are overwritten by the next tile
    }
    if constexpr (kOut) {
      Pol::store_o(o, sS[0], out, wrow0, nrows, int64_t(ps) * Pol::OW, D, lane,
                   [&](int64_t r) { return epi.row_scale(r); });
      __syncwarp();
    }
    if constexpr (kTrain) epi.finish_pass(ps, wrow0, lane);
  }
  if constexpr (!kOut) epi.finish(wrow0, lane);
}

// Epilogue lane mapping: lane l handles row r = l / 2 of its warp and columns h + 2j (h = l % 2).
struct EpiLane {
  int r, h;
  __device__ __forceinline__ explicit EpiLane(int lane) : r(lane >> 1), h(lane & 1) {}
};

// ---------------------------------------------------------------------------------------------
// Small kernels shared by the operators.

// out[i] = scale * sum_s ws[s * n + i]   (combines the per-split partial outputs, deterministic)
template <class Acc>
__global__ void reduce_splits_kernel(const Acc* __restrict__ ws, int nsplit, int64_t n, Acc scale,
                                     Acc* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    Acc s = Acc(0);
    for (int k = 0; k < nsplit; ++k) s += ws[int64_t(k) * n + i];
    out[i] = s * scale;
  }
}

// Tensor-core policies guard their kernels: WMMA bf16 exists from sm_80 on. The host never launches
// them on older devices; the guard only keeps builds for older architectures compiling.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define UPREID_TC_UNAVAILABLE 1
#else
#define UPREID_TC_UNAVAILABLE 0
#endif

}  // namespace cuda
}  // namespace upreid

#endif  // __CUDACC__

// ---------------------------------------------------------------------------------------------
// Host helpers (nvcc host code; the kernels' launchers).
#ifdef __CUDACC__
namespace upreid {
namespace cuda {

struct DeviceInfo {
  int sms = 1;
  int major = 0;
  int arch = 0;  // the architecture this binary's code for the device was built for (e.g. 75, 90)
  int smem_optin = 48 * 1024;  // dynamic shared memory a block may opt in to
};

inline cudaError_t device_info(DeviceInfo* info) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info->sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info->major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  // What the device runs is what was compiled for it, not what it could run: a build without
  // sm_80+ code (or whose PTX is older, JIT-compiled) has the tensor-core kernels guarded out.
  cudaFuncAttributes fa;
  e = cudaFuncGetAttributes(&fa, reduce_splits_kernel<float>);
  if (e != cudaSuccess) return e;
  info->arch = fa.ptxVersion < fa.binaryVersion ? fa.ptxVersion : fa.binaryVersion;
  return cudaSuccess;
}

// Opts the kernel in to `smem` bytes of dynamic shared memory (above the 48 KB default) and reports
// how many blocks fit on one SM.
template <class K>
inline cudaError_t prepare_kernel(K kernel, size_t smem, int* blocks_per_sm) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (e != cudaSuccess) return e;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks_per_sm, kernel, kThreads, smem);
  if (e != cudaSuccess) return e;
  if (*blocks_per_sm < 1) *blocks_per_sm = 1;
  return cudaSuccess;
}

// Number of column splits: as many as fit in one wave next to the other row blocks (rounded down, so
// that a wave is never followed by a small tail wave), at most one per tile and at most 128 (the
// partial outputs cost splits x rows x D words).
inline int choose_splits(int64_t row_blocks, int64_t ntiles, const DeviceInfo& dev, int blocks_per_sm) {
  if (ntiles <= 0 || row_blocks <= 0) return 0;
  const int64_t slots = int64_t(dev.sms) * blocks_per_sm;
  int64_t s = slots / row_blocks;
  if (s > ntiles) s = ntiles;
  if (s > 128) s = 128;
  if (s < 1) s = 1;
  return int(s);
}

template <class Acc>
inline cudaError_t launch_reduce_splits(const Acc* ws, int nsplit, int64_t n, Acc scale, Acc* out,
                                        cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  int64_t blocks = (n + 255) / 256;
  if (blocks > 8192) blocks = 8192;
  launch(reduce_splits_kernel<Acc>, unsigned(blocks), 256, 0, stream, ws, nsplit, n, scale, out);
  return cudaGetLastError();
}

// Calls f(Policy{}) with the tile policy for a dtype: tensor cores for fp16/bf16 on sm_80+ devices
// running sm_80+ code; fp32 by `fp32_precision` (precision.h): "medium" rounds the operands to bf16
// for the tensor cores (fp32 accumulation), "high" splits them into bf16 hi + lo parts (three
// tensor-core products, TcSplitPolicy; CUDA cores where its shared memory does not fit), "highest"
// keeps fp32 FMAs on the CUDA cores.
template <class F>
inline cudaError_t dispatch_policy(DType dt, const DeviceInfo& dev, int fp32_precision, F&& f) {
  const bool tc = dev.major >= 8 && dev.arch >= 80;
  switch (dt) {
    case DType::kF16:
      return tc ? f(TcMmaPolicy<__half>{}) : f(SimtPolicy<__half, float>{});
    case DType::kBF16:
      return tc ? f(TcMmaPolicy<__nv_bfloat16>{}) : f(SimtPolicy<__nv_bfloat16, float>{});
    case DType::kF32:
      if (tc && fp32_precision == int(Fp32Precision::kMedium)) return f(TcPolicy<__nv_bfloat16, float>{});
      // split-bf16 stages two planes: only where its largest block (bank_kl's backward) fits;
      // devices with less shared memory (sm_86/sm_89: 99 KB) keep fp32 on the CUDA cores
      if (tc && fp32_precision == int(Fp32Precision::kHigh) &&
          SmemLayout<TcSplitPolicy, 2, true>::bytes <= size_t(dev.smem_optin))
        return f(TcSplitPolicy{});
      return f(SimtPolicy<float, float>{});
    case DType::kF64:
      return f(SimtPolicy<double, double>{});
  }
  return cudaErrorInvalidValue;
}

// Calls f(TcWide<Pol>{}) for a tensor-core policy when D needs more than one chunk and TcWide's
// shared memory (NQ row sets, an output) fits the device; f(Pol{}) otherwise.
template <class Pol, int NQ, class F>
inline cudaError_t maybe_wide(Pol pol, int64_t D, const DeviceInfo& dev, F&& f) {
  if constexpr (Pol::kTensorCore && !Pol::kOSmem) {
    // TcWide keeps O in shared memory through WMMA fragments: the mma.sync policy widens its WMMA twin
    using W = TcWide<typename std::conditional<Pol::kMmaSync, TcPolicy<typename Pol::T>, Pol>::type>;
    if (D > Pol::DC && SmemLayout<W, NQ, true>::bytes <= size_t(dev.smem_optin)) return f(W{});
  }
  return f(pol);
}

// Dynamic shared memory and resident blocks per SM of a tile kernel's launches: with the cp.async
// pipeline's second column buffer (SmemLayout::bytes_pipe) only where it fits the device and costs
// no resident block (the occupancy query counts the kernel's registers too); SmemLayout::bytes
// otherwise. Deterministic, so a workspace query and the launch agree.
template <class Pol, int NQ, bool kOut, class K>
inline cudaError_t tile_launch_smem(K kernel, const DeviceInfo& dev, size_t* smem, int* blocks_per_sm) {
  using L = SmemLayout<Pol, NQ, kOut>;
  *smem = L::bytes;
  cudaError_t e = prepare_kernel(kernel, L::bytes, blocks_per_sm);
  if (e != cudaSuccess || L::bytes_pipe == L::bytes || L::bytes_pipe > size_t(dev.smem_optin)) return e;
  int piped = 0;  // (leaves the kernel's opt-in at the larger size, which admits either)
  if ((e = prepare_kernel(kernel, L::bytes_pipe, &piped)) != cudaSuccess) return e;
  if (piped >= *blocks_per_sm) *smem = L::bytes_pipe;
  return cudaSuccess;
}

// run_tiles' load mode for a launch with `smem` bytes (tile_launch_smem): 0 element loads, 1 16-byte loads
// (`vec`: vec_ok()), 2 16-byte loads and the cp.async pipeline.
template <class Pol, int NQ, bool kOut>
inline int load_mode(bool vec, size_t smem) {
  using L = SmemLayout<Pol, NQ, kOut>;
  if (!vec) return 0;
  return Pol::kAsync && L::bytes_pipe != L::bytes && smem >= L::bytes_pipe ? 2 : 1;
}

// True when 16-byte loads of rows of D elements of `esize` bytes are legal for every pointer.
inline bool vec_ok(int64_t D, size_t esize, std::initializer_list<const void*> ptrs) {
  if ((D * int64_t(esize)) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace cuda
}  // namespace upreid
#endif  // __CUDACC__

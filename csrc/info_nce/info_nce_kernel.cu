// info_nce CUDA kernels (torch-free). Math as in info_nce_cpu.cpp:
//   qs_i = query_i / t;  S_ic = qs_i . C_c over the columns C of row i
//   lse_i = logsumexp_c S_ic;  loss_i = lse_i - qs_i . keys[positive_i]
//   backward: W_ic = (grad_loss_i + grad_lse_i) exp(S_ic - lse_i) - grad_loss_i [c = positive_i]
//             grad_query_i = sum_c W_ic C_c / t;  grad_keys_j = sum_i W_ij query_i / t (keys only).
// Columns of row i: every key and every bank row when group_size is 0 (or N), else the bank rows
// plus the g keys of the row's group [positive_i / g * g, +g).
//
// Tiling (see common/cuda_tiles.cuh for the block loop). Nothing of size [M x (N + K)] exists:
//   forward   nce_fwd_tiles   grid (M/64, splits): each block runs an online logsumexp over its
//                             split of the column tiles (keys when all-keys, then the bank) and
//                             writes one partial lse per row and split ([splits, M]).
//             nce_fwd_finalize one warp per row: combines the split partials, folds in the group
//                             keys (group mode: g warp dot products) and subtracts the positive
//                             logit. Group keys are handled here and not as tiles because every
//                             row has its own small set of g keys (g = 1 for MoCo).
//   backward  nce_dq_tiles    same grid as forward; recomputes each logits tile, forms
//                             P = exp(S - lse) (the per-row factor grad_loss + grad_lse is applied
//                             once at the end, which keeps fp16 P in [0, 1] instead of underflowing),
//                             and accumulates P @ C_tile on tensor cores; writes per-split partials.
//             nce_dk_tiles    (all-keys mode only) the transposed problem: a block owns 64 KEYS and
//                             streams query tiles, W^T = coef_i exp(S^T - lse_i) - grad_loss_i at the
//                             positive, grad_keys += W^T @ query_tile. A separate kernel instead of
//                             atomics: the result is deterministic, needs no [N, D] atomic traffic
//                             from every row block, and only the N keys (not the K bank rows) are
//                             revisited. fp16 W^T is divided by max_i |coef_i|, |grad_loss_i|
//                             (one tiny kernel) to stay in range; the factor is restored at the end.
//             nce_bwd_finalize one warp per row: sums the split partials, adds the group keys'
//                             terms (grad_keys by atomics here: which rows hit a key depends on the
//                             data, and g is small) and the positive's -grad_loss terms, scales by 1/t.
// Training variant (_info_nce_train, _info_nce_train_backward):
//   forward   nce_fwd_train_tiles as nce_fwd_tiles, and for tiles with bank columns also
//                             O += P @ bank_tile (P = exp(S - ref), ref = the row's running max up
//                             to the policy's slack, O rescaled when ref moves; P is 0 on key
//                             columns). D > DC: D/DC output passes, each recomputing the logits.
//                             Per split and row: partial lse, ref per pass ([splits, passes, M]),
//                             O ([splits, M, D]).
//             nce_fwd_finalize also combines bank_mean_i = sum_s exp(ref_s - lse_i) O_s (fixed
//                             split order: deterministic). lse_i includes the group keys, so a max
//                             reached on key columns is accounted for by the final normalisation.
//   backward  the backward above with the bank left out (K = 0 for the tile kernels);
//             nce_bwd_finalize adds (grad_loss + grad_lse)_i bank_mean_i before the 1/t.
#include "info_nce/info_nce_kernel.cuh"

#include "common/cuda_softmax_epi.cuh"
#include "common/cuda_tiles.cuh"

namespace upreid {
namespace cuda {
namespace {

template <class Acc>
struct NceTileArgs {
  RowSrc rows;
  int64_t nrows;
  RowSrc cols;
  int64_t ncols;
  int64_t D;
  int vec;  // load_mode()
  int nsplit;
  int64_t ntiles;
  Acc scale;
  Acc* ws;            // fwd: partial lse [nsplit, nrows]; bwd: partial output [nsplit, nrows, D]
  const Acc* lse;     // per row (dq) or per column (dk)
  const Acc* gl;
  const Acc* gls;
  const int64_t* pos; // dk: positive of each column (query row)
  const Acc* gscale;  // dk: weight normaliser (nullptr: 1)
  int64_t nkeys;      // train fwd: columns [0, nkeys) are keys (no bank_mean term)
  Acc* mref;          // train fwd: O's reference max [nsplit, passes, nrows]
  Acc* obuf;          // train fwd: partial O [nsplit, nrows, D]
};

__device__ __forceinline__ void split_range(int64_t ntiles, int nsplit, int64_t* tb, int64_t* te) {
  const int64_t s = blockIdx.y;
  *tb = s * ntiles / nsplit;
  *te = (s + 1) * ntiles / nsplit;
}

// ---- epilogues -------------------------------------------------------------------------------

template <class Pol>
struct DqEpi {
  using Acc = typename Pol::Acc;
  using WT = typename Pol::WT;
  Acc scale;
  int64_t ncols;
  Acc lse_r;  // lse of this lane's row
  const Acc* gl;
  const Acc* gls;

  __device__ __forceinline__ void load_cols(int64_t, int) {}
  __device__ __forceinline__ void tile(Acc* const* sS, WT* sW, int64_t c0, int64_t, int lane) {
    const EpiLane el(lane);
    const Acc* row = sS[0] + el.r * Pol::LDS;
    WT* wrow = sW + el.r * Pol::LDW;
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int c = el.h + 2 * j;
      Acc w = Acc(0);
      if (c0 + c < ncols) w = Pol::ex(row[c] * scale - lse_r);
      Pol::put_w(wrow, c, w);  // in place for SIMT: same element just read
    }
  }
  __device__ __forceinline__ Acc row_scale(int64_t r) const { return gl[r] + gls[r]; }
  __device__ __forceinline__ void finish(int64_t, int) {}
};

template <class Pol>
struct DkEpi {
  using Acc = typename Pol::Acc;
  using WT = typename Pol::WT;
  Acc scale, gs, inv_gs;
  int64_t ncols;  // = M (columns are query rows)
  const Acc* lse;
  const Acc* gl;
  const Acc* gls;
  const int64_t* pos;
  Acc* s_lse;
  Acc* s_coef;
  Acc* s_gl;
  int64_t* s_pos;

  __device__ __forceinline__ void load_cols(int64_t c0, int tid) {
    for (int c = tid; c < Pol::BN; c += kThreads) {
      const int64_t i = c0 + c;
      if (i < ncols) {
        s_lse[c] = lse[i];
        s_coef[c] = (gl[i] + gls[i]) * inv_gs;
        s_gl[c] = gl[i] * inv_gs;
        s_pos[c] = pos[i];
      } else {
        s_lse[c] = Acc(0);
        s_coef[c] = Acc(0);
        s_gl[c] = Acc(0);
        s_pos[c] = -1;
      }
    }
  }
  __device__ __forceinline__ void tile(Acc* const* sS, WT* sW, int64_t c0, int64_t wrow0, int lane) {
    const EpiLane el(lane);
    const int64_t key = wrow0 + el.r;
    const Acc* row = sS[0] + el.r * Pol::LDS;
    WT* wrow = sW + el.r * Pol::LDW;
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int c = el.h + 2 * j;
      Acc w = Acc(0);
      if (c0 + c < ncols) {
        w = s_coef[c] * Pol::ex(row[c] * scale - s_lse[c]);
        if (s_pos[c] == key) w -= s_gl[c];
      }
      Pol::put_w(wrow, c, w);
    }
  }
  __device__ __forceinline__ Acc row_scale(int64_t) const { return gs; }
  __device__ __forceinline__ void finish(int64_t, int) {}
};

// ---- tile kernels ----------------------------------------------------------------------------

template <class Pol>
__global__ void __launch_bounds__(kThreads, UPREID_TILE_MIN_BLOCKS(Pol)) nce_fwd_tiles(NceTileArgs<typename Pol::Acc> a) {
  if constexpr (Pol::kTensorCore && UPREID_TC_UNAVAILABLE) {
    __trap();
  } else {
    using Acc = typename Pol::Acc;
    UPREID_DYNAMIC_SMEM(smem, 128);
    int64_t tb, te;
    split_range(a.ntiles, a.nsplit, &tb, &te);
    FwdEpi<Pol> epi{a.scale, a.ncols, a.nrows, a.ws + int64_t(blockIdx.y) * a.nrows};
    const RowSrc q[1] = {a.rows};
    run_tiles<Pol, 1, false>(smem, q, a.nrows, a.cols, a.D, a.vec, tb, te, static_cast<Acc*>(nullptr), epi);
  }
}

template <class Pol>
__global__ void __launch_bounds__(kThreads, UPREID_TILE_MIN_BLOCKS(Pol)) nce_fwd_train_tiles(NceTileArgs<typename Pol::Acc> a) {
  if constexpr (Pol::kTensorCore && UPREID_TC_UNAVAILABLE) {
    __trap();
  } else {
    using Acc = typename Pol::Acc;
    using L = SmemLayout<Pol, 1, true>;
    UPREID_DYNAMIC_SMEM(smem, 128);
    int64_t tb, te;
    split_range(a.ntiles, a.nsplit, &tb, &te);
    const int64_t passes = a.D > 0 ? (a.D + Pol::OW - 1) / Pol::OW : 1;
    Acc* alpha = reinterpret_cast<Acc*>(smem + L::col_off) + (threadIdx.x >> 5) * 16;
    TrainEpi<Pol> epi{{a.scale, a.ncols, a.nrows, a.ws + int64_t(blockIdx.y) * a.nrows},
                      a.nkeys, a.mref + int64_t(blockIdx.y) * passes * a.nrows, alpha};
    const RowSrc q[1] = {a.rows};
    Acc* out = a.obuf + int64_t(blockIdx.y) * a.nrows * a.D;
    run_tiles<Pol, 1, false, true>(smem, q, a.nrows, a.cols, a.D, a.vec, tb, te, out, epi);
  }
}

template <class Pol>
__global__ void __launch_bounds__(kThreads, UPREID_TILE_MIN_BLOCKS(Pol)) nce_dq_tiles(NceTileArgs<typename Pol::Acc> a) {
  if constexpr (Pol::kTensorCore && UPREID_TC_UNAVAILABLE) {
    __trap();
  } else {
    using Acc = typename Pol::Acc;
    UPREID_DYNAMIC_SMEM(smem, 128);
    int64_t tb, te;
    split_range(a.ntiles, a.nsplit, &tb, &te);
    const int64_t my_row = int64_t(blockIdx.x) * kBM + (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 1);
    DqEpi<Pol> epi{a.scale, a.ncols, my_row < a.nrows ? a.lse[my_row] : Acc(0), a.gl, a.gls};
    const RowSrc q[1] = {a.rows};
    Acc* out = a.ws + int64_t(blockIdx.y) * a.nrows * a.D;
    run_tiles<Pol, 1, true>(smem, q, a.nrows, a.cols, a.D, a.vec, tb, te, out, epi);
  }
}

template <class Pol>
__global__ void __launch_bounds__(kThreads, UPREID_TILE_MIN_BLOCKS(Pol)) nce_dk_tiles(NceTileArgs<typename Pol::Acc> a) {
  if constexpr (Pol::kTensorCore && UPREID_TC_UNAVAILABLE) {
    __trap();
  } else {
    using Acc = typename Pol::Acc;
    using L = SmemLayout<Pol, 1, true>;
    UPREID_DYNAMIC_SMEM(smem, 128);
    int64_t tb, te;
    split_range(a.ntiles, a.nsplit, &tb, &te);
    const Acc gs = a.gscale != nullptr ? *a.gscale : Acc(1);
    Acc* cols = reinterpret_cast<Acc*>(smem + L::col_off);
    DkEpi<Pol> epi{a.scale, gs, Acc(1) / gs, a.ncols, a.lse, a.gl, a.gls, a.pos,
                   cols, cols + Pol::BN, cols + 2 * Pol::BN,
                   reinterpret_cast<int64_t*>(cols + 3 * Pol::BN)};
    const RowSrc q[1] = {a.rows};
    Acc* out = a.ws + int64_t(blockIdx.y) * a.nrows * a.D;
    run_tiles<Pol, 1, true>(smem, q, a.nrows, a.cols, a.D, a.vec, tb, te, out, epi);
  }
}

// max_i max(|grad_loss_i + grad_lse_i|, |grad_loss_i|), or 1 when that is 0 or not finite.
__global__ void coef_absmax_kernel(const float* gl, const float* gls, int64_t M, float* out) {
  __shared__ float red[32];
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < M; i += blockDim.x) v = fmaxf(v, fmaxf(fabsf(gl[i] + gls[i]), fabsf(gl[i])));
  v = block_max(v, red);
  if (threadIdx.x == 0) out[0] = (v > 0.f && v < INFINITY) ? v : 1.f;
}

// ---- per-row finalisation ----------------------------------------------------------------------

template <class Acc>
struct NceRowArgs {
  const void* query;
  const void* keys;
  const int64_t* pos;
  int64_t M, D, g;
  bool all_keys;
  Acc scale;
  const Acc* ws;  // split partials (fwd: [nsplit, M]; bwd: [nsplit, M, D])
  int nsplit;
  Acc* loss;
  Acc* lse;
  const Acc* gl;
  const Acc* gls;
  const Acc* lse_in;
  Acc* gq;
  Acc* gk;
  // training variant
  const Acc* mref;         // fwd: [nsplit, passes, M]
  const Acc* obuf;         // fwd: [nsplit, M, D]
  int dc, passes;          // fwd: features per output pass
  Acc* bank_mean;          // fwd output [M, D] (nullptr: plain forward)
  const Acc* bank_mean_in; // bwd input [M, D] (nullptr: plain backward)
};

constexpr int kRowWarps = 8;  // rows (warps) per finalisation block

template <class T, class Acc>
__global__ void __launch_bounds__(kRowWarps * 32) nce_fwd_finalize(NceRowArgs<Acc> a) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (i >= a.M) return;  // whole warp
  const T* q = static_cast<const T*>(a.query) + i * a.D;
  const T* keys = static_cast<const T*>(a.keys);
  const int64_t p = a.pos[i];
  OnlineLse<Acc> st;
  for (int s = 0; s < a.nsplit; ++s) st.add(a.ws[int64_t(s) * a.M + i]);
  if (!a.all_keys) {
    const int64_t j0 = p / a.g * a.g;
    for (int64_t j = j0; j < j0 + a.g; ++j) st.add(warp_dot<Acc>(q, keys + j * a.D, a.D, lane) * a.scale);
  }
  const Acc xp = warp_dot<Acc>(q, keys + p * a.D, a.D, lane) * a.scale;
  const Acc l = st.value();  // every lane folded the same values
  if (lane == 0) {
    a.lse[i] = l;
    a.loss[i] = l - xp;
  }
  if (a.bank_mean != nullptr) {
    // bank_mean_i = sum_k exp(S_ik - lse_i) b_k = sum_s exp(ref_s - lse_i) O_s (splits in order)
    for (int64_t d = lane; d < a.D; d += 32) {
      const int64_t oc = d / a.dc;
      Acc v = Acc(0);
      for (int s = 0; s < a.nsplit; ++s) {
        const Acc r = a.mref[(int64_t(s) * a.passes + oc) * a.M + i];
        if (r != neg_inf<Acc>()) v += acc_exp_precise(r - l) * a.obuf[(int64_t(s) * a.M + i) * a.D + d];
      }
      a.bank_mean[i * a.D + d] = v;
    }
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(kRowWarps * 32) nce_bwd_finalize(NceRowArgs<Acc> a) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * kRowWarps + (threadIdx.x >> 5);
  if (i >= a.M) return;
  const int64_t D = a.D;
  const T* q = static_cast<const T*>(a.query) + i * D;
  const T* keys = static_cast<const T*>(a.keys);
  const int64_t p = a.pos[i];
  const Acc glr = a.gl[i], coef = glr + a.gls[i], L = a.lse_in[i];
  // gq / gk are null when that gradient is not needed (warp-uniform branches)
  Acc* gq = a.gq != nullptr ? a.gq + i * D : nullptr;
  Acc* gk = a.all_keys ? nullptr : a.gk;  // all-keys grad_keys comes from nce_dk_tiles
  const T* kp = keys + p * D;
  for (int64_t d = lane; d < D; d += 32) {
    if (gq != nullptr) {
      Acc s = Acc(0);
      for (int k = 0; k < a.nsplit; ++k) s += a.ws[(int64_t(k) * a.M + i) * D + d];
      if (a.bank_mean_in != nullptr) s += coef * a.bank_mean_in[i * D + d];  // the bank's part
      gq[d] = s - glr * to_acc<Acc>(kp[d]);
    }
    if (gk != nullptr) atomicAdd(gk + p * D + d, -glr * to_acc<Acc>(q[d]) * a.scale);
  }
  if (!a.all_keys) {
    const int64_t j0 = p / a.g * a.g;
    for (int64_t j = j0; j < j0 + a.g; ++j) {
      const T* kj = keys + j * D;
      const Acc w = coef * acc_exp_precise(warp_dot<Acc>(q, kj, D, lane) * a.scale - L);
      for (int64_t d = lane; d < D; d += 32) {
        if (gq != nullptr) gq[d] += w * to_acc<Acc>(kj[d]);
        if (gk != nullptr) atomicAdd(gk + j * D + d, w * to_acc<Acc>(q[d]) * a.scale);
      }
    }
  }
  if (gq != nullptr)
    for (int64_t d = lane; d < D; d += 32) gq[d] *= a.scale;
}

// ---- launchers -----------------------------------------------------------------------------------

bool all_keys_mode(const InfoNceParams& p) { return p.group_size == 0 || p.group_size == p.N; }

template <class Pol>
NceRowArgs<typename Pol::Acc> row_args(const InfoNceParams& p) {
  using Acc = typename Pol::Acc;
  NceRowArgs<Acc> r{};
  r.query = p.query;
  r.keys = p.keys;
  r.pos = p.positive;
  r.M = p.M;
  r.D = p.D;
  r.g = p.group_size;
  r.all_keys = all_keys_mode(p);
  r.scale = Acc(1.0 / p.temperature);
  return r;
}

// bytes != nullptr: only report the workspace size. Otherwise launch.
// train: also bank_mean (nce_fwd_train_tiles instead of nce_fwd_tiles).
template <class Pol>
cudaError_t forward_impl(const InfoNceParams& p, bool train, const DeviceInfo& dev,
                         cudaStream_t stream, size_t* bytes) {
  using T = typename Pol::G;  // the inputs' element type in global memory
  using Acc = typename Pol::Acc;
  const bool all_keys = all_keys_mode(p);
  const int64_t n_keys_cols = all_keys ? p.N : 0;
  const int64_t ncols = n_keys_cols + p.K;
  const int64_t ntiles = ceil_div(ncols, Pol::BN);
  const int64_t row_blocks = ceil_div(p.M, kBM);
  size_t smem = train ? SmemLayout<Pol, 1, true>::bytes : SmemLayout<Pol, 1, false>::bytes;
  const int64_t passes = p.D > 0 ? ceil_div(p.D, Pol::OW) : 1;
  int ns = 0;
  if (ntiles > 0 && p.M > 0) {
    int bpsm = 1;
    cudaError_t e = train ? tile_launch_smem<Pol, 1, true>(nce_fwd_train_tiles<Pol>, dev, &smem, &bpsm)
                          : tile_launch_smem<Pol, 1, false>(nce_fwd_tiles<Pol>, dev, &smem, &bpsm);
    if (e != cudaSuccess) return e;
    ns = choose_splits(row_blocks, ntiles, dev, bpsm);
  }
  const size_t bytes_lse = align_up(size_t(ns) * size_t(p.M) * sizeof(Acc));
  const size_t bytes_ref = train ? align_up(size_t(ns) * size_t(passes) * size_t(p.M) * sizeof(Acc)) : 0;
  const size_t bytes_o = train ? align_up(size_t(ns) * size_t(p.M) * size_t(p.D) * sizeof(Acc)) : 0;
  const size_t need = bytes_lse + bytes_ref + bytes_o;
  if (bytes != nullptr) {
    *bytes = need;
    return cudaSuccess;
  }
  if (p.M <= 0) return cudaSuccess;
  if (p.workspace_bytes < need || (need > 0 && p.workspace == nullptr)) return cudaErrorInvalidValue;
  if (train && p.bank_mean == nullptr && p.D > 0) return cudaErrorInvalidValue;
  Acc* ws = static_cast<Acc*>(p.workspace);
  Acc* ws_ref = train ? reinterpret_cast<Acc*>(static_cast<unsigned char*>(p.workspace) + bytes_lse) : nullptr;
  Acc* ws_o = train ? reinterpret_cast<Acc*>(static_cast<unsigned char*>(p.workspace) + bytes_lse + bytes_ref)
                    : nullptr;
  if (ns > 0) {
    NceTileArgs<Acc> a{};
    a.rows = RowSrc{p.query, p.M, nullptr, 0};
    a.nrows = p.M;
    a.cols = RowSrc{p.keys, n_keys_cols, p.bank, p.K};
    a.ncols = ncols;
    a.D = p.D;
    const bool vec = vec_ok(p.D, sizeof(T), {p.query, p.keys, p.K > 0 ? p.bank : nullptr});
    a.vec = train ? load_mode<Pol, 1, true>(vec, smem) : load_mode<Pol, 1, false>(vec, smem);
    a.nsplit = ns;
    a.ntiles = ntiles;
    a.scale = Acc(1.0 / p.temperature);
    a.ws = ws;
    if (train) {
      a.nkeys = n_keys_cols;
      a.mref = ws_ref;
      a.obuf = ws_o;
      launch(nce_fwd_train_tiles<Pol>, dim3(unsigned(row_blocks), unsigned(ns)), kThreads, smem, stream, a);
    } else {
      launch(nce_fwd_tiles<Pol>, dim3(unsigned(row_blocks), unsigned(ns)), kThreads, smem, stream, a);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  NceRowArgs<Acc> r = row_args<Pol>(p);
  r.ws = ws;
  r.nsplit = ns;
  r.loss = static_cast<Acc*>(p.loss);
  r.lse = static_cast<Acc*>(p.lse);
  if (train && p.D > 0) {
    r.mref = ws_ref;
    r.obuf = ws_o;
    r.dc = Pol::OW;
    r.passes = int(passes);
    r.bank_mean = static_cast<Acc*>(p.bank_mean);
  }
  launch(nce_fwd_finalize<T, Acc>, unsigned(ceil_div(p.M, kRowWarps)), kRowWarps * 32, 0, stream, r);
  return cudaGetLastError();
}

template <class Pol>
cudaError_t backward_impl(const InfoNceParams& p, const DeviceInfo& dev, cudaStream_t stream, size_t* bytes) {
  using T = typename Pol::G;  // the inputs' element type in global memory
  using Acc = typename Pol::Acc;
  const bool all_keys = all_keys_mode(p);
  const int64_t n_keys_cols = all_keys ? p.N : 0;
  const int64_t ncols = n_keys_cols + p.K;
  const int64_t ntiles_q = ceil_div(ncols, Pol::BN);
  const int64_t blocks_q = ceil_div(p.M, kBM);
  const int64_t ntiles_k = all_keys ? ceil_div(p.M, Pol::BN) : 0;
  const int64_t blocks_k = ceil_div(p.N, kBM);
  size_t smem_q = SmemLayout<Pol, 1, true>::bytes, smem_k = smem_q;
  const bool want_q = p.need_grad_query, want_k = p.need_grad_keys;
  int ns_q = 0, ns_k = 0;
  if (p.M > 0 && p.D > 0) {
    if (ntiles_q > 0 && want_q) {
      int bpsm = 1;
      cudaError_t e = tile_launch_smem<Pol, 1, true>(nce_dq_tiles<Pol>, dev, &smem_q, &bpsm);
      if (e != cudaSuccess) return e;
      ns_q = choose_splits(blocks_q, ntiles_q, dev, bpsm);
    }
    if (ntiles_k > 0 && p.N > 0 && want_k) {
      int bpsm = 1;
      cudaError_t e = tile_launch_smem<Pol, 1, true>(nce_dk_tiles<Pol>, dev, &smem_k, &bpsm);
      if (e != cudaSuccess) return e;
      ns_k = choose_splits(blocks_k, ntiles_k, dev, bpsm);
    }
  }
  const size_t bytes_q = align_up(size_t(ns_q) * size_t(p.M) * size_t(p.D) * sizeof(Acc));
  const size_t bytes_k = align_up(size_t(ns_k) * size_t(p.N) * size_t(p.D) * sizeof(Acc));
  const size_t need = bytes_q + bytes_k + align_up(sizeof(Acc));
  if (bytes != nullptr) {
    *bytes = need;
    return cudaSuccess;
  }
  if (p.M <= 0 || p.D <= 0) return cudaSuccess;
  if (p.workspace_bytes < need || p.workspace == nullptr) return cudaErrorInvalidValue;
  if ((want_q && p.grad_query == nullptr) || (want_k && p.grad_keys == nullptr)) return cudaErrorInvalidValue;
  unsigned char* base = static_cast<unsigned char*>(p.workspace);
  Acc* ws_q = reinterpret_cast<Acc*>(base);
  Acc* ws_k = reinterpret_cast<Acc*>(base + bytes_q);
  Acc* gscale = reinterpret_cast<Acc*>(base + bytes_q + bytes_k);
  const Acc scale = Acc(1.0 / p.temperature);
  const Acc* gl = static_cast<const Acc*>(p.grad_loss);
  const Acc* gls = static_cast<const Acc*>(p.grad_lse);
  const Acc* lse = static_cast<const Acc*>(p.lse_in);
  cudaError_t e = cudaSuccess;

  if (ns_q > 0) {
    NceTileArgs<Acc> a{};
    a.rows = RowSrc{p.query, p.M, nullptr, 0};
    a.nrows = p.M;
    a.cols = RowSrc{p.keys, n_keys_cols, p.bank, p.K};
    a.ncols = ncols;
    a.D = p.D;
    a.vec = load_mode<Pol, 1, true>(vec_ok(p.D, sizeof(T), {p.query, p.keys, p.K > 0 ? p.bank : nullptr}), smem_q);
    a.nsplit = ns_q;
    a.ntiles = ntiles_q;
    a.scale = scale;
    a.ws = ws_q;
    a.lse = lse;
    a.gl = gl;
    a.gls = gls;
    launch(nce_dq_tiles<Pol>, dim3(unsigned(blocks_q), unsigned(ns_q)), kThreads, smem_q, stream, a);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
  }
  if (ns_k > 0) {
    const Acc* gs = nullptr;
    if constexpr (Pol::kTensorCore) {
      launch(coef_absmax_kernel, 1, 1024, 0, stream, gl, gls, p.M, gscale);
      if ((e = cudaGetLastError()) != cudaSuccess) return e;
      gs = gscale;
    }
    NceTileArgs<Acc> a{};
    a.rows = RowSrc{p.keys, p.N, nullptr, 0};  // rows are keys ...
    a.nrows = p.N;
    a.cols = RowSrc{p.query, p.M, nullptr, 0};  // ... columns are query rows
    a.ncols = p.M;
    a.D = p.D;
    a.vec = load_mode<Pol, 1, true>(vec_ok(p.D, sizeof(T), {p.query, p.keys}), smem_k);
    a.nsplit = ns_k;
    a.ntiles = ntiles_k;
    a.scale = scale;
    a.ws = ws_k;
    a.lse = lse;
    a.gl = gl;
    a.gls = gls;
    a.pos = p.positive;
    a.gscale = gs;
    launch(nce_dk_tiles<Pol>, dim3(unsigned(blocks_k), unsigned(ns_k)), kThreads, smem_k, stream, a);
    if ((e = cudaGetLastError()) != cudaSuccess) return e;
    e = launch_reduce_splits<Acc>(ws_k, ns_k, p.N * p.D, scale, static_cast<Acc*>(p.grad_keys), stream);
    if (e != cudaSuccess) return e;
  }
  if (!want_q && (all_keys || !want_k)) return cudaSuccess;  // nothing left for the row pass
  NceRowArgs<Acc> r = row_args<Pol>(p);
  r.ws = ws_q;
  r.nsplit = ns_q;
  r.gl = gl;
  r.gls = gls;
  r.lse_in = lse;
  r.gq = want_q ? static_cast<Acc*>(p.grad_query) : nullptr;
  r.gk = want_k ? static_cast<Acc*>(p.grad_keys) : nullptr;
  r.bank_mean_in = static_cast<const Acc*>(p.bank_mean_in);
  launch(nce_bwd_finalize<T, Acc>, unsigned(ceil_div(p.M, kRowWarps)), kRowWarps * 32, 0, stream, r);
  return cudaGetLastError();
}

}  // namespace

// ---- entry points --------------------------------------------------------------------------

namespace {

template <class F>
cudaError_t with_policy(DType dtype, int fp32_precision, F&& f) {
  DeviceInfo dev;
  cudaError_t e = device_info(&dev);
  if (e != cudaSuccess) return e;
  return dispatch_policy(dtype, dev, fp32_precision, [&](auto pol) { return f(pol, dev); });
}

// Plain forward (train = false) or the training variant (also bank_mean).
cudaError_t forward_any(const InfoNceParams& p, bool train, DType dtype, cudaStream_t stream, size_t* bytes) {
  if (bytes != nullptr) *bytes = 0;
  if (p.M <= 0) return cudaSuccess;
  return with_policy(dtype, p.fp32_precision, [&](auto pol, const DeviceInfo& dev) {
    if (!train) return forward_impl<decltype(pol)>(p, false, dev, stream, bytes);
    return maybe_wide<decltype(pol), 1>(pol, p.D, dev, [&](auto pw) {
      return forward_impl<decltype(pw)>(p, true, dev, stream, bytes);
    });
  });
}

// Backward; p.bank_mean_in is honoured (nullptr: the bank is visited).
cudaError_t backward_any(const InfoNceParams& p, DType dtype, cudaStream_t stream, size_t* bytes) {
  if (bytes != nullptr) *bytes = 0;
  if (p.M <= 0 || p.D <= 0) return cudaSuccess;
  return with_policy(dtype, p.fp32_precision, [&](auto pol, const DeviceInfo& dev) {
    return maybe_wide<decltype(pol), 1>(pol, p.D, dev, [&](auto pw) {
      return backward_impl<decltype(pw)>(p, dev, stream, bytes);
    });
  });
}

InfoNceParams plain(const InfoNceParams& p) {
  InfoNceParams q = p;
  q.bank_mean_in = nullptr;
  return q;
}

// The backward of the training variant is the plain one without the bank's columns.
InfoNceParams without_bank(const InfoNceParams& p) {
  InfoNceParams q = p;
  q.bank = nullptr;
  q.K = 0;
  return q;
}

}  // namespace

cudaError_t info_nce_forward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes) {
  return forward_any(p, false, dtype, nullptr, bytes);
}

cudaError_t info_nce_backward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes) {
  return backward_any(plain(p), dtype, nullptr, bytes);
}

cudaError_t info_nce_forward(const InfoNceParams& p, DType dtype, cudaStream_t stream) {
  return forward_any(p, false, dtype, stream, nullptr);
}

cudaError_t info_nce_backward(const InfoNceParams& p, DType dtype, cudaStream_t stream) {
  return backward_any(plain(p), dtype, stream, nullptr);
}

cudaError_t info_nce_train_forward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes) {
  return forward_any(p, true, dtype, nullptr, bytes);
}

cudaError_t info_nce_train_forward(const InfoNceParams& p, DType dtype, cudaStream_t stream) {
  return forward_any(p, true, dtype, stream, nullptr);
}

cudaError_t info_nce_train_backward_workspace(const InfoNceParams& p, DType dtype, size_t* bytes) {
  return backward_any(without_bank(p), dtype, nullptr, bytes);
}

cudaError_t info_nce_train_backward(const InfoNceParams& p, DType dtype, cudaStream_t stream) {
  if (p.M > 0 && p.D > 0 && p.bank_mean_in == nullptr) return cudaErrorInvalidValue;
  return backward_any(without_bank(p), dtype, stream, nullptr);
}

}  // namespace cuda
}  // namespace upreid

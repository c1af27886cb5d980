// bank_kl CUDA kernels (torch-free). Math as in bank_kl_cpu.cpp: over the bank rows b_j,
//   a_j = student . b_j / tau_s,  c_j = teacher . b_j / tau_t,  p = softmax(c), r = softmax(a)
//   KL(p || r) = sum_j p_j (c_j - a_j) - lse(c) + lse(a)
// One pass keeps, per row, running (max, sum) for both logsumexps and w = sum_j exp(c_j - m_c)
// (c_j - a_j), rescaled with the teacher's sum whenever m_c grows; E_p[c - a] = w / s_c.
// Backward (student only): d/da_j = (g_kl + g_lse_s) r_j - g_kl p_j, so
//   grad_student = sum_j d/da_j b_j / tau_s.
//
// Tiling (block loop in common/cuda_tiles.cuh; the [M x K] logits are never stored):
//   bkl_fwd_tiles   grid (M/64, splits). A block stages 64 student rows AND 64 teacher rows and
//                   streams bank tiles through shared memory once for both: each bank fragment feeds
//                   two tensor-core products (student and teacher logits). The per-warp epilogue
//                   updates the five running statistics; each split writes them ([splits, M, 5]).
//   bkl_fwd_finalize one thread per row combines the splits into kl, lse_student, lse_teacher.
//   bkl_bwd_tiles   same grid; recomputes both logits tiles from the saved logsumexps and forms
//                   W = (cr exp(a - lse_a) - g exp(c - lse_c)) / s_row with s_row = max(|cr|, |g|)
//                   (tensor-core path only: keeps fp16 W in range; restored when storing), then
//                   accumulates W @ bank_tile; split partials [splits, M, D] are summed (and scaled by
//                   1/tau_s) by reduce_splits_kernel. No atomics: deterministic.
// Training forward (_bank_kl_train), as on the CPU: the student and teacher rows are stacked into
// one set of 2M rows (row block = any 64 of them; per-row scale 1/tau_s or 1/tau_t), so each bank
// tile costs one product for the logits and one for O += P @ bank_tile (TrainEpi of
// common/cuda_softmax_epi.cuh: P = exp(logit - ref), ref the row's running max up to the policy's
// slack).
//   bkl_train_tiles    grid (2M/64, splits): per split and row the partial lse, the reference max of
//                      each output pass and O ([splits, 2M, D]).
//   bkl_train_finalize one warp per student row i: combines the splits of rows i and M + i into
//                      lse_student, lse_teacher, mean_student = E_r[b], mean_teacher = E_p[b]
//                      (fixed split order: deterministic), and
//                      kl = (teacher / tau_t - student / tau_s) . E_p[b] - lse_t + lse_s.
//   The backward is elementwise ATen (bank_kl_train_backward): 2 products over the bank in all.
#include "bank_kl/bank_kl_kernel.cuh"

#include "common/cuda_softmax_epi.cuh"
#include "common/cuda_tiles.cuh"

namespace upreid {
namespace cuda {
namespace {

template <class Acc>
struct BklTileArgs {
  RowSrc student, teacher, bank;
  int64_t M, K, D;
  int vec;  // load_mode()
  int nsplit;
  int64_t ntiles;
  Acc ss, st;  // 1 / tau_student, 1 / tau_teacher
  Acc* ws;     // fwd: [nsplit, M, 5]; bwd: [nsplit, M, D]
  const Acc* gkl;
  const Acc* gls;
  const Acc* lse_s;
  const Acc* lse_t;
};

// Per-row scale of the backward weights (see the header comment): max(|cr|, |g|), or 1.
template <class Acc>
__device__ __forceinline__ Acc bwd_row_scale(Acc cr, Acc g) {
  const Acc s = fmax(fabs(cr), fabs(g));
  return (s > Acc(0) && s < Acc(INFINITY)) ? s : Acc(1);
}

template <class Pol>
struct KlFwdEpi {
  using Acc = typename Pol::Acc;
  Acc ss, st;
  int64_t ncols, nrows;
  Acc* out;  // [nrows, 5] of this split
  OnlineLse<Acc> a, c;
  Acc w;

  __device__ __forceinline__ void load_cols(int64_t, int) {}
  __device__ __forceinline__ void tile(Acc* const* sS, typename Pol::WT*, int64_t c0, int64_t, int lane) {
    const EpiLane el(lane);
    const Acc* ra = sS[0] + el.r * Pol::LDS;
    const Acc* rc = sS[1] + el.r * Pol::LDS;
    Acc amax = neg_inf<Acc>(), cmax = neg_inf<Acc>();
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int col = el.h + 2 * j;
      if (c0 + col < ncols) {
        amax = fmax(amax, ra[col] * ss);
        cmax = fmax(cmax, rc[col] * st);
      }
    }
    amax = fmax(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    cmax = fmax(cmax, __shfl_xor_sync(0xffffffffu, cmax, 1));
    const Acc pa = a.pivot(amax), pc = c.pivot(cmax);
    Acc sa = Acc(0), sc = Acc(0), sw = Acc(0);
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int col = el.h + 2 * j;
      if (c0 + col < ncols) {
        const Acc av = ra[col] * ss, cv = rc[col] * st;
        const Acc e = Pol::ex(cv - pc);
        sa += Pol::ex(av - pa);
        sc += e;
        sw += e * (cv - av);
      }
    }
    sa += __shfl_xor_sync(0xffffffffu, sa, 1);
    sc += __shfl_xor_sync(0xffffffffu, sc, 1);
    sw += __shfl_xor_sync(0xffffffffu, sw, 1);
    // w is a sum of exp(c - m_c) terms: rescale it exactly as c.fold rescales c.l
    const Acc alpha = c.m == neg_inf<Acc>() ? Acc(0) : acc_exp_precise(c.m - pc);
    w = w * alpha + sw;
    a.fold(amax, sa);
    c.fold(cmax, sc);
  }
  __device__ __forceinline__ Acc row_scale(int64_t) const { return Acc(1); }
  __device__ __forceinline__ void finish(int64_t wrow0, int lane) {
    const EpiLane el(lane);
    const int64_t row = wrow0 + el.r;
    if (el.h == 0 && row < nrows) {
      Acc* o = out + row * 5;
      o[0] = a.m;
      o[1] = a.l;
      o[2] = c.m;
      o[3] = c.l;
      o[4] = w;
    }
  }
};

template <class Pol>
struct KlBwdEpi {
  using Acc = typename Pol::Acc;
  using WT = typename Pol::WT;
  Acc ss, st;
  int64_t ncols;
  // this lane's row
  Acc ls, lt, cr, g, inv_s;
  const Acc* gkl;
  const Acc* gls;

  __device__ __forceinline__ void load_cols(int64_t, int) {}
  __device__ __forceinline__ void tile(Acc* const* sS, WT* sW, int64_t c0, int64_t, int lane) {
    const EpiLane el(lane);
    const Acc* ra = sS[0] + el.r * Pol::LDS;
    const Acc* rc = sS[1] + el.r * Pol::LDS;
    WT* wrow = sW + el.r * Pol::LDW;  // SIMT: aliases ra, element by element
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int col = el.h + 2 * j;
      Acc w = Acc(0);
      if (c0 + col < ncols) {
        w = (cr * Pol::ex(ra[col] * ss - ls) - g * Pol::ex(rc[col] * st - lt)) * inv_s;
      }
      Pol::put_w(wrow, col, w);
    }
  }
  __device__ __forceinline__ Acc row_scale(int64_t r) const {
    if constexpr (Pol::kTensorCore) {
      return bwd_row_scale(gkl[r] + gls[r], gkl[r]);
    } else {
      return Acc(1);
    }
  }
  __device__ __forceinline__ void finish(int64_t, int) {}
};

template <class Pol>
__global__ void __launch_bounds__(kThreads, UPREID_TILE_MIN_BLOCKS(Pol)) bkl_fwd_tiles(BklTileArgs<typename Pol::Acc> a) {
  if constexpr (Pol::kTensorCore && UPREID_TC_UNAVAILABLE) {
    __trap();
  } else {
    using Acc = typename Pol::Acc;
    UPREID_DYNAMIC_SMEM(smem, 128);
    const int64_t s = blockIdx.y;
    const int64_t tb = s * a.ntiles / a.nsplit, te = (s + 1) * a.ntiles / a.nsplit;
    KlFwdEpi<Pol> epi{a.ss, a.st, a.K, a.M, a.ws + s * a.M * 5};
    epi.w = Acc(0);
    const RowSrc q[2] = {a.student, a.teacher};
    run_tiles<Pol, 2, false>(smem, q, a.M, a.bank, a.D, a.vec, tb, te, static_cast<Acc*>(nullptr), epi);
  }
}

template <class Pol>
__global__ void __launch_bounds__(kThreads, UPREID_TILE_MIN_BLOCKS(Pol)) bkl_bwd_tiles(BklTileArgs<typename Pol::Acc> a) {
  if constexpr (Pol::kTensorCore && UPREID_TC_UNAVAILABLE) {
    __trap();
  } else {
    using Acc = typename Pol::Acc;
    UPREID_DYNAMIC_SMEM(smem, 128);
    const int64_t s = blockIdx.y;
    const int64_t tb = s * a.ntiles / a.nsplit, te = (s + 1) * a.ntiles / a.nsplit;
    const int64_t row = int64_t(blockIdx.x) * kBM + (threadIdx.x >> 5) * 16 + ((threadIdx.x & 31) >> 1);
    KlBwdEpi<Pol> epi{a.ss, a.st, a.K, Acc(0), Acc(0), Acc(0), Acc(0), Acc(1), a.gkl, a.gls};
    if (row < a.M) {
      epi.ls = a.lse_s[row];
      epi.lt = a.lse_t[row];
      epi.g = a.gkl[row];
      epi.cr = a.gkl[row] + a.gls[row];
      if constexpr (Pol::kTensorCore) epi.inv_s = Acc(1) / bwd_row_scale(epi.cr, epi.g);
    }
    const RowSrc q[2] = {a.student, a.teacher};
    run_tiles<Pol, 2, true>(smem, q, a.M, a.bank, a.D, a.vec, tb, te, a.ws + s * a.M * a.D, epi);
  }
}

template <class Acc>
__global__ void bkl_fwd_finalize(const Acc* __restrict__ ws, int nsplit, int64_t M, Acc* kl,
                                 Acc* lse_s, Acc* lse_t) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= M) return;
  Acc ma = neg_inf<Acc>(), mc = neg_inf<Acc>();
  for (int s = 0; s < nsplit; ++s) {
    const Acc* o = ws + (int64_t(s) * M + i) * 5;
    ma = fmax(ma, o[0]);
    mc = fmax(mc, o[2]);
  }
  Acc la = Acc(0), lc = Acc(0), w = Acc(0);
  for (int s = 0; s < nsplit; ++s) {
    const Acc* o = ws + (int64_t(s) * M + i) * 5;
    if (o[0] != neg_inf<Acc>()) la += o[1] * acc_exp_precise(o[0] - ma);
    if (o[2] != neg_inf<Acc>()) {
      const Acc f = acc_exp_precise(o[2] - mc);
      lc += o[3] * f;
      w += o[4] * f;
    }
  }
  const Acc ls = ma + acc_log(la), lt = mc + acc_log(lc);
  lse_s[i] = ls;
  lse_t[i] = lt;
  kl[i] = w / lc - lt + ls;
}

template <class Pol>
BklTileArgs<typename Pol::Acc> tile_args(const BankKlParams& p) {
  using Acc = typename Pol::Acc;
  BklTileArgs<Acc> a{};
  a.student = RowSrc{p.student, p.M, nullptr, 0};
  a.teacher = RowSrc{p.teacher, p.M, nullptr, 0};
  a.bank = RowSrc{p.bank, p.K, nullptr, 0};
  a.M = p.M;
  a.K = p.K;
  a.D = p.D;
  a.ntiles = ceil_div(p.K, Pol::BN);
  a.ss = Acc(1.0 / p.tau_student);
  a.st = Acc(1.0 / p.tau_teacher);
  return a;
}

template <class Pol, bool kBwd>
cudaError_t impl(const BankKlParams& p, const DeviceInfo& dev, cudaStream_t stream, size_t* bytes) {
  using Acc = typename Pol::Acc;
  size_t smem = SmemLayout<Pol, 2, kBwd>::bytes;
  auto kernel = kBwd ? bkl_bwd_tiles<Pol> : bkl_fwd_tiles<Pol>;
  const int64_t ntiles = ceil_div(p.K, Pol::BN), row_blocks = ceil_div(p.M, kBM);
  int ns = 0;
  if (p.M > 0 && ntiles > 0 && (!kBwd || p.D > 0)) {
    int bpsm = 1;
    cudaError_t e = tile_launch_smem<Pol, 2, kBwd>(kernel, dev, &smem, &bpsm);
    if (e != cudaSuccess) return e;
    ns = choose_splits(row_blocks, ntiles, dev, bpsm);
  }
  const size_t per_split = size_t(p.M) * (kBwd ? size_t(p.D) : size_t(5));
  const size_t need = align_up(size_t(ns) * per_split * sizeof(Acc));
  if (bytes != nullptr) {
    *bytes = need;
    return cudaSuccess;
  }
  if (ns == 0) return cudaSuccess;  // M == 0 (or D == 0 in backward): nothing to compute
  if (p.workspace_bytes < need || p.workspace == nullptr) return cudaErrorInvalidValue;
  BklTileArgs<Acc> a = tile_args<Pol>(p);
  a.vec = load_mode<Pol, 2, kBwd>(vec_ok(p.D, sizeof(typename Pol::G), {p.student, p.teacher, p.bank}), smem);
  a.nsplit = ns;
  a.ws = static_cast<Acc*>(p.workspace);
  if constexpr (kBwd) {
    a.gkl = static_cast<const Acc*>(p.grad_kl);
    a.gls = static_cast<const Acc*>(p.grad_lse_student);
    a.lse_s = static_cast<const Acc*>(p.lse_student_in);
    a.lse_t = static_cast<const Acc*>(p.lse_teacher_in);
  }
  launch(kernel, dim3(unsigned(row_blocks), unsigned(ns)), kThreads, smem, stream, a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  if constexpr (kBwd) {
    return launch_reduce_splits<Acc>(a.ws, ns, p.M * p.D, a.ss, static_cast<Acc*>(p.grad_student), stream);
  } else {
    launch(bkl_fwd_finalize<Acc>, unsigned(ceil_div(p.M, 256)), 256, 0, stream,
        a.ws, ns, p.M, static_cast<Acc*>(p.kl), static_cast<Acc*>(p.lse_student),
        static_cast<Acc*>(p.lse_teacher));
    return cudaGetLastError();
  }
}

template <bool kBwd>
cudaError_t entry(const BankKlParams& p, DType dtype, cudaStream_t stream, size_t* bytes) {
  if (bytes != nullptr) *bytes = 0;
  if (p.M <= 0 || p.K <= 0 || (kBwd && p.D <= 0)) return cudaSuccess;
  DeviceInfo dev;
  cudaError_t e = device_info(&dev);
  if (e != cudaSuccess) return e;
  return dispatch_policy(dtype, dev, p.fp32_precision, [&](auto pol) {
    if constexpr (!kBwd) {
      return impl<decltype(pol), false>(p, dev, stream, bytes);
    } else {
      return maybe_wide<decltype(pol), 2>(pol, p.D, dev, [&](auto pw) {
        return impl<decltype(pw), true>(p, dev, stream, bytes);
      });
    }
  });
}


// ---- training forward ----------------------------------------------------------------------------

template <class Acc>
struct BklTrainArgs {
  RowSrc rows;  // [student; teacher]
  RowSrc bank;
  int64_t M, K, D;
  int vec;  // load_mode()
  int nsplit;
  int64_t ntiles;
  Acc ss, st;
  Acc* lse;   // [nsplit, 2M]
  Acc* mref;  // [nsplit, passes, 2M]
  Acc* obuf;  // [nsplit, 2M, D]
};

template <class Pol>
__global__ void __launch_bounds__(kThreads, UPREID_TILE_MIN_BLOCKS(Pol)) bkl_train_tiles(BklTrainArgs<typename Pol::Acc> a) {
  if constexpr (Pol::kTensorCore && UPREID_TC_UNAVAILABLE) {
    __trap();
  } else {
    using Acc = typename Pol::Acc;
    using L = SmemLayout<Pol, 1, true>;
    UPREID_DYNAMIC_SMEM(smem, 128);
    const int64_t s = blockIdx.y, R = 2 * a.M;
    const int64_t tb = s * a.ntiles / a.nsplit, te = (s + 1) * a.ntiles / a.nsplit;
    const int64_t passes = a.D > 0 ? (a.D + Pol::OW - 1) / Pol::OW : 1;
    Acc* alpha = reinterpret_cast<Acc*>(smem + L::col_off) + (threadIdx.x >> 5) * 16;
    TrainEpi<Pol> epi{{a.ss, a.K, R, a.lse + s * R}, /*nkeys=*/0, a.mref + s * passes * R, alpha};
    epi.scale2 = a.st;  // teacher rows
    epi.nfirst = a.M;
    const RowSrc q[1] = {a.rows};
    run_tiles<Pol, 1, false, true>(smem, q, R, a.bank, a.D, a.vec, tb, te, a.obuf + s * R * a.D, epi);
  }
}

template <class Acc>
struct BklTrainRowArgs {
  const void* student;
  const void* teacher;
  int64_t M, D;
  Acc ss, st;
  const Acc* lse;
  const Acc* mref;
  const Acc* obuf;
  int nsplit, ow, passes;
  Acc* kl;
  Acc* lse_s;
  Acc* lse_t;
  Acc* mean_s;
  Acc* mean_t;
};

constexpr int kTrainRowWarps = 8;

template <class T, class Acc>
__global__ void __launch_bounds__(kTrainRowWarps * 32) bkl_train_finalize(BklTrainRowArgs<Acc> a) {
  const int lane = threadIdx.x & 31;
  const int64_t i = int64_t(blockIdx.x) * kTrainRowWarps + (threadIdx.x >> 5);
  if (i >= a.M) return;  // whole warp
  const int64_t R = 2 * a.M, D = a.D;
  const T* srow = static_cast<const T*>(a.student) + i * D;
  const T* trow = static_cast<const T*>(a.teacher) + i * D;
  Acc l[2];
  for (int w = 0; w < 2; ++w) {  // student row i, teacher row M + i
    OnlineLse<Acc> st;
    for (int s = 0; s < a.nsplit; ++s) st.add(a.lse[int64_t(s) * R + w * a.M + i]);
    l[w] = st.value();
  }
  Acc dot = Acc(0);
  for (int64_t d = lane; d < D; d += 32) {
    const int64_t oc = d / a.ow;
    Acc v[2];
    for (int w = 0; w < 2; ++w) {
      const int64_t r = w * a.M + i;
      Acc acc = Acc(0);
      for (int s = 0; s < a.nsplit; ++s) {
        const Acc ref = a.mref[(int64_t(s) * a.passes + oc) * R + r];
        if (ref != neg_inf<Acc>()) acc += acc_exp_precise(ref - l[w]) * a.obuf[(int64_t(s) * R + r) * D + d];
      }
      v[w] = acc;
    }
    a.mean_s[i * D + d] = v[0];
    a.mean_t[i * D + d] = v[1];
    dot += (to_acc<Acc>(trow[d]) * a.st - to_acc<Acc>(srow[d]) * a.ss) * v[1];
  }
  dot = warp_sum(dot);
  if (lane == 0) {
    a.lse_s[i] = l[0];
    a.lse_t[i] = l[1];
    a.kl[i] = dot - l[1] + l[0];
  }
}

template <class Pol>
cudaError_t train_impl(const BankKlParams& p, const DeviceInfo& dev, cudaStream_t stream, size_t* bytes) {
  using Acc = typename Pol::Acc;
  using T = typename Pol::G;
  size_t smem = SmemLayout<Pol, 1, true>::bytes;
  const int64_t R = 2 * p.M;
  const int64_t ntiles = ceil_div(p.K, Pol::BN), row_blocks = ceil_div(R, kBM);
  const int64_t passes = p.D > 0 ? ceil_div(p.D, Pol::OW) : 1;
  int ns = 0;
  if (p.M > 0 && ntiles > 0) {
    int bpsm = 1;
    cudaError_t e = tile_launch_smem<Pol, 1, true>(bkl_train_tiles<Pol>, dev, &smem, &bpsm);
    if (e != cudaSuccess) return e;
    ns = choose_splits(row_blocks, ntiles, dev, bpsm);
  }
  const size_t b_lse = align_up(size_t(ns) * size_t(R) * sizeof(Acc));
  const size_t b_ref = align_up(size_t(ns) * size_t(passes) * size_t(R) * sizeof(Acc));
  const size_t b_o = align_up(size_t(ns) * size_t(R) * size_t(p.D) * sizeof(Acc));
  if (bytes != nullptr) {
    *bytes = b_lse + b_ref + b_o;
    return cudaSuccess;
  }
  if (ns == 0) return cudaSuccess;
  if (p.workspace_bytes < b_lse + b_ref + b_o || p.workspace == nullptr) return cudaErrorInvalidValue;
  if (p.D > 0 && (p.mean_student == nullptr || p.mean_teacher == nullptr)) return cudaErrorInvalidValue;
  unsigned char* base = static_cast<unsigned char*>(p.workspace);
  BklTrainArgs<Acc> a{};
  a.rows = RowSrc{p.student, p.M, p.teacher, p.M};
  a.bank = RowSrc{p.bank, p.K, nullptr, 0};
  a.M = p.M;
  a.K = p.K;
  a.D = p.D;
  a.vec = load_mode<Pol, 1, true>(vec_ok(p.D, sizeof(T), {p.student, p.teacher, p.bank}), smem);
  a.nsplit = ns;
  a.ntiles = ntiles;
  a.ss = Acc(1.0 / p.tau_student);
  a.st = Acc(1.0 / p.tau_teacher);
  a.lse = reinterpret_cast<Acc*>(base);
  a.mref = reinterpret_cast<Acc*>(base + b_lse);
  a.obuf = reinterpret_cast<Acc*>(base + b_lse + b_ref);
  launch(bkl_train_tiles<Pol>, dim3(unsigned(row_blocks), unsigned(ns)), kThreads, smem, stream, a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  BklTrainRowArgs<Acc> r{};
  r.student = p.student;
  r.teacher = p.teacher;
  r.M = p.M;
  r.D = p.D;
  r.ss = a.ss;
  r.st = a.st;
  r.lse = a.lse;
  r.mref = a.mref;
  r.obuf = a.obuf;
  r.nsplit = ns;
  r.ow = Pol::OW;
  r.passes = int(passes);
  r.kl = static_cast<Acc*>(p.kl);
  r.lse_s = static_cast<Acc*>(p.lse_student);
  r.lse_t = static_cast<Acc*>(p.lse_teacher);
  r.mean_s = static_cast<Acc*>(p.mean_student);
  r.mean_t = static_cast<Acc*>(p.mean_teacher);
  launch(bkl_train_finalize<T, Acc>, unsigned(ceil_div(p.M, kTrainRowWarps)), kTrainRowWarps * 32, 0, stream, r);
  return cudaGetLastError();
}

cudaError_t train_entry(const BankKlParams& p, DType dtype, cudaStream_t stream, size_t* bytes) {
  if (bytes != nullptr) *bytes = 0;
  if (p.M <= 0 || p.K <= 0) return cudaSuccess;
  DeviceInfo dev;
  cudaError_t e = device_info(&dev);
  if (e != cudaSuccess) return e;
  return dispatch_policy(dtype, dev, p.fp32_precision, [&](auto pol) {
    return maybe_wide<decltype(pol), 1>(pol, p.D, dev, [&](auto pw) {
      return train_impl<decltype(pw)>(p, dev, stream, bytes);
    });
  });
}
}  // namespace

cudaError_t bank_kl_forward_workspace(const BankKlParams& p, DType dtype, size_t* bytes) {
  return entry<false>(p, dtype, nullptr, bytes);
}
cudaError_t bank_kl_backward_workspace(const BankKlParams& p, DType dtype, size_t* bytes) {
  return entry<true>(p, dtype, nullptr, bytes);
}
cudaError_t bank_kl_forward(const BankKlParams& p, DType dtype, cudaStream_t stream) {
  return entry<false>(p, dtype, stream, nullptr);
}
cudaError_t bank_kl_backward(const BankKlParams& p, DType dtype, cudaStream_t stream) {
  return entry<true>(p, dtype, stream, nullptr);
}
cudaError_t bank_kl_train_forward_workspace(const BankKlParams& p, DType dtype, size_t* bytes) {
  return train_entry(p, dtype, nullptr, bytes);
}
cudaError_t bank_kl_train_forward(const BankKlParams& p, DType dtype, cudaStream_t stream) {
  return train_entry(p, dtype, stream, nullptr);
}

}  // namespace cuda
}  // namespace upreid

// Torch-free softmax epilogues of the tile engine (common/cuda_tiles.cuh) shared by the fused
// operators: FwdEpi (online logsumexp of each row's logits) and TrainEpi (also O += P @ C with
// P = exp(S - ref), the unnormalised expected column vector of each row's softmax). info_nce's
// forward and training forward use them with keys and bank columns; bank_kl's training forward with
// the student and teacher rows stacked (per-row scale: FwdEpi::nfirst / scale2) against the bank.
#pragma once

#include "common/cuda_tiles.cuh"

#ifdef __CUDACC__

#include <cstdint>

namespace upreid {
namespace cuda {

template <class Pol>
struct FwdEpi {
  using Acc = typename Pol::Acc;
  Acc scale;
  int64_t ncols, nrows;
  Acc* out;
  OnlineLse<Acc> st;
  // rows [nfirst, nrows) use scale2 (bank_kl's training forward stacks student and teacher rows)
  Acc scale2 = Acc(0);
  int64_t nfirst = INT64_MAX;

  __device__ __forceinline__ Acc row_factor(int64_t row) const { return row < nfirst ? scale : scale2; }
  __device__ __forceinline__ void load_cols(int64_t, int) {}
  __device__ __forceinline__ void tile(Acc* const* sS, typename Pol::WT*, int64_t c0, int64_t wrow0, int lane) {
    const EpiLane el(lane);
    const Acc scale = row_factor(wrow0 + el.r);
    const Acc* row = sS[0] + el.r * Pol::LDS;
    Acc tmax = neg_inf<Acc>();
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int c = el.h + 2 * j;
      if (c0 + c < ncols) tmax = fmax(tmax, row[c] * scale);
    }
    tmax = fmax(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const Acc pv = st.pivot(tmax);
    Acc sum = Acc(0);
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int c = el.h + 2 * j;
      if (c0 + c < ncols) sum += Pol::ex(row[c] * scale - pv);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    st.fold(tmax, sum);
  }
  __device__ __forceinline__ Acc row_scale(int64_t) const { return Acc(1); }
  __device__ __forceinline__ void finish(int64_t wrow0, int lane) {
    const EpiLane el(lane);
    const int64_t row = wrow0 + el.r;
    if (el.h == 0 && row < nrows) out[row] = st.value();
  }
};

// Forward of _info_nce_train: the logsumexp of FwdEpi plus P = exp(S - ref) on the bank columns for
// O += P @ bank_tile. ref follows the running max (including key columns) but only moves when the
// max exceeds it by more than Pol::kOSlack; then O is rescaled by alpha = exp(ref_old - ref_new).
// On tiles that feed O each exp is computed once: the logsumexp sums the same exp(S - ref) terms
// with ref as its pivot (terms <= e^kOSlack), so the pivot of `st` lags the true max there.
template <class Pol>
struct TrainEpi : FwdEpi<Pol> {
  using Acc = typename Pol::Acc;
  using WT = typename Pol::WT;
  int64_t nkeys;
  Acc* mref_out;  // this split's [passes, nrows]
  Acc* s_alpha;   // this warp's 16 factors (shared)
  Acc mref = neg_inf<Acc>();
  Acc mx = neg_inf<Acc>();  // running max over the tiles that fed O
  bool pending = false;

  __device__ __forceinline__ bool has_out(int64_t c0) const { return c0 + Pol::BN > nkeys; }
  __device__ __forceinline__ bool rescale_pending() const { return pending; }
  __device__ __forceinline__ const Acc* alpha() const { return s_alpha; }
  __device__ __forceinline__ void tile(Acc* const* sS, WT* sW, int64_t c0, int64_t wrow0, int lane) {
    pending = false;
    if (!has_out(c0)) {  // key columns only (they come first): the plain online logsumexp
      FwdEpi<Pol>::tile(sS, sW, c0, wrow0, lane);
      return;
    }
    const EpiLane el(lane);
    const Acc scale = this->row_factor(wrow0 + el.r);
    const int64_t ncols = this->ncols;
    const Acc* row = sS[0] + el.r * Pol::LDS;
    WT* wrow = sW + el.r * Pol::LDW;
    Acc tmax = neg_inf<Acc>();
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int c = el.h + 2 * j;
      if (c0 + c < ncols) tmax = fmax(tmax, row[c] * scale);
    }
    tmax = fmax(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    // before the first such tile st.m is the true running max; afterwards mx is
    const Acc m = fmax(fmax(mx, this->st.m), tmax);
    mx = m;
    Acc a = Acc(1);
    bool grow = false;
    if (mref == neg_inf<Acc>()) {
      mref = m;  // O is still zero: nothing to rescale
    } else if (m > mref + Pol::kOSlack) {
      a = acc_exp_precise(mref - m);
      mref = m;
      grow = true;
    }
    pending = __any_sync(0xffffffffu, grow);
    if (pending && el.h == 0) s_alpha[el.r] = a;
    const Acc pv = mref == neg_inf<Acc>() ? Acc(0) : mref;
    Acc sum = Acc(0);
#pragma unroll 8
    for (int j = 0; j < Pol::BN / 2; ++j) {
      const int c = el.h + 2 * j;
      const int64_t g = c0 + c;
      Acc w = Acc(0);
      if (g < ncols) {
        const Acc e = Pol::ex(row[c] * scale - pv);
        sum += e;
        if (g >= nkeys) w = e;
      }
      Pol::put_w(wrow, c, w);  // in place for SIMT: same element just read
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    if (mref != neg_inf<Acc>()) {  // fold sum_j exp(x_j - pv) with pv >= the state's pivot
      OnlineLse<Acc>& st = this->st;
      st.l = (st.m == neg_inf<Acc>() ? Acc(0) : st.l * acc_exp_precise(st.m - pv)) + sum;
      st.m = pv;
    }
  }
  __device__ __forceinline__ void finish_pass(int oc, int64_t wrow0, int lane) {
    const EpiLane el(lane);
    const int64_t row = wrow0 + el.r;
    if (el.h == 0 && row < this->nrows) {
      if (oc == 0) this->out[row] = this->st.value();
      mref_out[int64_t(oc) * this->nrows + row] = mref;
    }
    this->st = OnlineLse<Acc>();  // the next pass recomputes the same logits
    mref = neg_inf<Acc>();
    mx = neg_inf<Acc>();
  }
};

}  // namespace cuda
}  // namespace upreid

#endif  // __CUDACC__

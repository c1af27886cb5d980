// Emulation stand-in for the WMMA API (nvcuda::wmma), 16x16x16 shapes with fp16/bf16 operands and
// fp32 accumulators: see upreid_emu.h.
//
// As on the hardware, a fragment is spread over the 32 lanes of a warp: lane l holds 8 elements of
// the logical 16 x 16 tile, in the hardware's register layout (upreid_emu::frag_elem). load_matrix_sync and
// store_matrix_sync read and write only the calling lane's elements, so one lane reading what
// another lane stored without a __syncwarp between them is a data race (race mode reports it).
// mma_sync is a warp collective: the product is formed once from the lanes' parts with exact
// products and fp32 accumulation in k order.
#pragma once

#include "upreid_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation implements 16x16x16 WMMA only");
  static constexpr int num_elements = 8;
  T x[8];
};

namespace detail {
inline int lane() { return int(::upreid_emu::t_cur->linear & 31); }
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
// Logical (r, c) of this lane's element i, and its offset in memory for the operand's layout.
inline void rc(int i, int* r, int* c) {
  const int e = ::upreid_emu::frag_elem(lane(), i);
  *r = e >> 4;
  *c = e & 15;
}
inline size_t at(int r, int c, unsigned ld, bool row_major) {
  return row_major ? size_t(r) * ld + c : size_t(c) * ld + r;
}
}  // namespace detail

// A[r][k] (matrix_a) or B[k][n] (matrix_b): the logical tile is (row, col) = (r, k) or (k, n).
template <class Use, class T, class L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ld) {
  static_assert(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value, "layout");
  for (int i = 0; i < 8; ++i) {
    int r, c;
    detail::rc(i, &r, &c);
    f.x[i] = p[detail::at(r, c, ld, std::is_same<L, row_major>::value)];
  }
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ld,
                             layout_t layout) {
  for (int i = 0; i < 8; ++i) {
    int r, c;
    detail::rc(i, &r, &c);
    f.x[i] = p[detail::at(r, c, ld, layout == mem_row_major)];
  }
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ld,
                              layout_t layout) {
  for (int i = 0; i < 8; ++i) {
    int r, c;
    detail::rc(i, &r, &c);
    p[detail::at(r, c, ld, layout == mem_row_major)] = f.x[i];
  }
}
template <class Use, class T, class L>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, const T& v) {
  for (int i = 0; i < 8; ++i) f.x[i] = v;
}
template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float fa[8], fb[8], fc[8];
  for (int i = 0; i < 8; ++i) {
    fa[i] = detail::to_f(a.x[i]);
    fb[i] = detail::to_f(b.x[i]);
    fc[i] = c.x[i];
  }
  ::upreid_emu::warp_mma(__FILE__, __LINE__, fa, fb, fc, d.x);
}

}  // namespace wmma
}  // namespace nvcuda

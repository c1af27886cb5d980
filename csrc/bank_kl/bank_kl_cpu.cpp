// CPU implementation of bank_kl and its backward.
//
// With a_j = student . b_j / tau_s and c_j = teacher . b_j / tau_t over the bank rows b_j:
//   KL(p || r) = sum_j p_j (c_j - a_j) - lse(c) + lse(a),   p = softmax(c), r = softmax(a).
// One pass over bank tiles keeps running maxima and sums for both logsumexps and the running
// w = sum_j exp(c_j - m_c) (c_j - a_j), rescaled whenever m_c grows; then E_p[c - a] = w / s_c.
// Backward: d/da_j = grad_kl (r_j - p_j) + grad_lse_student r_j, recomputed tile by tile.
// Training variant (_bank_kl_train): student and teacher rows are stacked into one [2R, D] block, so
// each tile is one product for the logits and one for the expected bank vectors E_r[b], E_p[b]
// (running sums rescaled with the running maxima). Then E_p[c - a] = (t - s) . E_p[b] gives the KL
// and the backward is elementwise: 2 products over the bank in all instead of 5.
#include <torch/library.h>

#include "bank_kl/bank_kl.h"
#include "common/checks.h"
#include "common/tiles_cpu.h"

namespace upreid {

std::tuple<at::Tensor, at::Tensor, at::Tensor> bank_kl_cpu(const at::Tensor& student,
                                                           const at::Tensor& teacher,
                                                           const at::Tensor& bank,
                                                           double tau_student, double tau_teacher) {
  at::NoGradGuard no_grad;  // internal tensors never need autograd history
  check_bank_kl_args(student, teacher, bank, tau_student, tau_teacher, "upreid::bank_kl");
  const auto acc = acc_dtype(student.scalar_type());
  const auto opts = student.options().dtype(acc);
  const int64_t M = student.size(0);
  at::Tensor kl = at::empty({M}, opts), lse_s = at::empty({M}, opts), lse_t = at::empty({M}, opts);
  if (M == 0) return {kl, lse_s, lse_t};
  at::Tensor ss = student.to(acc).mul(1.0 / tau_student).contiguous();  // [M, D]
  at::Tensor ts = teacher.to(acc).mul(1.0 / tau_teacher).contiguous();  // [M, D]
  at::Tensor bk = bank.contiguous();

  const CpuBlocking blk = cpu_blocking(M);
  parallel_row_blocks(M, blk.rows, [&](int64_t r0, int64_t r1) {
    const int64_t R = r1 - r0;
    at::Tensor sb = ss.slice(0, r0, r1), tb = ts.slice(0, r0, r1);
    OnlineLse st(R, opts), te(R, opts);
    at::Tensor w = at::zeros({R}, opts);
    for_each_tile(bk, blk.cols, acc, [&](const at::Tensor& tile, int64_t, int64_t) {
      at::Tensor a = at::mm(sb, tile.t());  // [R, T] student logits
      at::Tensor c = at::mm(tb, tile.t());  // [R, T] teacher logits
      at::Tensor diff = c - a;
      at::Tensor m_old = te.m;
      te.fold(c);  // c := exp(c - m_new)
      w.mul_((m_old - te.m).exp_()).add_((c * diff).sum(1));
      st.fold(a);
    });
    at::Tensor ls = st.value(), lt = te.value();
    lse_s.slice(0, r0, r1).copy_(ls);
    lse_t.slice(0, r0, r1).copy_(lt);
    kl.slice(0, r0, r1).copy_(w / te.s - lt + ls);
  });
  return {kl, lse_s, lse_t};
}

at::Tensor bank_kl_backward_cpu(const at::Tensor& grad_kl, const at::Tensor& grad_lse_student,
                                const at::Tensor& student, const at::Tensor& teacher,
                                const at::Tensor& bank, const at::Tensor& lse_student,
                                const at::Tensor& lse_teacher, double tau_student,
                                double tau_teacher) {
  constexpr const char* op = "upreid::_bank_kl_backward";
  at::NoGradGuard no_grad;  // internal tensors never need autograd history
  check_bank_kl_args(student, teacher, bank, tau_student, tau_teacher, op);
  check_bank_kl_backward_args(grad_kl, grad_lse_student, lse_student, lse_teacher, student, op);
  const int64_t M = student.size(0);
  const auto acc = acc_dtype(student.scalar_type());
  const auto opts = student.options().dtype(acc);
  if (M == 0 || student.size(1) == 0) return at::zeros(student.sizes(), student.options());  // contiguous, as the fake says
  at::Tensor ss = student.to(acc).mul(1.0 / tau_student).contiguous();
  at::Tensor ts = teacher.to(acc).mul(1.0 / tau_teacher).contiguous();
  at::Tensor bk = bank.contiguous();
  at::Tensor gk = grad_kl.to(acc).contiguous();
  at::Tensor coef_r = (gk + grad_lse_student.to(acc)).contiguous();
  at::Tensor ls = lse_student.to(acc).contiguous(), lt = lse_teacher.to(acc).contiguous();
  at::Tensor gs = at::zeros({M, student.size(1)}, opts);

  const CpuBlocking blk = cpu_blocking(M);
  parallel_row_blocks(M, blk.rows, [&](int64_t r0, int64_t r1) {
    at::Tensor sb = ss.slice(0, r0, r1), tb = ts.slice(0, r0, r1), gsb = gs.slice(0, r0, r1);
    at::Tensor cr = coef_r.slice(0, r0, r1).unsqueeze(1), cp = gk.slice(0, r0, r1).unsqueeze(1);
    at::Tensor lsb = ls.slice(0, r0, r1).unsqueeze(1), ltb = lt.slice(0, r0, r1).unsqueeze(1);
    for_each_tile(bk, blk.cols, acc, [&](const at::Tensor& tile, int64_t, int64_t) {
      at::Tensor r = at::mm(sb, tile.t()).sub_(lsb).exp_().mul_(cr);  // (g_kl + g_lse) r
      at::Tensor p = at::mm(tb, tile.t()).sub_(ltb).exp_().mul_(cp);  // g_kl p
      gsb.addmm_(r.sub_(p), tile);
    });
  });
  return gs.mul_(1.0 / tau_student).to(student.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bank_kl_train_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& bank, double tau_student,
    double tau_teacher) {
  at::NoGradGuard no_grad;
  check_bank_kl_args(student, teacher, bank, tau_student, tau_teacher, "upreid::bank_kl");
  const auto acc = acc_dtype(student.scalar_type());
  const auto opts = student.options().dtype(acc);
  const int64_t M = student.size(0), D = student.size(1);
  at::Tensor kl = at::empty({M}, opts), lse_s = at::empty({M}, opts), lse_t = at::empty({M}, opts);
  at::Tensor mean_s = at::empty({M, D}, opts), mean_t = at::empty({M, D}, opts);
  if (M == 0) return {kl, lse_s, lse_t, mean_s, mean_t};
  at::Tensor ss = student.to(acc).mul(1.0 / tau_student);  // [M, D]
  at::Tensor ts = teacher.to(acc).mul(1.0 / tau_teacher);  // [M, D]
  at::Tensor bk = bank.contiguous();

  const CpuBlocking blk = cpu_blocking(M);
  const int64_t cols = std::max<int64_t>(128, blk.cols / 2);  // logits tiles of 2R rows
  parallel_row_blocks(M, blk.rows, [&](int64_t r0, int64_t r1) {
    const int64_t R = r1 - r0;
    at::Tensor sb = ss.slice(0, r0, r1), tb = ts.slice(0, r0, r1);
    at::Tensor x = at::cat({sb, tb});  // [2R, D]: student rows, then teacher rows
    OnlineLse state(2 * R, opts);
    at::Tensor means = at::zeros({2 * R, D}, opts);  // running sum_k exp(logit_k - m) b_k
    for_each_tile(bk, cols, acc, [&](const at::Tensor& tile, int64_t, int64_t) {
      at::Tensor l = at::mm(x, tile.t());  // [2R, T]
      state.fold(l);                       // l := exp(l - m_new)
      means.mul_(state.scale.unsqueeze(1)).addmm_(l, tile);
    });
    means.div_(state.s.unsqueeze(1));
    at::Tensor lse = state.value();  // [2R]
    at::Tensor ls = lse.slice(0, 0, R), lt = lse.slice(0, R, 2 * R);
    at::Tensor mt = means.slice(0, R, 2 * R);
    lse_s.slice(0, r0, r1).copy_(ls);
    lse_t.slice(0, r0, r1).copy_(lt);
    mean_s.slice(0, r0, r1).copy_(means.slice(0, 0, R));
    mean_t.slice(0, r0, r1).copy_(mt);
    kl.slice(0, r0, r1).copy_(((tb - sb) * mt).sum(1) - lt + ls);  // E_p[c - a] - lse_c + lse_a
  });
  return {kl, lse_s, lse_t, mean_s, mean_t};
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CPU, m) {
  m.impl("bank_kl", &upreid::bank_kl_cpu);
  m.impl("_bank_kl_backward", &upreid::bank_kl_backward_cpu);
  m.impl("_bank_kl_train", &upreid::bank_kl_train_cpu);
  m.impl("_bank_kl_train_backward", &upreid::bank_kl_train_backward);
}

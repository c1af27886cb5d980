// CPU implementation of info_nce and its backward.
//
// Row i of the loss contrasts qs_i = query_i / temperature with the keys of its group and every bank
// row. Row blocks run in parallel; inside a block the bank (and, for group_size 0, the keys) is
// visited in L2-sized tiles with a running logsumexp, so the [M x (N + K)] logits never exist. For
// group_size >= 1 the g keys of each row's group are gathered ([rows, g, D], chunked over g) and
// contracted with a batched matrix-vector product. The backward recomputes every tile from the saved
// logsumexp (flash-attention style): W = c * exp(S - lse) with c = grad_loss + grad_lse, then
// grad_query += W @ C and grad_keys += W^T @ qs; the positive adds -grad_loss on its own column.
#include <torch/library.h>

#include "common/checks.h"
#include "common/tiles_cpu.h"
#include "info_nce/info_nce.h"

namespace upreid {
namespace {

constexpr const char* kOp = "upreid::info_nce";

// Keys of the groups of rows [r0, r1): fn(Kg [R, gc, D] in acc, idx [R, gc]) over chunks of the group.
template <class F>
void for_each_group_chunk(const at::Tensor& keys, const at::Tensor& group_start, int64_t g,
                          at::ScalarType acc, const F& fn) {
  const int64_t R = group_start.size(0), D = keys.size(1);
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(g, kCpuTileElems / std::max<int64_t>(1, R * D)));
  for (int64_t j0 = 0; j0 < g; j0 += chunk) {
    const int64_t j1 = std::min(g, j0 + chunk);
    at::Tensor idx = group_start.unsqueeze(1) + at::arange(j0, j1, group_start.options());  // [R, gc]
    at::Tensor kg = keys.index_select(0, idx.reshape(-1)).to(acc).view({R, j1 - j0, D});
    fn(kg, idx);
  }
}

struct Prepared {
  at::Tensor qs, keys, positive, bank;
  int64_t M, N, K, D;
  bool all_keys;  // one group spanning every key: the keys are tiled like the bank
  at::ScalarType acc;
};

Prepared prepare(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positive,
                 const std::optional<at::Tensor>& bank, double temperature, int64_t group_size) {
  at::Tensor b = check_info_nce_args(query, keys, positive, bank, temperature, group_size, kOp);
  Prepared p;
  p.acc = acc_dtype(query.scalar_type());
  p.qs = query.to(p.acc).mul(1.0 / temperature).contiguous();  // [M, D]
  p.keys = keys.contiguous();
  p.positive = positive.contiguous();
  p.bank = b.contiguous();
  p.M = query.size(0);
  p.N = keys.size(0);
  p.K = b.size(0);
  p.D = query.size(1);
  p.all_keys = group_size == 0 || group_size == p.N;
  return p;
}

}  // namespace

namespace {

// Forward over every candidate tile. With want_bank_mean it also accumulates, flash-attention style,
// bank_mean[i] = sum_k softmax_ik b_k over the bank columns (rescaled as the running max grows), so
// that the backward of the bank part is c_i * bank_mean_i and needs no recomputation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_impl(const Prepared& p, int64_t group_size,
                                                             bool want_bank_mean,
                                                             const at::TensorOptions& opts) {
  at::Tensor lse = at::empty({p.M}, opts);
  at::Tensor bank_mean = want_bank_mean ? at::zeros({p.M, p.D}, opts) : at::Tensor();
  if (p.M == 0) return {at::empty({0}, opts), lse, bank_mean};
  const bool track = want_bank_mean && p.K > 0;

  const CpuBlocking blk = cpu_blocking(p.M);
  parallel_row_blocks(p.M, blk.rows, [&](int64_t r0, int64_t r1) {
    at::Tensor qb = p.qs.slice(0, r0, r1);  // [R, D]
    OnlineLse state(r1 - r0, opts);
    at::Tensor acc = track ? bank_mean.slice(0, r0, r1) : at::Tensor();  // [R, D]
    auto rescale = [&]() {
      if (track) acc.mul_(state.scale.unsqueeze(1));
    };
    auto fold_keys = [&](const at::Tensor& tile, int64_t, int64_t) {
      at::Tensor s = at::mm(qb, tile.t());  // [R, T]
      state.fold(s);
      rescale();
    };
    auto fold_bank = [&](const at::Tensor& tile, int64_t, int64_t) {
      at::Tensor s = at::mm(qb, tile.t());  // [R, T]
      state.fold(s);
      rescale();
      if (track) acc.addmm_(s, tile);  // s now holds exp(logits - m)
    };
    if (p.all_keys) for_each_tile(p.keys, blk.cols, p.acc, fold_keys);
    for_each_tile(p.bank, blk.cols, p.acc, fold_bank);
    if (!p.all_keys) {
      at::Tensor start = p.positive.slice(0, r0, r1).div(group_size, "floor").mul_(group_size);
      for_each_group_chunk(p.keys, start, group_size, p.acc, [&](const at::Tensor& kg, const at::Tensor&) {
        at::Tensor s = at::bmm(kg, qb.unsqueeze(2)).squeeze(2);  // [R, gc]
        state.fold(s);
        rescale();
      });
    }
    lse.slice(0, r0, r1).copy_(state.value());
    if (track) acc.div_(state.s.unsqueeze(1));
  });
  at::Tensor kpos = p.keys.index_select(0, p.positive).to(p.acc);  // [M, D]
  at::Tensor loss = lse - (p.qs * kpos).sum(1);
  return {loss, lse, bank_mean};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> info_nce_cpu(const at::Tensor& query, const at::Tensor& keys,
                                                const at::Tensor& positive,
                                                const std::optional<at::Tensor>& bank,
                                                double temperature, int64_t group_size) {
  at::NoGradGuard no_grad;  // internal tensors never need autograd history
  Prepared p = prepare(query, keys, positive, bank, temperature, group_size);
  auto out = forward_impl(p, group_size, false, query.options().dtype(p.acc));
  return {std::get<0>(out), std::get<1>(out)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> info_nce_train_cpu(
    const at::Tensor& query, const at::Tensor& keys, const at::Tensor& positive,
    const std::optional<at::Tensor>& bank, double temperature, int64_t group_size) {
  at::NoGradGuard no_grad;
  Prepared p = prepare(query, keys, positive, bank, temperature, group_size);
  return forward_impl(p, group_size, true, query.options().dtype(p.acc));
}

namespace {

// Backward core. Without bank_mean every bank tile is recomputed from the saved lse; with it (from
// _info_nce_train) the bank part of grad_query is coef_i * bank_mean_i and the bank is not visited.
// Only the gradients asked for are formed: without need_gk no grad_keys accumulator exists and the
// W^T @ qs products are skipped; without need_gq the bank (which only feeds grad_query) is skipped.
std::tuple<at::Tensor, at::Tensor> backward_impl(
    const char* op, const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const std::optional<at::Tensor>& bank,
    const at::Tensor& lse, const at::Tensor& bank_mean, double temperature, int64_t group_size,
    bool need_gq, bool need_gk) {
  at::NoGradGuard no_grad;  // internal tensors never need autograd history
  Prepared p = prepare(query, keys, positive, bank, temperature, group_size);
  check_info_nce_backward_args(grad_loss, grad_lse, lse, query, op);
  const auto opts = query.options().dtype(p.acc);
  if (p.M == 0 || p.D == 0 || !(need_gq || need_gk)) {
    return {need_gq ? at::zeros(query.sizes(), query.options()) : skipped_grad(query),
            need_gk ? at::zeros(keys.sizes(), keys.options()) : skipped_grad(keys)};
  }
  at::Tensor gl = grad_loss.to(p.acc).contiguous();
  at::Tensor coef = (gl + grad_lse.to(p.acc)).contiguous();  // d(loss + lse)/d(softmax logits)
  at::Tensor lse_c = lse.to(p.acc).contiguous();
  at::Tensor gq = need_gq ? at::zeros({p.M, p.D}, opts) : at::Tensor();
  // One grad_keys accumulator per thread: row blocks of different threads hit the same keys. The
  // blocks a thread runs are fixed by at::parallel_for's static split, so the sum is reproducible.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  at::Tensor gk_parts = need_gk ? at::zeros({threads, p.N, p.D}, opts) : at::Tensor();

  const CpuBlocking blk = cpu_blocking(p.M);
  parallel_row_blocks(p.M, blk.rows, [&](int64_t r0, int64_t r1) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), threads - 1);
    at::Tensor gk = need_gk ? gk_parts[tid] : at::Tensor();     // [N, D]
    at::Tensor qb = p.qs.slice(0, r0, r1);                       // [R, D]
    at::Tensor gqb = need_gq ? gq.slice(0, r0, r1) : at::Tensor();  // [R, D]
    at::Tensor cb = coef.slice(0, r0, r1).unsqueeze(1);          // [R, 1]
    at::Tensor lb = lse_c.slice(0, r0, r1).unsqueeze(1);         // [R, 1]
    auto weights = [&](at::Tensor& s) { s.sub_(lb).exp_().mul_(cb); };  // W = c * softmax
    if (p.all_keys) {
      for_each_tile(p.keys, blk.cols, p.acc, [&](const at::Tensor& tile, int64_t c0, int64_t c1) {
        at::Tensor w = at::mm(qb, tile.t());  // [R, T]
        weights(w);
        if (need_gq) gqb.addmm_(w, tile);
        if (need_gk) gk.slice(0, c0, c1).addmm_(w.t(), qb);
      });
    } else {
      at::Tensor start = p.positive.slice(0, r0, r1).div(group_size, "floor").mul_(group_size);
      for_each_group_chunk(p.keys, start, group_size, p.acc, [&](const at::Tensor& kg, const at::Tensor& idx) {
        at::Tensor w = at::bmm(kg, qb.unsqueeze(2)).squeeze(2);  // [R, gc]
        weights(w);
        if (need_gq) gqb.add_(at::bmm(w.unsqueeze(1), kg).squeeze(1));
        if (need_gk) {
          gk.index_add_(0, idx.reshape(-1), (w.unsqueeze(2) * qb.unsqueeze(1)).reshape({-1, p.D}));
        }
      });
    }
    if (need_gq && bank_mean.defined()) {
      gqb.addcmul_(bank_mean.slice(0, r0, r1), cb);
    } else if (need_gq) {
      for_each_tile(p.bank, blk.cols, p.acc, [&](const at::Tensor& tile, int64_t, int64_t) {
        at::Tensor w = at::mm(qb, tile.t());
        weights(w);
        gqb.addmm_(w, tile);
      });
    }
    // The positive logit enters the loss with -grad_loss.
    at::Tensor pb = p.positive.slice(0, r0, r1);
    at::Tensor glb = gl.slice(0, r0, r1).unsqueeze(1);
    if (need_gq) gqb.sub_(p.keys.index_select(0, pb).to(p.acc) * glb);
    if (need_gk) gk.index_add_(0, pb, qb * glb, -1.0);
  });
  return {need_gq ? gq.mul_(1.0 / temperature).to(query.scalar_type()) : skipped_grad(query),
          need_gk ? gk_parts.sum(0).to(keys.scalar_type()) : skipped_grad(keys)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> info_nce_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const std::optional<at::Tensor>& bank,
    const at::Tensor& lse, double temperature, int64_t group_size, bool need_grad_query,
    bool need_grad_keys) {
  return backward_impl("upreid::_info_nce_backward", grad_loss, grad_lse, query, keys, positive,
                       bank, lse, at::Tensor(), temperature, group_size, need_grad_query,
                       need_grad_keys);
}

std::tuple<at::Tensor, at::Tensor> info_nce_train_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& grad_lse, const at::Tensor& query,
    const at::Tensor& keys, const at::Tensor& positive, const at::Tensor& lse,
    const at::Tensor& bank_mean, double temperature, int64_t group_size, bool need_grad_query,
    bool need_grad_keys) {
  constexpr const char* op = "upreid::_info_nce_train_backward";
  check_bank_mean(bank_mean, query, op);
  return backward_impl(op, grad_loss, grad_lse, query, keys, positive, std::nullopt, lse,
                       bank_mean.to(acc_dtype(query.scalar_type())).contiguous(), temperature,
                       group_size, need_grad_query, need_grad_keys);
}

}  // namespace upreid

TORCH_LIBRARY_IMPL(upreid, CPU, m) {
  m.impl("info_nce", &upreid::info_nce_cpu);
  m.impl("_info_nce_backward", &upreid::info_nce_backward_cpu);
  m.impl("_info_nce_train", &upreid::info_nce_train_cpu);
  m.impl("_info_nce_train_backward", &upreid::info_nce_train_backward_cpu);
}

// Emulation driver of the info_nce kernels: what info_nce_cuda.cpp does around the launchers
// (workspace query and allocation, launch), behind a C ABI for the test harness.
#include "info_nce/info_nce_kernel.cuh"

#include "common.h"

using namespace upreid::cuda;

extern "C" int emu_info_nce(int kind, int dtype, const void* query, const void* keys,
                            const int64_t* positive, const void* bank, int64_t M, int64_t N, int64_t K,
                            int64_t D, int64_t group_size, double temperature, void* loss, void* lse,
                            void* bank_mean, const void* grad_loss, const void* grad_lse,
                            const void* lse_in, const void* bank_mean_in, void* grad_query,
                            void* grad_keys, int need_grad_query, int need_grad_keys) {
  // kind: 0 forward, 1 training forward (bank_mean), 2 backward, 3 training backward (bank_mean_in)
  InfoNceParams p;
  p.query = query;
  p.keys = keys;
  p.positive = positive;
  p.bank = K > 0 ? bank : nullptr;
  p.M = M;
  p.N = N;
  p.K = K;
  p.D = D;
  p.group_size = group_size;
  p.temperature = temperature;
  p.fp32_precision = upreid_emu_driver::g_fp32_precision;
  p.loss = loss;
  p.lse = lse;
  p.bank_mean = bank_mean;
  p.grad_loss = grad_loss;
  p.grad_lse = grad_lse;
  p.lse_in = lse_in;
  p.bank_mean_in = bank_mean_in;
  p.grad_query = grad_query;
  p.grad_keys = grad_keys;
  p.need_grad_query = need_grad_query != 0;
  p.need_grad_keys = need_grad_keys != 0;
  const DType dt = static_cast<DType>(dtype);
  size_t bytes = 0;
  cudaError_t e = kind == 0   ? info_nce_forward_workspace(p, dt, &bytes)
                  : kind == 1 ? info_nce_train_forward_workspace(p, dt, &bytes)
                  : kind == 2 ? info_nce_backward_workspace(p, dt, &bytes)
                              : info_nce_train_backward_workspace(p, dt, &bytes);
  if (e != cudaSuccess) return int(e);
  upreid_emu_driver::Buffer work(bytes);
  p.workspace = work.get();
  p.workspace_bytes = bytes;
  e = kind == 0   ? info_nce_forward(p, dt, nullptr)
      : kind == 1 ? info_nce_train_forward(p, dt, nullptr)
      : kind == 2 ? info_nce_backward(p, dt, nullptr)
                  : info_nce_train_backward(p, dt, nullptr);
  return int(e);
}

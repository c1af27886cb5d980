// Kernels with known defects (and their correct twins) that prove the emulator's checks fire:
// barrier divergence, warp-mask errors, deadlock, launch limits, __trap, dynamic shared memory
// overrun, poisoned shared memory, and (race mode) missing barriers around shared memory and WMMA.
#include <cuda_runtime.h>
#include <mma.h>

#include "common/cuda_utils.cuh"

namespace upreid {
namespace cuda {
namespace {

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void mask_excludes_caller(int* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, int(threadIdx.x), 0);
}

__global__ void reads_lane_outside_mask(int* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_sync(0x0000ffffu, int(threadIdx.x), 20);
}

__global__ void lanes_exit_before_collective(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

__global__ void deadlock(int* out) {
  if (threadIdx.x == 0) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void warp_sum_ok(int* out) {  // the correct collective: every lane gets 0 + 1 + ... + 31
  out[threadIdx.x] = warp_sum<int>(int(threadIdx.x & 31));
}

__global__ void traps(int* out) {
  if (threadIdx.x == 3) __trap();
  out[threadIdx.x] = 1;
}

__global__ void overruns_dynamic_smem(int* out, int n) {
  UPREID_DYNAMIC_SMEM(smem, 16);
  if (threadIdx.x == 0) smem[n] = 1;  // one byte past the n launched
  out[0] = 1;
}

__global__ void reads_unwritten_smem(unsigned* out) {
  __shared__ unsigned st[4];
  UPREID_DYNAMIC_SMEM(dyn, 16);
  // (a static that is never written would be folded to its C++ zero-initialiser by the host
  // compiler: the write the launch never takes keeps it a real load)
  if (out[7] == 12345u) st[1] = 0;
  if (threadIdx.x == 0) {
    out[0] = st[1];
    out[1] = reinterpret_cast<unsigned*>(dyn)[1];
  }
}

// Thread 0 publishes a value in shared memory; the others read it, with or without a barrier.
__global__ void publish(int* out, bool barrier) {
  __shared__ int v;
  if (threadIdx.x == 0) v = 42;
  if (barrier) __syncthreads();
  out[threadIdx.x] = v;
}

// Lanes store a WMMA accumulator to shared memory, then every lane reads another lane's element.
__global__ void wmma_exchange(float* out, bool sync) {
  __shared__ float tile[16 * 16];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  nvcuda::wmma::fill_fragment(acc, float(threadIdx.x));
  nvcuda::wmma::store_matrix_sync(tile, acc, 16, nvcuda::wmma::mem_row_major);
  if (sync) __syncwarp();
  out[threadIdx.x] = tile[(threadIdx.x * 8 + 1) % 256];
}

// D = A B + C on the WMMA stand-in, A and B from memory (row-major 16 x 16, fp16).
__global__ void wmma_product(const __half* a, const __half* b, const float* c, float* d) {
  using namespace nvcuda::wmma;
  fragment<matrix_a, 16, 16, 16, __half, row_major> fa;
  fragment<matrix_b, 16, 16, 16, __half, row_major> fb;
  fragment<accumulator, 16, 16, 16, float> fc;
  load_matrix_sync(fa, a, 16);
  load_matrix_sync(fb, b, 16);
  load_matrix_sync(fc, c, 16, mem_row_major);
  mma_sync(fc, fa, fb, fc);
  store_matrix_sync(d, fc, 16, mem_row_major);
}

}  // namespace
}  // namespace cuda
}  // namespace upreid

using namespace upreid::cuda;

// Runs case `which` with a block of `threads` threads (grid gx x gy), `smem` bytes of dynamic shared
// memory (after opting in to `optin` bytes when > 0). Returns cudaGetLastError().
extern "C" int emu_selftest(int which, unsigned gx, unsigned gy, unsigned threads, size_t smem, int optin,
                            void* out, const void* a, const void* b, const void* c) {
  int* io = static_cast<int*>(out);
  const dim3 grid(gx, gy), block(threads);
  switch (which) {
    case 0: launch(divergent_barrier, grid, block, smem, nullptr, io); break;
    case 1: launch(mask_excludes_caller, grid, block, smem, nullptr, io); break;
    case 2: launch(reads_lane_outside_mask, grid, block, smem, nullptr, io); break;
    case 3: launch(lanes_exit_before_collective, grid, block, smem, nullptr, io); break;
    case 4: launch(deadlock, grid, block, smem, nullptr, io); break;
    case 5: launch(warp_sum_ok, grid, block, smem, nullptr, io); break;
    case 6: launch(traps, grid, block, smem, nullptr, io); break;
    case 7: launch(overruns_dynamic_smem, grid, block, smem, nullptr, io, int(smem)); break;
    case 8:
      if (optin > 0) cudaFuncSetAttribute(reads_unwritten_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
      launch(reads_unwritten_smem, grid, block, smem, nullptr, static_cast<unsigned*>(out));
      break;
    case 9: launch(publish, grid, block, smem, nullptr, io, false); break;
    case 10: launch(publish, grid, block, smem, nullptr, io, true); break;
    case 11: launch(wmma_exchange, grid, block, smem, nullptr, static_cast<float*>(out), false); break;
    case 12: launch(wmma_exchange, grid, block, smem, nullptr, static_cast<float*>(out), true); break;
    case 13:
      launch(wmma_product, grid, block, smem, nullptr, static_cast<const __half*>(a),
             static_cast<const __half*>(b), static_cast<const float*>(c), static_cast<float*>(out));
      break;
    default: return int(cudaErrorInvalidValue);
  }
  return int(cudaGetLastError());
}

// Momentum update of one or two memory banks in one launch. Block i owns batch entry i: it skips when
// the same id occurs later in idx (the last duplicate wins, whatever the block order), else mixes the old
// row with values[i], renormalises and writes it, for every bank. Each row is written by one block only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.cuh"
#include "launchers.h"

namespace gdrd::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxBanks = 2;

struct Banks {
  void* memory[kMaxBanks];
  const void* values[kMaxBanks];
};

template <typename acc_t>
__device__ acc_t block_sum(acc_t x, acc_t* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  __syncthreads();  // scratch is reused by the next call
  return total;
}

template <typename acc_t, typename mem_t, typename idx_t>
__global__ void __launch_bounds__(kThreads)
bank_update_kernel(Banks banks, int n_banks, const idx_t* __restrict__ idx, int64_t n, int dim, acc_t momentum) {
  __shared__ acc_t scratch[kThreads / 32];
  const int64_t i = blockIdx.x;
  const idx_t id = idx[i];
  bool later = false;
  for (int64_t j = i + 1 + threadIdx.x; j < n; j += kThreads) later |= idx[j] == id;
  if (__syncthreads_or(later)) return;
  for (int s = 0; s < n_banks; ++s) {
    mem_t* row = static_cast<mem_t*>(banks.memory[s]) + int64_t(id) * dim;
    const acc_t* value = static_cast<const acc_t*>(banks.values[s]) + i * dim;
    acc_t sq = 0;
    for (int d = threadIdx.x; d < dim; d += kThreads) {
      const acc_t mixed = momentum * to_acc<acc_t>(row[d]) + (acc_t(1) - momentum) * value[d];
      sq += mixed * mixed;
    }
    const acc_t norm = sqrt(block_sum(sq, scratch));
    const acc_t scale = acc_t(1) / (norm > acc_t(1e-12) ? norm : acc_t(1e-12));  // F.normalize's eps
    for (int d = threadIdx.x; d < dim; d += kThreads)  // the same thread read row[d] above
      store(row + d, (momentum * to_acc<acc_t>(row[d]) + (acc_t(1) - momentum) * value[d]) * scale);
  }
}

template <typename acc_t, typename mem_t>
cudaError_t launch(const Banks& banks, int n_banks, const void* idx, bool idx64, int64_t n, int64_t dim,
                   double momentum, cudaStream_t stream) {
  if (idx64)
    bank_update_kernel<acc_t, mem_t, int64_t><<<n, kThreads, 0, stream>>>(
        banks, n_banks, static_cast<const int64_t*>(idx), n, int(dim), acc_t(momentum));
  else
    bank_update_kernel<acc_t, mem_t, int32_t><<<n, kThreads, 0, stream>>>(
        banks, n_banks, static_cast<const int32_t*>(idx), n, int(dim), acc_t(momentum));
  return cudaGetLastError();
}

}  // namespace

cudaError_t bank_update_launch(void* const* memories, const void* const* values, int n_banks, Dtype memory,
                               const void* idx, bool idx64, int64_t n, int64_t dim, double momentum,
                               cudaStream_t stream) {
  if (n_banks < 1 || n_banks > kMaxBanks) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  Banks banks{};
  for (int s = 0; s < n_banks; ++s) {
    banks.memory[s] = memories[s];
    banks.values[s] = values[s];
  }
  switch (memory) {
    case Dtype::f32: return launch<float, float>(banks, n_banks, idx, idx64, n, dim, momentum, stream);
    case Dtype::f64: return launch<double, double>(banks, n_banks, idx, idx64, n, dim, momentum, stream);
    case Dtype::bf16: return launch<float, __nv_bfloat16>(banks, n_banks, idx, idx64, n, dim, momentum, stream);
    case Dtype::f16: return launch<float, __half>(banks, n_banks, idx, idx64, n, dim, momentum, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace gdrd::cuda

// Gathered CRD NCE loss on CUDA: one pass reads idx once, gathers row idx[b, k] of every side's bank,
// scores it and accumulates that side's loss and anchor gradient (docs/ops/crd.md, fusable form).
// A warp owns one column k at a time; lane l holds features l, l + 32, ... of the anchor and the row, so
// each row read is coalesced. Blocks (b, column range) meet through atomics on row b's outputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../crd_math.h"
#include "convert.cuh"
#include "launchers.h"

namespace gdrd::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kColumnsPerBlock = 512;
constexpr int kMaxPerLane = 16;  // D <= 512

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

template <int SIDES>
struct Sides {
  CrdSide side[SIDES];
};

template <typename acc_t, typename mem_t, typename idx_t, int SIDES, int PER_LANE>
__global__ void __launch_bounds__(kWarps * 32)
crd_nce_kernel(const Sides<SIDES> sides, const idx_t* __restrict__ idx, int64_t cols, int dim,
               acc_t inv_t, double log_c_eps, acc_t negative_offset) {
  __shared__ acc_t partial_grad[kWarps][PER_LANE * 32];
  __shared__ acc_t partial_loss[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x;
  const int64_t k_begin = int64_t(blockIdx.y) * kColumnsPerBlock;
  const int64_t k_end = cols < k_begin + kColumnsPerBlock ? cols : k_begin + kColumnsPerBlock;
  const idx_t* idx_b = idx + b * cols;

  acc_t anchor[SIDES][PER_LANE], grad[SIDES][PER_LANE], shift[SIDES], loss[SIDES];
#pragma unroll
  for (int s = 0; s < SIDES; ++s) {
    shift[s] = static_cast<acc_t>(*sides.side[s].log_z + log_c_eps);
    loss[s] = 0;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
      const int d = lane + 32 * j;
      anchor[s][j] = d < dim ? static_cast<const acc_t*>(sides.side[s].anchor)[b * dim + d] : acc_t(0);
      grad[s][j] = 0;
    }
  }
  const bool need_grad = sides.side[0].grad != nullptr;

  // COLS columns per step keep more row loads in flight (the loop is latency-bound) while registers allow
  constexpr int COLS = SIDES * PER_LANE <= 8 ? 2 : 1;
  for (int64_t k0 = k_begin + warp; k0 < k_end; k0 += kWarps * COLS) {
    acc_t row[COLS][SIDES][PER_LANE];
#pragma unroll
    for (int c = 0; c < COLS; ++c) {  // every load of the step is issued before any reduction
      const int64_t k = k0 + c * kWarps;
      const int64_t r = k < k_end ? int64_t(idx_b[k]) : 0;
#pragma unroll
      for (int s = 0; s < SIDES; ++s) {
        const mem_t* m = static_cast<const mem_t*>(sides.side[s].memory) + r * dim;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
          const int d = lane + 32 * j;
          row[c][s][j] = k < k_end && d < dim ? to_acc<acc_t>(__ldg(m + d)) : acc_t(0);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < COLS; ++c) {
      const int64_t k = k0 + c * kWarps;
      if (k >= k_end) break;  // uniform across the warp: the shuffles below stay converged
#pragma unroll
      for (int s = 0; s < SIDES; ++s) {
        acc_t dot = 0;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) dot += row[c][s][j] * anchor[s][j];
        const auto term = gdrd::nce_term(warp_sum(dot), k == 0, inv_t, shift[s]);
        loss[s] += term.loss;
        if (need_grad) {
#pragma unroll
          for (int j = 0; j < PER_LANE; ++j) grad[s][j] += term.dscore * row[c][s][j];
        }
      }
    }
  }

  // block reduction over warps, then one atomic per feature and block
#pragma unroll
  for (int s = 0; s < SIDES; ++s) {
    if (s > 0) __syncthreads();  // the buffers are reused by each side
    if (lane == 0) partial_loss[warp] = loss[s];
    if (need_grad) {
#pragma unroll
      for (int j = 0; j < PER_LANE; ++j) partial_grad[warp][lane + 32 * j] = grad[s][j];
    }
    __syncthreads();
    if (need_grad) {
      for (int d = threadIdx.x; d < dim; d += blockDim.x) {
        acc_t sum = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) sum += partial_grad[w][d];
        atomicAdd(static_cast<acc_t*>(sides.side[s].grad) + b * dim + d, sum);
      }
    }
    if (threadIdx.x == 0) {
      acc_t sum = blockIdx.y == 0 ? negative_offset * acc_t(cols - 1) : acc_t(0);
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += partial_loss[w];
      atomicAdd(static_cast<acc_t*>(sides.side[s].rows) + b, sum);
    }
  }
}

template <typename acc_t, typename mem_t, typename idx_t, int SIDES>
cudaError_t launch_sides(const CrdSide* host_sides, const void* idx, int64_t batch, int64_t cols, int64_t dim,
                         double inv_t, double c, double eps, cudaStream_t stream) {
  const dim3 grid(batch, (cols + kColumnsPerBlock - 1) / kColumnsPerBlock);  // x: 2^31 - 1 rows
  Sides<SIDES> sides;
  for (int s = 0; s < SIDES; ++s) sides.side[s] = host_sides[s];
  if (dim <= 128)
    crd_nce_kernel<acc_t, mem_t, idx_t, SIDES, 4><<<grid, kWarps * 32, 0, stream>>>(
        sides, static_cast<const idx_t*>(idx), cols, int(dim), acc_t(inv_t), std::log(c + eps),
        acc_t(std::log1p(eps / c)));
  else
    crd_nce_kernel<acc_t, mem_t, idx_t, SIDES, kMaxPerLane><<<grid, kWarps * 32, 0, stream>>>(
        sides, static_cast<const idx_t*>(idx), cols, int(dim), acc_t(inv_t), std::log(c + eps),
        acc_t(std::log1p(eps / c)));
  return cudaGetLastError();
}

template <typename acc_t, typename mem_t>
cudaError_t dispatch_idx(const CrdSide* host_sides, int n_sides, const void* idx, bool idx64, int64_t batch,
                         int64_t cols, int64_t dim, double inv_t, double c, double eps, cudaStream_t stream) {
  if (idx64)
    return n_sides == 1 ? launch_sides<acc_t, mem_t, int64_t, 1>(host_sides, idx, batch, cols, dim, inv_t, c, eps, stream)
                        : launch_sides<acc_t, mem_t, int64_t, 2>(host_sides, idx, batch, cols, dim, inv_t, c, eps, stream);
  return n_sides == 1 ? launch_sides<acc_t, mem_t, int32_t, 1>(host_sides, idx, batch, cols, dim, inv_t, c, eps, stream)
                      : launch_sides<acc_t, mem_t, int32_t, 2>(host_sides, idx, batch, cols, dim, inv_t, c, eps, stream);
}

}  // namespace

int max_dim() { return kMaxPerLane * 32; }

cudaError_t crd_nce_launch(const CrdSide* host_sides, int n_sides, Dtype acc, Dtype memory, const void* idx,
                           bool idx64, int64_t batch, int64_t cols, int64_t dim, double inv_t, double c,
                           double eps, cudaStream_t stream) {
  if (acc == Dtype::f64 && memory == Dtype::f64)
    return dispatch_idx<double, double>(host_sides, n_sides, idx, idx64, batch, cols, dim, inv_t, c, eps, stream);
  if (acc != Dtype::f32) return cudaErrorInvalidValue;
  switch (memory) {
    case Dtype::f32: return dispatch_idx<float, float>(host_sides, n_sides, idx, idx64, batch, cols, dim, inv_t, c, eps, stream);
    case Dtype::bf16: return dispatch_idx<float, __nv_bfloat16>(host_sides, n_sides, idx, idx64, batch, cols, dim, inv_t, c, eps, stream);
    case Dtype::f16: return dispatch_idx<float, __half>(host_sides, n_sides, idx, idx64, batch, cols, dim, inv_t, c, eps, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gdrd::cuda

// Raw-pointer launchers of the pure-CUDA kernels (crd_nce.cu, bank_update.cu, queue.cu). The torch binding
// (bindings.cpp) checks and prepares tensors; the .cu files see only pointers, sizes and a stream,
// so they compile without the torch headers.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace gdrd::cuda {

enum class Dtype { f32, f64, f16, bf16 };

// One side of the gathered NCE loss. anchor is [B, D] in the accumulation dtype (f32, or f64 with an f64
// bank); rows [B] and grad [B, D] (nullptr without need_grad) are zero-filled, in the accumulation dtype.
struct CrdSide {  // passed to the kernel by value
  const void* anchor;
  const void* memory;  // [N, D]
  const double* log_z;  // on the device: read there, no host sync
  void* rows;
  void* grad;
};

// sides[0..n_sides) share idx [B, cols] (int32 or int64, column 0 = positive).
cudaError_t crd_nce_launch(const CrdSide* sides, int n_sides, Dtype acc, Dtype memory, const void* idx,
                           bool idx64, int64_t batch, int64_t cols, int64_t dim, double inv_t, double c,
                           double eps, cudaStream_t stream);

// memories[s][idx[i]] = normalize(m * memories[s][idx[i]] + (1 - m) * values[s][i]) for the last
// occurrence i of each id, both banks in one launch. values are [n, D] in f32 (f64 for an f64 bank).
cudaError_t bank_update_launch(void* const* memories, const void* const* values, int n_banks, Dtype memory,
                               const void* idx, bool idx64, int64_t n, int64_t dim, double momentum,
                               cudaStream_t stream);

// Ring-buffer push of rows [m, row_bytes] (already in the queue's dtype, the newest m of n pushed) to
// slots (*ptr + n - m + r) mod size, labels alongside (both label pointers nullptr for none); then ptr
// and count advance. ptr and count are device pointers: nothing syncs with the host.
cudaError_t queue_push_launch(void* queue, const void* rows, int64_t* queue_labels, const int64_t* labels,
                              int64_t* ptr, int64_t* count, int64_t size, int64_t n, int64_t m, int64_t row_bytes,
                              cudaStream_t stream);

// out [batch, k]: draws of csrc/sampling.h over `filled` rows, skipping partner b's class in the stably
// sorted labels (sorted_labels, order nullptr: uniform over all filled rows). seed is a device pointer.
cudaError_t queue_sample_launch(int64_t* out, const int64_t* sorted_labels, const int64_t* order,
                                const int64_t* partner, const int64_t* seed, int64_t filled, int64_t batch,
                                int64_t k, cudaStream_t stream);

int max_dim();  // the largest D the kernels take

}  // namespace gdrd::cuda

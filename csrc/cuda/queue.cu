// MemoryQueue kernels. queue_push: block r copies kept row r to its ring slot, read from the device
// pointer (no host sync), then a one-thread kernel advances ptr and count after every block has read it.
// queue_sample: block (b, chunk) draws negatives of partner b with csrc/sampling.h's counter hash.
#include <cuda_runtime.h>

#include <cstdint>

#include "../sampling.h"
#include "launchers.h"

namespace gdrd::cuda {
namespace {

constexpr int kCopyThreads = 128;
constexpr int kSampleThreads = 256;

template <typename word_t>
__global__ void __launch_bounds__(kCopyThreads)
queue_push_kernel(word_t* __restrict__ queue, const word_t* __restrict__ rows, int64_t* __restrict__ queue_labels,
                  const int64_t* __restrict__ labels, const int64_t* __restrict__ ptr, int64_t size, int64_t first,
                  int64_t words) {
  const int64_t r = blockIdx.x;
  const int64_t slot = (*ptr + first + r) % size;
  for (int64_t w = threadIdx.x; w < words; w += kCopyThreads) queue[slot * words + w] = rows[r * words + w];
  if (queue_labels != nullptr && threadIdx.x == 0) queue_labels[slot] = labels[r];
}

__global__ void queue_advance_kernel(int64_t* ptr, int64_t* count, int64_t size, int64_t n) {
  *ptr = (*ptr + n) % size;
  *count = *count + n < size ? *count + n : size;
}

template <typename word_t>
cudaError_t launch_push(void* queue, const void* rows, int64_t* queue_labels, const int64_t* labels,
                        const int64_t* ptr, int64_t size, int64_t first, int64_t m, int64_t row_bytes,
                        cudaStream_t stream) {
  queue_push_kernel<word_t><<<m, kCopyThreads, 0, stream>>>(static_cast<word_t*>(queue),
                                                            static_cast<const word_t*>(rows), queue_labels, labels,
                                                            ptr, size, first, row_bytes / int64_t(sizeof(word_t)));
  return cudaGetLastError();
}

__global__ void __launch_bounds__(kSampleThreads)
queue_sample_kernel(int64_t* __restrict__ out, const int64_t* __restrict__ sorted_labels,
                    const int64_t* __restrict__ order, const int64_t* __restrict__ partner,
                    const int64_t* __restrict__ seed, int64_t filled, int64_t k) {
  __shared__ int64_t lo, same;
  const int64_t b = blockIdx.x;
  if (threadIdx.x == 0) {  // the partner's class is the run [lo, lo + same) of the sorted labels
    lo = sorted_labels != nullptr ? sorted_bound(sorted_labels, filled, partner[b], false) : 0;
    same = sorted_labels != nullptr ? sorted_bound(sorted_labels, filled, partner[b], true) - lo : 0;
  }
  __syncthreads();
  const int64_t j = int64_t(blockIdx.y) * kSampleThreads + threadIdx.x;
  if (j >= k) return;
  const int64_t valid = filled - same;
  const double u = counter_uniform(row_key(static_cast<uint64_t>(*seed), b), uint32_t(j));
  const int64_t pos = skip_class(uniform_index(u, valid), lo, same);
  out[b * k + j] = valid == 0 ? -1 : (order != nullptr ? order[pos] : pos);
}

}  // namespace

cudaError_t queue_push_launch(void* queue, const void* rows, int64_t* queue_labels, const int64_t* labels,
                              int64_t* ptr, int64_t* count, int64_t size, int64_t n, int64_t m, int64_t row_bytes,
                              cudaStream_t stream) {
  if (m > 0) {
    // the widest word that divides the row and both base addresses
    const auto aligned = [&](int64_t w) {
      return row_bytes % w == 0 && reinterpret_cast<uintptr_t>(queue) % w == 0 &&
             reinterpret_cast<uintptr_t>(rows) % w == 0;
    };
    const int64_t first = n - m;
    cudaError_t err;
    if (aligned(16)) err = launch_push<uint4>(queue, rows, queue_labels, labels, ptr, size, first, m, row_bytes, stream);
    else if (aligned(8)) err = launch_push<uint2>(queue, rows, queue_labels, labels, ptr, size, first, m, row_bytes, stream);
    else if (aligned(4)) err = launch_push<uint32_t>(queue, rows, queue_labels, labels, ptr, size, first, m, row_bytes, stream);
    else if (aligned(2)) err = launch_push<uint16_t>(queue, rows, queue_labels, labels, ptr, size, first, m, row_bytes, stream);
    else err = launch_push<uint8_t>(queue, rows, queue_labels, labels, ptr, size, first, m, row_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  queue_advance_kernel<<<1, 1, 0, stream>>>(ptr, count, size, n);
  return cudaGetLastError();
}

cudaError_t queue_sample_launch(int64_t* out, const int64_t* sorted_labels, const int64_t* order,
                                const int64_t* partner, const int64_t* seed, int64_t filled, int64_t batch,
                                int64_t k, cudaStream_t stream) {
  const int64_t chunks = (k + kSampleThreads - 1) / kSampleThreads;
  if (chunks > 65535 || batch > 2147483647) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  queue_sample_kernel<<<dim3(unsigned(batch), unsigned(chunks)), kSampleThreads, 0, stream>>>(
      out, sorted_labels, order, partner, seed, filled, k);
  return cudaGetLastError();
}

}  // namespace gdrd::cuda

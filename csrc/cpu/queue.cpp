// CPU kernels of the MemoryQueue ops: queue_push_ (FIFO ring-buffer write) and queue_sample_negatives
// (uniform or "other class" draws from csrc/sampling.h's counter hash).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../sampling.h"

namespace {

// A ring this large is far bigger than the cache, and a row written now is read again only after the whole
// ring has been passed over: caching it would first read each destination line from memory and then evict
// data that is still in use. Such copies bypass the cache (streaming stores), about twice as fast.
constexpr int64_t kStreamRingBytes = int64_t(4) << 20;
constexpr int64_t kStreamCopyBytes = int64_t(64) << 10;

void copy_bytes(char* dst, const char* src, int64_t n, bool stream) {
#if defined(__SSE2__)
  if (stream) {
    const int64_t head = std::min(n, int64_t((16 - reinterpret_cast<std::uintptr_t>(dst) % 16) % 16));
    std::memcpy(dst, src, head);
    int64_t i = head;
    for (; i + 16 <= n; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    std::memcpy(dst + i, src + i, n - i);
    _mm_sfence();  // streaming stores are weakly ordered: make them visible before the call returns
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// Rows [first, first + m) of src go to ring slots (start + i) mod size: at most two contiguous copies.
void ring_copy(char* dst, const char* src, int64_t start, int64_t m, int64_t size, int64_t row_bytes) {
  const int64_t head = std::min(m, size - start);
  const bool stream = size * row_bytes >= kStreamRingBytes && m * row_bytes >= kStreamCopyBytes;
  copy_bytes(dst + start * row_bytes, src, head * row_bytes, stream);
  copy_bytes(dst, src + head * row_bytes, (m - head) * row_bytes, stream);
}

void queue_push_(at::Tensor queue, at::Tensor ptr, at::Tensor count, const at::Tensor& values,
                 const c10::optional<at::Tensor>& labels, const c10::optional<at::Tensor>& queue_labels) {
  TORCH_CHECK(queue.dim() == 2 && queue.is_contiguous(), "queue_push_: the queue must be a contiguous 2-D tensor");
  TORCH_CHECK(values.dim() == 2 && values.size(1) == queue.size(1), "queue_push_: values must be [n, ",
              queue.size(1), "], got ", values.sizes());
  TORCH_CHECK(ptr.numel() == 1 && count.numel() == 1 && ptr.scalar_type() == at::kLong &&
                  count.scalar_type() == at::kLong,
              "queue_push_: ptr and count must be one-element int64 tensors");
  TORCH_CHECK(labels.has_value() == queue_labels.has_value(), "queue_push_: labels and queue_labels go together");
  const int64_t size = queue.size(0), n = values.size(0), m = std::min(n, size);
  int64_t* const ptr_value = ptr.data_ptr<int64_t>();  // one-element CPU tensors: read and written in place
  int64_t* const count_value = count.data_ptr<int64_t>();
  const int64_t old_ptr = *ptr_value;
  TORCH_CHECK(old_ptr >= 0 && old_ptr < size, "queue_push_: ptr ", old_ptr, " is outside [0, ", size, ")");
  // only the newest `size` rows survive a long push; they start at slot (ptr + n - m) mod size
  const int64_t start = (old_ptr + n - m) % size;
  const auto src = values.narrow(0, n - m, m).to(queue.scalar_type()).contiguous();
  ring_copy(static_cast<char*>(queue.data_ptr()), static_cast<const char*>(src.data_ptr()), start, m, size,
            queue.size(1) * queue.element_size());
  if (queue_labels.has_value()) {
    TORCH_CHECK(queue_labels->dim() == 1 && queue_labels->size(0) == size && queue_labels->is_contiguous() &&
                    queue_labels->scalar_type() == at::kLong,
                "queue_push_: queue_labels must be a contiguous int64 tensor of the queue's length");
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == n, "queue_push_: labels must be [n]");
    const auto y = labels->narrow(0, n - m, m).to(at::kLong).contiguous();
    ring_copy(static_cast<char*>(queue_labels->data_ptr()), static_cast<const char*>(y.data_ptr()), start, m,
              size, sizeof(int64_t));
  }
  *ptr_value = (old_ptr + n) % size;
  *count_value = std::min(*count_value + n, size);
}

at::Tensor queue_sample_negatives(const c10::optional<at::Tensor>& queue_labels, int64_t filled,
                                  const at::Tensor& partner_labels, const at::Tensor& seed, int64_t k) {
  TORCH_CHECK(filled > 0 && k > 0, "queue_sample_negatives: need filled > 0 and k > 0");
  TORCH_CHECK(partner_labels.dim() == 1, "queue_sample_negatives: partner_labels must be 1-D");
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "queue_sample_negatives: seed must be one int64");
  TORCH_CHECK(k <= (int64_t(1) << 32), "queue_sample_negatives: k must be < 2**32");
  const int64_t batch = partner_labels.size(0);
  const auto seed_bits = static_cast<uint64_t>(seed.item<int64_t>());
  auto out = at::empty({batch, k}, partner_labels.options().dtype(at::kLong));
  int64_t* dst = out.data_ptr<int64_t>();
  if (!queue_labels.has_value()) {
    at::parallel_for(0, batch, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const uint32_t key = gdrd::row_key(seed_bits, b);
        for (int64_t j = 0; j < k; ++j) dst[b * k + j] = gdrd::uniform_index(gdrd::counter_uniform(key, j), filled);
      }
    });
    return out;
  }
  TORCH_CHECK(queue_labels->dim() == 1 && queue_labels->size(0) >= filled,
              "queue_sample_negatives: queue_labels must be 1-D with at least `filled` entries");
  // stable, so equal labels keep queue order and every backend ranks the rows alike; sorted here on the host
  // (no tensors made: on a small queue at::sort's allocations cost more than the sort)
  const auto labels = queue_labels->narrow(0, 0, filled).to(at::kLong).contiguous();
  const int64_t* label = labels.data_ptr<int64_t>();
  std::vector<int64_t> order(filled), sorted_labels(filled);
  for (int64_t i = 0; i < filled; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return label[a] < label[b]; });
  for (int64_t i = 0; i < filled; ++i) sorted_labels[i] = label[order[i]];
  const auto partner = partner_labels.to(at::kLong).contiguous();
  const int64_t* sorted = sorted_labels.data();
  const int64_t* rows = order.data();
  const int64_t* y = partner.data_ptr<int64_t>();
  at::parallel_for(0, batch, std::max<int64_t>(1, 4096 / k), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = gdrd::sorted_bound(sorted, filled, y[b], false);
      const int64_t same = gdrd::sorted_bound(sorted, filled, y[b], true) - lo;
      const int64_t valid = filled - same;
      const uint32_t key = gdrd::row_key(seed_bits, b);
      for (int64_t j = 0; j < k; ++j)
        dst[b * k + j] = valid == 0 ? -1
                                    : rows[gdrd::skip_class(
                                          gdrd::uniform_index(gdrd::counter_uniform(key, j), valid), lo, same)];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdrd_fast_C, CPU, m) {
  m.impl("queue_push_", &queue_push_);
  m.impl("queue_sample_negatives", &queue_sample_negatives);
}

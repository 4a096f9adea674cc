// CPU kernels of bank_update_ and bank_update_pair_: rows[idx] = normalize(m * rows[idx] + (1 - m) * values),
// read before any write; with duplicate ids only the last occurrence is applied, so each row is written
// once and the result does not depend on thread order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

// Positions i of idx whose id does not occur again later in idx.
template <typename idx_t>
std::vector<int64_t> last_occurrences(const idx_t* idx, int64_t n) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return idx[x] < idx[y]; });
  std::vector<int64_t> keep;
  for (int64_t j = 0; j < n; ++j)
    if (j + 1 == n || idx[order[j + 1]] != idx[order[j]]) keep.push_back(order[j]);
  return keep;
}

// Two passes over the row (norm, then write) so nothing is stored in between; kLanes partial sums let the
// compiler vectorise the norm without reassociating floating-point adds.
template <typename acc_t, typename mem_t, typename val_t>
void mix_normalise(mem_t* __restrict__ row, const val_t* __restrict__ value, int64_t d, acc_t momentum) {
  constexpr int kLanes = 8;
  const acc_t keep = momentum, take = acc_t(1) - momentum;
  acc_t partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc_t mixed = keep * static_cast<acc_t>(row[i + l]) + take * static_cast<acc_t>(value[i + l]);
      partial[l] += mixed * mixed;
    }
  for (; i < d; ++i) {
    const acc_t mixed = keep * static_cast<acc_t>(row[i]) + take * static_cast<acc_t>(value[i]);
    partial[0] += mixed * mixed;
  }
  acc_t sq = 0;
  for (int l = 0; l < kLanes; ++l) sq += partial[l];
  const acc_t scale = acc_t(1) / std::max(std::sqrt(sq), acc_t(1e-12));  // F.normalize's eps
  for (i = 0; i < d; ++i)
    row[i] = static_cast<mem_t>((keep * static_cast<acc_t>(row[i]) + take * static_cast<acc_t>(value[i])) * scale);
}

// The rows sit at random places in a bank far larger than the cache: each one is a cache miss, and one
// row's arithmetic is too short for the CPU to overlap the next row's miss by itself, so the rows a few
// iterations ahead are requested early.
constexpr int64_t kPrefetchRows = 4;

template <typename mem_t>
inline void prefetch_row(const mem_t* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < d * int64_t(sizeof(mem_t)); offset += 64) __builtin_prefetch(bytes + offset, 1);
}

void update_banks(std::vector<at::Tensor> memories, std::vector<at::Tensor> values, const at::Tensor& idx_in,
                  double momentum) {
  TORCH_CHECK(idx_in.dim() == 1, "idx must be 1-D, got ", idx_in.sizes());
  TORCH_CHECK(momentum >= 0 && momentum < 1, "momentum must be in [0, 1), got ", momentum);
  for (size_t s = 0; s < memories.size(); ++s) {
    TORCH_CHECK(memories[s].is_cpu() && values[s].is_cpu() && idx_in.is_cpu(), "bank update: CPU tensors expected");
    TORCH_CHECK(memories[s].is_contiguous(), "bank update: the bank must be contiguous (it is updated in place)");
    TORCH_CHECK(values[s].dim() == 2 && values[s].size(0) == idx_in.size(0) &&
                    values[s].size(1) == memories[s].size(1),
                "bank update: values must be [len(idx), D], got ", values[s].sizes());
    values[s] = values[s].contiguous();
  }
  auto idx = idx_in.contiguous();
  const int64_t d = memories[0].size(1);
  AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "bank_update_cpu", [&] {
    const auto keep = last_occurrences(idx.data_ptr<index_t>(), idx.numel());
    const index_t* ids = idx.data_ptr<index_t>();
    for (size_t s = 0; s < memories.size(); ++s) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memories[s].scalar_type(), "bank_update_cpu_mem", [&] {
        using mem_t = scalar_t;
        mem_t* bank = memories[s].data_ptr<mem_t>();
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values[s].scalar_type(), "bank_update_cpu_val", [&] {
          const scalar_t* vals = values[s].data_ptr<scalar_t>();
          // float64 where the bank or the values are float64, else float32
          using acc_t = std::conditional_t<std::is_same_v<mem_t, double> || std::is_same_v<scalar_t, double>,
                                           double, float>;
          // threads only pay off beyond a few thousand rows' worth of work
          const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / d);
          at::parallel_for(0, static_cast<int64_t>(keep.size()), grain, [&](int64_t begin, int64_t end) {
            for (int64_t j = begin; j < end; ++j) {
              if (j + kPrefetchRows < end) prefetch_row(bank + int64_t(ids[keep[j + kPrefetchRows]]) * d, d);
              mix_normalise<acc_t>(bank + int64_t(ids[keep[j]]) * d, vals + keep[j] * d, d, acc_t(momentum));
            }
          });
        });
      });
    }
  });
}

void bank_update_(at::Tensor memory, const at::Tensor& idx, const at::Tensor& values, double momentum) {
  update_banks({memory}, {values}, idx, momentum);
}

void bank_update_pair_(at::Tensor memory_a, const at::Tensor& values_a, at::Tensor memory_b,
                       const at::Tensor& values_b, const at::Tensor& idx, double momentum) {
  TORCH_CHECK(memory_a.size(0) == memory_b.size(0), "bank_update_pair_: both banks need the same number of rows");
  update_banks({memory_a, memory_b}, {values_a, values_b}, idx, momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(gdrd_fast_C, CPU, m) {
  m.impl("bank_update_", &bank_update_);
  m.impl("bank_update_pair_", &bank_update_pair_);
}

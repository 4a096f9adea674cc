// CPU kernels of crd_nce_forward and crd_nce_pair_forward: one pass over the gathered rows, parallel
// over the batch. Each bank row is read once per (b, k), scored and, for the gradient, added into the
// anchor's gradient at once, so nothing of size B(K+1)D is ever stored. crd_log_z scores the same rows
// into one log-sum-exp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <vector>

#include "../crd_math.h"

namespace {

constexpr int64_t kPrefetchDistance = 4;  // columns ahead: enough to hide a DRAM miss behind 4 rows of work
constexpr int64_t kCacheLine = 64;

// Every cache line of a row: a bank row spans several lines and __builtin_prefetch fetches one.
template <typename mem_t>
inline void prefetch_row(const mem_t* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < d * int64_t(sizeof(mem_t)); offset += kCacheLine) __builtin_prefetch(p + offset);
}

template <typename acc_t, typename mem_t>
inline acc_t dot(const mem_t* row, const acc_t* anchor, int64_t d) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += static_cast<acc_t>(row[i]) * anchor[i];
  return sum;
}

template <typename acc_t, typename mem_t>
inline void axpy(acc_t* out, acc_t alpha, const mem_t* row, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] += alpha * static_cast<acc_t>(row[i]);
}

// One side: anchors (accumulation dtype, contiguous), its bank, its shift log Z + log(c + eps), outputs.
template <typename acc_t, typename mem_t>
struct Side {
  const acc_t* anchor;
  const mem_t* memory;
  acc_t shift;
  acc_t* rows;
  acc_t* grad;  // nullptr without need_grad
};

template <typename acc_t, typename mem_t, typename idx_t, size_t SIDES>
void gathered_nce(const std::array<Side<acc_t, mem_t>, SIDES>& sides, const idx_t* idx, int64_t batch,
                  int64_t cols, int64_t d, acc_t inv_t, double negative_offset) {
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const idx_t* idx_b = idx + b * cols;
      // fp64 row sums: K+1 positive fp32 terms added in order would drift by up to (K+1) ulp (1e-4 at K = 70k)
      std::array<double, SIDES> loss{};
      for (const auto& side : sides)
        if (side.grad) std::fill_n(side.grad + b * d, d, acc_t(0));
      for (int64_t k = 0; k < cols; ++k) {
        const int64_t r = idx_b[k];
        if (k + kPrefetchDistance < cols)  // rows are random gathers: fetch ahead of use
          for (const auto& side : sides) prefetch_row(side.memory + int64_t(idx_b[k + kPrefetchDistance]) * d, d);
        for (size_t s = 0; s < SIDES; ++s) {
          const auto& side = sides[s];
          const mem_t* row = side.memory + r * d;
          auto term = gdrd::nce_term(dot(row, side.anchor + b * d, d), k == 0, inv_t, side.shift);
          loss[s] += static_cast<double>(term.loss);
          if (side.grad) axpy(side.grad + b * d, term.dscore, row, d);
        }
      }
      for (size_t s = 0; s < SIDES; ++s) sides[s].rows[b] = static_cast<acc_t>(loss[s] + negative_offset * double(cols - 1));
    }
  });
}

struct SideTensors {
  at::Tensor anchor, memory, rows, grad;
  double log_z;
};

SideTensors prepare_side(const char* name, const at::Tensor& anchor, const at::Tensor& memory,
                         const at::Tensor& log_z, const at::Tensor& idx, bool need_grad) {
  TORCH_CHECK(anchor.dim() == 2 && memory.dim() == 2 && anchor.size(1) == memory.size(1), name,
              ": anchor [B, D] and memory [N, D] must share D, got ", anchor.sizes(), " and ", memory.sizes());
  TORCH_CHECK(anchor.size(0) == idx.size(0), name, ": anchor has ", anchor.size(0), " rows, idx ", idx.size(0));
  TORCH_CHECK(anchor.device().is_cpu() && memory.device().is_cpu() && log_z.device().is_cpu(), name,
              ": the CPU kernel needs CPU tensors");
  TORCH_CHECK(log_z.numel() == 1, name, ": log_z must hold one value");
  auto acc = anchor.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  SideTensors t;
  t.anchor = anchor.to(acc).contiguous();
  t.memory = memory.contiguous();
  t.rows = at::empty({anchor.size(0)}, anchor.options().dtype(acc));
  t.grad = need_grad ? at::empty(anchor.sizes(), anchor.options().dtype(acc)) : at::empty({0}, t.rows.options());
  t.log_z = log_z.item<double>();  // a CPU scalar: no device sync
  return t;
}

template <size_t SIDES>
void run(std::array<SideTensors, SIDES>& t, const at::Tensor& idx_in, double inv_t, double c, double eps) {
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(1) >= 2, "idx must be [B, K+1] with K >= 1, got ", idx_in.sizes());
  TORCH_CHECK(c > 0 && eps >= 0, "c must be > 0 and eps >= 0, got c=", c, ", eps=", eps);
  for (const auto& side : t)
    TORCH_CHECK(side.memory.scalar_type() == t[0].memory.scalar_type() &&
                    side.anchor.scalar_type() == t[0].anchor.scalar_type(),
                "both sides need the same anchor and memory dtypes");
  auto idx = idx_in.contiguous();
  const int64_t batch = idx.size(0), cols = idx.size(1), d = t[0].anchor.size(1);
  const double shift_c = std::log(c + eps), offset = std::log1p(eps / c);
  AT_DISPATCH_FLOATING_TYPES(t[0].anchor.scalar_type(), "crd_nce_cpu", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t[0].memory.scalar_type(), "crd_nce_cpu_memory", [&] {
      using mem_t = scalar_t;
      AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "crd_nce_cpu_idx", [&] {
        std::array<Side<acc_t, mem_t>, SIDES> sides;
        for (size_t s = 0; s < SIDES; ++s)
          sides[s] = {t[s].anchor.template data_ptr<acc_t>(), t[s].memory.template data_ptr<mem_t>(),
                      static_cast<acc_t>(t[s].log_z + shift_c), t[s].rows.template data_ptr<acc_t>(),
                      t[s].grad.numel() ? t[s].grad.template data_ptr<acc_t>() : nullptr};
        gathered_nce<acc_t, mem_t, index_t, SIDES>(sides, idx.data_ptr<index_t>(), batch, cols, d,
                                                   static_cast<acc_t>(inv_t), offset);
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> crd_nce_forward(const at::Tensor& anchor, const at::Tensor& memory,
                                                   const at::Tensor& idx, double inv_t, const at::Tensor& log_z,
                                                   double c, double eps, bool need_grad) {
  std::array<SideTensors, 1> t{prepare_side("crd_nce_forward", anchor, memory, log_z, idx, need_grad)};
  run(t, idx, inv_t, c, eps);
  return {t[0].rows, t[0].grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crd_nce_pair_forward(
    const at::Tensor& anchor_a, const at::Tensor& memory_a, const at::Tensor& log_z_a, const at::Tensor& anchor_b,
    const at::Tensor& memory_b, const at::Tensor& log_z_b, const at::Tensor& idx, double inv_t, double c, double eps,
    bool need_grad) {
  std::array<SideTensors, 2> t{prepare_side("crd_nce_pair_forward (side a)", anchor_a, memory_a, log_z_a, idx, need_grad),
                               prepare_side("crd_nce_pair_forward (side b)", anchor_b, memory_b, log_z_b, idx, need_grad)};
  run(t, idx, inv_t, c, eps);
  return {t[0].rows, t[0].grad, t[1].rows, t[1].grad};
}

// Online log-sum-exp in fp64: (running max, sum of exp(x - max)).
struct LogSumExp {
  double max = -INFINITY, sum = 0;
  void add(double x) {
    if (x <= max) {
      sum += std::exp(x - max);
    } else {
      sum = sum * std::exp(max - x) + 1;
      max = x;
    }
  }
  void merge(const LogSumExp& other) {
    if (other.sum == 0) return;
    if (sum == 0 || other.max > max) {
      sum = other.sum + sum * std::exp(max - other.max);
      max = other.max;
    } else {
      sum += other.sum * std::exp(other.max - max);
    }
  }
};

// logsumexp over all B(K+1) scores s[b, k] * inv_t, plus offset (log n_data - log B(K+1): CRD's log Z). Each
// score is the dot product of crd_nce_forward, in the accumulation dtype; the sum runs in fp64.
at::Tensor crd_log_z(const at::Tensor& anchor_in, const at::Tensor& memory_in, const at::Tensor& idx_in, double inv_t,
                     double offset) {
  TORCH_CHECK(anchor_in.dim() == 2 && memory_in.dim() == 2 && anchor_in.size(1) == memory_in.size(1),
              "crd_log_z: anchor [B, D] and memory [N, D] must share D, got ", anchor_in.sizes(), " and ",
              memory_in.sizes());
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(0) == anchor_in.size(0), "crd_log_z: idx must be [B, K+1], got ",
              idx_in.sizes());
  const auto acc = anchor_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto anchor = anchor_in.to(acc).contiguous();
  const auto memory = memory_in.contiguous();
  const auto idx = idx_in.contiguous();
  const int64_t batch = idx.size(0), cols = idx.size(1), d = anchor.size(1);
  auto out = at::empty({}, anchor.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "crd_log_z_cpu", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, memory.scalar_type(), "crd_log_z_cpu_memory", [&] {
      using mem_t = scalar_t;
      AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "crd_log_z_cpu_idx", [&] {
        const acc_t* a = anchor.data_ptr<acc_t>();
        const mem_t* m = memory.data_ptr<mem_t>();
        const index_t* id = idx.data_ptr<index_t>();
        std::vector<LogSumExp> rows(batch);
        at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b)
            for (int64_t k = 0; k < cols; ++k)
              rows[b].add(double(dot(m + int64_t(id[b * cols + k]) * d, a + b * d, d) * static_cast<acc_t>(inv_t)));
        });
        LogSumExp total;
        for (const auto& row : rows) total.merge(row);
        out.fill_(std::log(total.sum) + total.max + offset);
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdrd_fast_C, CPU, m) {
  m.impl("crd_nce_forward", &crd_nce_forward);
  m.impl("crd_nce_pair_forward", &crd_nce_pair_forward);
  m.impl("crd_log_z", &crd_log_z);
}

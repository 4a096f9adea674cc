// CPU kernel of the value check every call makes on CPU tensors (gdrd_fast/validation.py, through
// csrc/python/host.cpp's first_non_finite): whether a tensor holds no NaN and no Inf. An element is one of
// those exactly when its exponent bits are all set, so the kernel ORs one integer compare per element, no
// arithmetic and no rounding, and returns a bool rather than a tensor to read back. On x86-64 Linux the
// loop is also built for AVX2 and AVX-512 and the widest the CPU runs is picked at load time (a portable
// build is otherwise limited to SSE2).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "checks.h"

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define GDRD_WIDEST_VECTORS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GDRD_WIDEST_VECTORS
#endif

namespace {

constexpr int64_t kGrain = int64_t(1) << 18;  // elements per task: below that one thread reads faster

template <typename bits_t>
GDRD_WIDEST_VECTORS bool any_special(const bits_t* x, int64_t n, bits_t exponent) {
  bits_t special = 0;
  for (int64_t i = 0; i < n; ++i) special |= static_cast<bits_t>((x[i] & exponent) == exponent);
  return special != 0;
}

template <typename bits_t>
bool all_finite_bits(const at::Tensor& x, bits_t exponent) {
  const bits_t* data = static_cast<const bits_t*>(x.data_ptr());
  std::atomic<bool> special{false};
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (any_special<bits_t>(data + begin, end - begin, exponent)) special = true;
  });
  return !special;
}

}  // namespace

namespace gdrd {

bool all_finite(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "all_finite: the CPU kernel needs a CPU tensor");
  const auto x = t.contiguous();
  switch (x.scalar_type()) {
    case at::kFloat: return all_finite_bits<uint32_t>(x, 0x7f800000u);
    case at::kDouble: return all_finite_bits<uint64_t>(x, 0x7ff0000000000000ull);
    case at::kHalf: return all_finite_bits<uint16_t>(x, 0x7c00u);
    case at::kBFloat16: return all_finite_bits<uint16_t>(x, 0x7f80u);
    default: TORCH_CHECK(false, "all_finite: expected a floating-point tensor, got ", x.scalar_type());
  }
}

}  // namespace gdrd

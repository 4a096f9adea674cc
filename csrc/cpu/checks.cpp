// CPU kernel of the value check every call makes on small CPU tensors (gdrd_fast/validation.py): whether
// a tensor holds no NaN and no Inf, in one read without rounding (x * 0 is 0 for every finite x and NaN
// for NaN and +-Inf, so the sum of those products is 0 exactly when all are finite). It returns a bool,
// not a tensor to read back: what makes it cheaper than a torch sum on a few thousand elements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace {

constexpr int64_t kGrain = int64_t(1) << 16;  // elements per task: below that one thread reads faster

template <typename scalar_t, typename acc_t>
acc_t zero_products(const scalar_t* x, int64_t begin, int64_t end) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = begin; i < end; ++i) acc += static_cast<acc_t>(x[i]) * acc_t(0);
  return acc;
}

bool all_finite(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "all_finite: the CPU kernel needs a CPU tensor");
  const auto x = t.contiguous();
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "all_finite_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = x.data_ptr<scalar_t>();
    const acc_t sum = at::parallel_reduce(
        0, x.numel(), kGrain, acc_t(0),
        [&](int64_t begin, int64_t end, acc_t partial) { return partial + zero_products<scalar_t, acc_t>(data, begin, end); },
        [](acc_t a, acc_t b) { return a + b; });
    finite = sum == acc_t(0);
  });
  return finite;
}

}  // namespace

TORCH_LIBRARY_IMPL(gdrd_fast_C, CPU, m) { m.impl("all_finite", &all_finite); }

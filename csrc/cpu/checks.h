// The CPU value check (csrc/cpu/checks.cpp), called by csrc/python/host.cpp.
#pragma once
#include <ATen/ATen.h>

namespace gdrd {
// true when the floating-point CPU tensor t holds no NaN and no Inf (any strides)
bool all_finite(const at::Tensor& t);
}  // namespace gdrd

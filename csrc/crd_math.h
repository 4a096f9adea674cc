// Scalar numerics of CRD's fused NCE loss, shared by the CPU and CUDA kernels (docs/ops/crd.md).
// With l = s/T - log Z - log(c + eps): positive term softplus(-l), each negative softplus(l) + log((c+eps)/c),
// d/ds = (sigmoid(l) - [k == 0]) / T.
#pragma once
#include <cmath>

#include "host_device.h"

namespace gdrd {

// Loss and d loss / d s of score s at column k of a row (k == 0 is the positive). One exp serves all:
// with e = exp(-|l|) <= 1 (nothing overflows), softplus(+-l) = max(+-l, 0) + log1p(e), and sigmoid(l) and
// sigmoid(l) - 1 = -sigmoid(-l) are each 1 / (1 + e) or e / (1 + e), without cancellation.
template <typename T>
struct NceTerm {
  T loss, dscore;
};

template <typename T>
GDRD_HOST_DEVICE NceTerm<T> nce_term(T s, bool positive, T inv_t, T shift) {
  using std::exp;
  using std::log1p;
  const T l = s * inv_t - shift;
  const T e = exp(l > T(0) ? -l : l);
  const T hinge = positive ? (l < T(0) ? -l : T(0)) : (l > T(0) ? l : T(0));
  const T numerator = (l >= T(0)) != positive ? T(1) : e;
  return {hinge + log1p(e), (positive ? -numerator : numerator) / (T(1) + e) * inv_t};
}

}  // namespace gdrd

// Scalar numerics of CRD's fused NCE loss, shared by the CPU and CUDA kernels (method.md section 2).
// With l = s/T - log Z - log(c + eps): positive term softplus(-l), each negative softplus(l) + log((c+eps)/c),
// d/ds = (sigmoid(l) - [k == 0]) / T. Both forms are stable for any finite l.
#pragma once
#include <cmath>

#if defined(__CUDACC__)
#define GDRD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GDRD_HOST_DEVICE inline
#endif

namespace gdrd {

template <typename T>
GDRD_HOST_DEVICE T softplus(T x) {
  using std::exp;
  using std::log1p;
  return (x > T(0) ? x : T(0)) + log1p(exp(-(x > T(0) ? x : -x)));
}

template <typename T>
GDRD_HOST_DEVICE T sigmoid(T x) {
  using std::exp;
  T e = exp(-(x > T(0) ? x : -x));  // never overflows
  return x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// Loss and d loss / d s of score s at column k of a row (k == 0 is the positive).
template <typename T>
struct NceTerm {
  T loss, dscore;
};

template <typename T>
GDRD_HOST_DEVICE NceTerm<T> nce_term(T s, bool positive, T inv_t, T shift) {
  T l = s * inv_t - shift;
  return positive ? NceTerm<T>{softplus(-l), (sigmoid(l) - T(1)) * inv_t}
                  : NceTerm<T>{softplus(l), sigmoid(l) * inv_t};
}

}  // namespace gdrd

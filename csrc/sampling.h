// Counter-based negative sampling shared by the CPU and CUDA kernels (gdrd_fast/reference.py spells the
// same arithmetic in torch). Draw (row, col) is a pure function of (seed, row, col): no RNG state, no
// thread-order dependence, and every backend draws the same indices from the same seed.
#pragma once
#include <cstdint>

#include "host_device.h"

namespace gdrd {

// A bijective 32-bit integer hash (the "lowbias32" xorshift-multiply finaliser).
GDRD_HOST_DEVICE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  return x ^ (x >> 16);
}

// The per-row part of the counter hash; finish it per column with counter_uniform.
GDRD_HOST_DEVICE uint32_t row_key(uint64_t seed, uint64_t row) {
  uint32_t h = mix32(mix32(uint32_t(seed) ^ 0x9e3779b9u) ^ uint32_t(seed >> 32));
  return mix32(mix32(h ^ uint32_t(row)) ^ uint32_t(row >> 32));
}

// A uniform double in [0, 1) with 53 random bits. The sums and the power-of-two scaling are exact, so
// every compiler and device gets the same value.
GDRD_HOST_DEVICE double counter_uniform(uint32_t key, uint32_t col) {
  const uint32_t h = mix32(key ^ col);
  const uint32_t hi = mix32(h ^ 0x85ebca6bu) >> 11;
  const uint32_t lo = mix32(h ^ 0xc2b2ae35u);
  return (double(hi) * 4294967296.0 + double(lo)) * (1.0 / 9007199254740992.0);
}

// floor(u * n) in [0, n): one rounded product, so it agrees across backends.
GDRD_HOST_DEVICE int64_t uniform_index(double u, int64_t n) {
  const int64_t r = static_cast<int64_t>(u * static_cast<double>(n));
  return r < n ? r : n - 1;
}

// The first position of sorted[0, n) holding a value >= y (upper = false) or > y (upper = true).
GDRD_HOST_DEVICE int64_t sorted_bound(const int64_t* sorted, int64_t n, int64_t y, bool upper) {
  int64_t first = 0;
  for (int64_t count = n; count > 0;) {
    const int64_t half = count / 2;
    const int64_t v = sorted[first + half];
    if (v < y || (upper && v == y)) {
      first += half + 1;
      count -= half + 1;
    } else {
      count = half;
    }
  }
  return first;
}

// Rank r among rows sorted by label, counting only rows outside the partner's class [lo, lo + same).
GDRD_HOST_DEVICE int64_t skip_class(int64_t rank, int64_t lo, int64_t same) {
  return rank < lo ? rank : rank + same;
}

}  // namespace gdrd

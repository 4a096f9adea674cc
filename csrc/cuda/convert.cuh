// Element loads and stores of the banks' dtypes in the accumulation dtype (float, or double for f64 banks).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace gdrd::cuda {

template <typename T> __device__ __forceinline__ float to_float(T x) { return static_cast<float>(x); }
template <> __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_float(float x) { return __float2half(x); }

template <typename acc_t, typename mem_t>
__device__ __forceinline__ acc_t to_acc(mem_t x) { return static_cast<acc_t>(to_float(x)); }
template <>
__device__ __forceinline__ double to_acc<double, double>(double x) { return x; }

template <typename acc_t, typename mem_t>
__device__ __forceinline__ void store(mem_t* p, acc_t x) { *p = from_float<mem_t>(static_cast<float>(x)); }
template <>
__device__ __forceinline__ void store<double, double>(double* p, double x) { *p = x; }

}  // namespace gdrd::cuda

// Marks scalar helpers that the CPU (.cpp) and CUDA (.cu) kernels share.
#pragma once

#if defined(__CUDACC__)
#define GDRD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GDRD_HOST_DEVICE inline
#endif

// What the CUDA kernel headers (csrc/cuda/*.cuh) need from their compiler. Two compilers build
// the same headers:
//   * nvcc, for the extension tokcomp._C (csrc/cuda/*.cu): storage types are c10::Half and
//     c10::BFloat16, converted with c10's own conversions;
//   * NVRTC, for the cupy route (tokcomp/ops/cupy_kernels.py), which has no torch, CUDA runtime
//     or C++ standard headers (NVRTC defines __CUDACC_RTC__): 16-bit floats are the bit patterns
//     Half and BFloat16 below, converted with PTX (float16) and bit operations (bfloat16), with
//     the same rounding as c10's device conversions (to nearest even).
// Everything else in the kernel headers is plain CUDA C++ that both compile identically.
#pragma once

#ifdef __CUDACC_RTC__

namespace tokcomp::gpu {

using int64_t = long long;

struct Half {
  unsigned short bits;
};
struct BFloat16 {
  unsigned short bits;
};

__device__ __forceinline__ float to_float(float v) {
  return v;
}
__device__ __forceinline__ float to_float(Half v) {
  float out;
  asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(v.bits));
  return out;
}
__device__ __forceinline__ float to_float(BFloat16 v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);  // the top half of a float
}

template <typename scalar_t>
__device__ scalar_t from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ Half from_float<Half>(float v) {
  Half out;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out.bits) : "f"(v));
  return out;
}
template <>
__device__ __forceinline__ BFloat16 from_float<BFloat16>(float v) {
  const unsigned int u = __float_as_uint(v);
  const unsigned int rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // to nearest even
  const unsigned short bits = static_cast<unsigned short>(rounded);
  return BFloat16{v != v ? static_cast<unsigned short>(0x7FC0) : bits};  // NaN: a quiet NaN
}

}  // namespace tokcomp::gpu

#define TOKCOMP_KERNEL_ASSERT(cond) assert(cond)  // an NVRTC built-in

#else

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace tokcomp::gpu {

template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t v) {
  return static_cast<float>(v);
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float v) {
  return static_cast<scalar_t>(v);
}

}  // namespace tokcomp::gpu

#define TOKCOMP_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT(cond)

#endif

namespace tokcomp::gpu {

__device__ __forceinline__ float neg_inf() {
  return __int_as_float(0xff800000);
}

// The better of two candidates: larger value, then lower index.
__device__ __forceinline__ void keep_better(float& value, int64_t& index, float v, int64_t j) {
  if (v > value || (v == value && j < index)) {
    value = v;
    index = j;
  }
}

// The block's best of every thread's candidate (`value`, `index`), by keep_better: warp
// shuffles, then thread 0 folds the warps' results (`warp_value`, `warp_index`: shared arrays of
// one entry per warp). Every thread must call it; the block's pick is returned in thread 0.
__device__ __forceinline__ int64_t block_best(
    float value, int64_t index, float* warp_value, int64_t* warp_index) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_value = __shfl_xor_sync(0xffffffffu, value, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    keep_better(value, index, other_value, other_index);
  }
  if (threadIdx.x % 32 == 0) {
    warp_value[threadIdx.x / 32] = value;
    warp_index[threadIdx.x / 32] = index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    value = warp_value[0];
    index = warp_index[0];
    for (int other = 1; other < (blockDim.x + 31) / 32; ++other) {
      keep_better(value, index, warp_value[other], warp_index[other]);
    }
  }
  return index;
}

}  // namespace tokcomp::gpu

// CUDA kernel of tokcomp::attention_pagerank (device code for nvcc and NVRTC; host side in
// attention_pagerank.cu and tokcomp/ops/cupy_kernels.py): for every (batch, head) matrix A
// (N x N) of attn, `iterations` steps of s <- A^T s from s = 1/N, i.e. s'_j = sum_i s_i A[i, j];
// out = s (float32).
//
// One block per matrix, all iterations in one launch. s lives in shared memory (two buffers of
// N floats). With more than one iteration and a matrix that fits in the rest of the block's
// shared memory (N <= 240 in float32, N <= 338 in 16-bit types with the 227 KiB of an H100/H200),
// the matrix is copied there once, in its own dtype, and every iteration reads it from there;
// otherwise the iterations read it from global memory, where L2 keeps it. Thread j computes s'_j
// (and j + blockDim, ...): reads of row i are consecutive in j, so they are coalesced (global) or
// free of bank conflicts (shared).
#pragma once

#include "common.cuh"

namespace tokcomp::gpu {

constexpr int kPagerankMaxThreads = 1024;

template <typename scalar_t, bool kCached>
__global__ void __launch_bounds__(kPagerankMaxThreads) attention_pagerank_kernel(
    const scalar_t* __restrict__ attn,
    float* __restrict__ out,
    int64_t N,
    int64_t iterations,
    float start) {
  extern __shared__ float shared[];  // s [N], next [N], then the matrix [N * N] when kCached
  float* s = shared;
  float* next = shared + N;
  const scalar_t* a = attn + static_cast<int64_t>(blockIdx.x) * N * N;
  if constexpr (kCached) {
    scalar_t* cache = reinterpret_cast<scalar_t*>(shared + 2 * N);
    for (int64_t e = threadIdx.x; e < N * N; e += blockDim.x) {
      cache[e] = a[e];
    }
    a = cache;
  }
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    s[j] = start;
  }
  __syncthreads();
  for (int64_t it = 0; it < iterations; ++it) {
    for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      float acc = 0.f;
      for (int64_t i = 0; i < N; ++i) {
        acc = fmaf(s[i], to_float(a[i * N + j]), acc);
      }
      next[j] = acc;
    }
    __syncthreads();
    float* done = next;
    next = s;
    s = done;
  }
  float* o = out + static_cast<int64_t>(blockIdx.x) * N;
  for (int64_t j = threadIdx.x; j < N; j += blockDim.x) {
    o[j] = s[j];
  }
}

}  // namespace tokcomp::gpu

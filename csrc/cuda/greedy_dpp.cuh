// CUDA kernel of tokcomp::greedy_dpp (device code for nvcc and NVRTC; host side in greedy_dpp.cu
// and tokcomp/ops/cupy_kernels.py): greedy MAP inference of the DPP with kernel
// L[j, m] = (r[j] * S[j, m]) * r[m] (Chen et al. 2018), k steps per batch element, with the
// semantics of tokcomp/ops/dpp.py. Output (B, k) int64, the picks ascending.
//
// One block per batch element runs the whole selection. Thread t owns the entries m = t,
// t + blockDim, ... of d2, of the picked flags and of the vectors c_i (global scratch; a vector's
// entry at the pick is the only one read by other threads, after the step's barrier). A step:
// each thread ranks its d2 entries and keeps its best (value, lowest index); warp shuffles and
// one pass over the warps' results give the pick and sqrt(d2[pick]); then each thread forms its
// entries of the new vector from the pick's row of S (coalesced reads) and updates d2. Products,
// differences, the square root and the division are the _rn intrinsics (never fused into a
// multiply-add), the reference's float32 operations in its order, so the picks agree exactly.
// A NaN or -inf d2 ranks as the lowest float32, picked entries below it.
#pragma once

#include "common.cuh"

namespace tokcomp::gpu {

constexpr int kDppMaxThreads = 1024;
constexpr int kDppWarps = kDppMaxThreads / 32;

// d2 as a step ranks it: NaN and -inf as the lowest float32, picked entries -inf.
__device__ __forceinline__ float dpp_rank(float d2, float taken) {
  constexpr float kLowest = -3.402823466e+38f;  // the lowest float32
  return taken != 0.0f ? neg_inf() : (d2 > kLowest ? d2 : kLowest);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kDppMaxThreads) greedy_dpp_kernel(
    const scalar_t* __restrict__ similarity,
    const float* __restrict__ relevance,
    float* __restrict__ scratch,
    int64_t* __restrict__ out,
    int64_t N,
    int64_t k) {
  __shared__ float warp_value[kDppWarps];
  __shared__ int64_t warp_index[kDppWarps];
  __shared__ int64_t chosen;
  __shared__ float chosen_norm;

  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* s = similarity + n * N * N;
  const float* r = relevance + n * N;
  // Scratch rows of this batch element: the k - 1 vectors, d2, the picked flags (0 or 1).
  float* vectors = scratch + n * (k + 1) * N;
  float* d2 = vectors + (k - 1) * N;
  float* taken = d2 + N;

  for (int64_t m = tid; m < N; m += blockDim.x) {
    d2[m] = __fmul_rn(__fmul_rn(r[m], to_float(s[m * N + m])), r[m]);
    taken[m] = 0.0f;
  }
  for (int64_t step = 0; step < k; ++step) {
    float best = neg_inf();
    int64_t arg = N;
    for (int64_t m = tid; m < N; m += blockDim.x) {
      keep_better(best, arg, dpp_rank(d2[m], taken[m]), m);
    }
    const int64_t index = block_best(best, arg, warp_value, warp_index);
    if (tid == 0) {
      chosen = index;
      chosen_norm = __fsqrt_rn(d2[index]);
      taken[index] = 1.0f;
    }
    __syncthreads();
    const int64_t pick = chosen;
    if (step == k - 1) {
      break;
    }
    const float norm = chosen_norm;
    const float scale = r[pick];
    const scalar_t* row = s + pick * N;
    float* e = vectors + step * N;
    for (int64_t m = tid; m < N; m += blockDim.x) {
      float v = __fmul_rn(__fmul_rn(scale, to_float(row[m])), r[m]);
      for (int64_t t = 0; t < step; ++t) {
        const float* c = vectors + t * N;
        v = __fsub_rn(v, __fmul_rn(c[pick], c[m]));
      }
      v = __fdiv_rn(v, norm);
      e[m] = v;
      d2[m] = __fsub_rn(d2[m], __fmul_rn(v, v));
    }
    __syncthreads();  // every read of d2[pick] and taken is done before the next ranking
  }
  __syncthreads();
  if (tid == 0) {
    int64_t written = 0;
    for (int64_t m = 0; m < N && written < k; ++m) {
      if (taken[m] != 0.0f) {
        out[n * k + written++] = m;
      }
    }
  }
}

}  // namespace tokcomp::gpu

// CUDA kernel of tokcomp::greedy_maxmin (device code for nvcc and NVRTC; host side in
// greedy_maxmin.cu and tokcomp/ops/cupy_kernels.py): greedy weighted max-min (farthest-point)
// selection of k rows per batch element, with the semantics of tokcomp/ops/maxmin.py: pick
// first[b]; then, k - 1 times, the unpicked j with the largest score[j] = min over picked i of
// dist[b, i, j] * weight[b, j] (lowest index on ties). Output (B, k) int64 in pick order.
//
// One block per batch element runs the whole selection. Thread t owns the entries j = t,
// t + blockDim, ... of a float32 score vector (global scratch, only ever touched by its owner, so
// it stays in L1). A step: every thread sets the previous pick to -inf, folds in that pick's row
// (score[j] = min(score[j], dist[pick, j] * weight[j]), coalesced reads) and keeps its own best
// (value, lowest index); warp shuffles and one pass over the warps' results give the block's pick.
// Only the k picked rows of dist are read. The product and the minimum are the same float32
// operations as the reference's, so the picks agree exactly. A NaN or -inf product counts as the
// lowest float32 (the non-finite rule of tokcomp.ops): above the picked entries' -inf, below
// every other score.
#pragma once

#include "common.cuh"

namespace tokcomp::gpu {

constexpr int kMaxminMaxThreads = 1024;
constexpr int kMaxminWarps = kMaxminMaxThreads / 32;

// dist * weight, NaN and -inf as the lowest float32 (NaN compares false).
__device__ __forceinline__ float score_of(float dist, float weight) {
  constexpr float kLowest = -3.402823466e+38f;  // the lowest float32
  const float v = dist * weight;
  return v > kLowest ? v : kLowest;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxminMaxThreads) greedy_maxmin_kernel(
    const scalar_t* __restrict__ dist,
    const float* __restrict__ weight,
    const int64_t* __restrict__ first,
    float* __restrict__ scratch,
    int64_t* __restrict__ out,
    int64_t N,
    int64_t k) {
  __shared__ float warp_value[kMaxminWarps];
  __shared__ int64_t warp_index[kMaxminWarps];
  __shared__ int64_t chosen;
  const float kNegInf = neg_inf();

  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x;
  const scalar_t* d = dist + n * N * N;
  const float* w = weight + n * N;
  float* score = scratch + n * N;

  int64_t pick = first[n];
  TOKCOMP_KERNEL_ASSERT(0 <= pick && pick < N);
  for (int64_t j = tid; j < N; j += blockDim.x) {
    score[j] = score_of(to_float(d[pick * N + j]), w[j]);
  }
  if (tid == 0) {
    out[n * k] = pick;
  }
  for (int64_t t = 1; t < k; ++t) {
    // The first step starts from the scores of `first` alone.
    const scalar_t* row = t > 1 ? d + pick * N : nullptr;
    float best = kNegInf;
    int64_t arg = N;
    for (int64_t j = tid; j < N; j += blockDim.x) {
      float v = kNegInf;
      if (j != pick) {
        v = score[j];
        if (row != nullptr) {
          const float u = score_of(to_float(row[j]), w[j]);
          v = u < v ? u : v;
        }
      }
      score[j] = v;
      keep_better(best, arg, v, j);
    }
    const int64_t index = block_best(best, arg, warp_value, warp_index);
    if (tid == 0) {
      chosen = index;
      out[n * k + t] = index;
    }
    __syncthreads();
    pick = chosen;
  }
}

}  // namespace tokcomp::gpu

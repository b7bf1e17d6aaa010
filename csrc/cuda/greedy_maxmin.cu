// CUDA kernel of tokcomp::greedy_maxmin: greedy weighted max-min (farthest-point) selection of k
// rows per batch element, with the semantics of tokcomp/ops/maxmin.py: pick first[b]; then, k - 1
// times, the unpicked j with the largest score[j] = min over picked i of dist[b, i, j] *
// weight[b, j] (lowest index on ties). Output (B, k) int64 in pick order.
//
// One block per batch element runs the whole selection. Thread t owns the entries j = t,
// t + blockDim, ... of a float32 score vector (global scratch, only ever touched by its owner, so
// it stays in L1). A step: every thread sets the previous pick to -inf, folds in that pick's row
// (score[j] = min(score[j], dist[pick, j] * weight[j]), coalesced reads) and keeps its own best
// (value, lowest index); warp shuffles and one pass over the warps' results give the block's
// pick. Only the k picked rows of dist are read. The product and the minimum are the same float32
// operations as the reference's, so the picks agree exactly. dist must be finite.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../ops.h"

namespace tokcomp {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int kWarps = kMaxThreads / 32;

// The better of two candidates: larger value, then lower index.
__device__ __forceinline__ void keep_better(float& value, int64_t& index, float v, int64_t j) {
  if (v > value || (v == value && j < index)) {
    value = v;
    index = j;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) greedy_maxmin_kernel(
    const scalar_t* __restrict__ dist,
    const float* __restrict__ weight,
    const int64_t* __restrict__ first,
    float* __restrict__ scratch,
    int64_t* __restrict__ out,
    int64_t N,
    int64_t k) {
  __shared__ float warp_value[kWarps];
  __shared__ int64_t warp_index[kWarps];
  __shared__ int64_t chosen;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int warps = (blockDim.x + 31) / 32;
  const scalar_t* d = dist + n * N * N;
  const float* w = weight + n * N;
  float* score = scratch + n * N;

  int64_t pick = first[n];
  CUDA_KERNEL_ASSERT(0 <= pick && pick < N);
  for (int64_t j = tid; j < N; j += blockDim.x) {
    score[j] = static_cast<float>(d[pick * N + j]) * w[j];
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
          const float u = static_cast<float>(row[j]) * w[j];
          v = u < v ? u : v;
        }
      }
      score[j] = v;
      keep_better(best, arg, v, j);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const float other_value = __shfl_xor_sync(0xffffffffu, best, offset);
      const int64_t other_index = __shfl_xor_sync(0xffffffffu, arg, offset);
      keep_better(best, arg, other_value, other_index);
    }
    if (lane == 0) {
      warp_value[warp] = best;
      warp_index[warp] = arg;
    }
    __syncthreads();
    if (tid == 0) {
      float value = warp_value[0];
      int64_t index = warp_index[0];
      for (int other = 1; other < warps; ++other) {
        keep_better(value, index, warp_value[other], warp_index[other]);
      }
      chosen = index;
      out[n * k + t] = index;
    }
    __syncthreads();
    pick = chosen;
  }
}

at::Tensor greedy_maxmin_cuda(
    const at::Tensor& dist_in,
    const at::Tensor& weight_in,
    const at::Tensor& first_in,
    int64_t k) {
  check_greedy_maxmin_inputs(dist_in, weight_in, first_in, k);
  TORCH_CHECK(dist_in.is_cuda(), "tokcomp::greedy_maxmin (CUDA): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(dist_in.device());
  const at::Tensor dist = dist_in.contiguous();
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  const at::Tensor first = first_in.contiguous();
  const int64_t batch = dist.size(0);
  const int64_t N = dist.size(1);
  at::Tensor out = at::empty({batch, k}, first.options());
  if (batch == 0) {
    return out;
  }
  TORCH_CHECK(
      batch <= std::numeric_limits<int32_t>::max(),
      "tokcomp::greedy_maxmin (CUDA): too many batch elements (",
      batch,
      ")");
  at::Tensor scratch = at::empty({batch, N}, weight.options());
  const int threads = static_cast<int>(std::clamp<int64_t>((N + 31) / 32 * 32, 32, kMaxThreads));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(dist.scalar_type(), "tokcomp::greedy_maxmin (CUDA)", [&] {
    greedy_maxmin_kernel<scalar_t><<<static_cast<unsigned int>(batch), threads, 0, stream>>>(
        dist.const_data_ptr<scalar_t>(),
        weight.const_data_ptr<float>(),
        first.const_data_ptr<int64_t>(),
        scratch.mutable_data_ptr<float>(),
        out.mutable_data_ptr<int64_t>(),
        N,
        k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CUDA, m) {
  m.impl("greedy_maxmin", &greedy_maxmin_cuda);
}

}  // namespace tokcomp

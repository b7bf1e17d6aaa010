// CUDA kernel of tokcomp::best_match: for every row of a, the best cosine score over the rows of
// b and its index (first index on ties, like torch.max).
//
// Two launches:
//   1. inverse row norms 1 / max(|row|, 1e-12) of a and b (one warp per row, float32);
//   2. one block per (batch element, tile of kTileA rows of a): the b rows stream through
//      shared memory in tiles of kTileB rows x kTileC channels (converted to float32), each of
//      the 16 x 16 threads computes a kRowsA x kColsB block of dot products, keeps a running
//      best (value, index) per row, and the 16 threads sharing rows reduce theirs with warp
//      shuffles at the end. Scores are dot * inv_norm_a * inv_norm_b.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../ops.h"
#include "cosine_tiles.cuh"

namespace tokcomp {
namespace {

using gpu::CosineTiles;
using gpu::kColsB;
using gpu::kRowsA;
using gpu::kSide;
using gpu::kThreads;
using gpu::kTileA;
using gpu::kTileB;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) best_match_kernel(
    const scalar_t* __restrict__ a,
    const scalar_t* __restrict__ b,
    const float* __restrict__ inv_a,
    const float* __restrict__ inv_b,
    float* __restrict__ score,
    int64_t* __restrict__ index,
    int64_t Na,
    int64_t Nb,
    int64_t C,
    int64_t a_protected,
    int64_t b_protected,
    int64_t tiles_a) {
  __shared__ CosineTiles tiles;

  const int64_t n = blockIdx.x / tiles_a;
  const int64_t i0 = (blockIdx.x % tiles_a) * kTileA;
  const int tid = threadIdx.x;
  const int tx = tid % kSide;  // b rows tx + 16 k
  const int ty = tid / kSide;  // a rows ty + 16 k
  const scalar_t* an = a + n * Na * C;
  const scalar_t* bn = b + n * Nb * C;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  float best[kRowsA];
  int64_t arg[kRowsA];
  float inv_row[kRowsA];
#pragma unroll
  for (int k = 0; k < kRowsA; ++k) {
    best[k] = kNegInf;
    arg[k] = 0;
    const int64_t i = i0 + ty + kSide * k;
    inv_row[k] = i < Na ? inv_a[n * Na + i] : 0.f;
  }

  // Rows of this tile that need work: all protected means nothing to compute (uniform branch).
  const bool any_active = i0 + kTileA > a_protected;
  const int64_t j_begin = any_active ? (b_protected / kTileB) * kTileB : Nb;
  for (int64_t j0 = j_begin; j0 < Nb; j0 += kTileB) {
    float acc[kRowsA][kColsB];
    gpu::tile_dots(an, Na, bn, Nb, C, i0, j0, tiles, acc);
    // Columns in increasing order with a strict comparison: the first index wins ties.
#pragma unroll
    for (int kb = 0; kb < kColsB; ++kb) {
      const int64_t j = j0 + tx + kSide * kb;
      if (j >= b_protected && j < Nb) {
        const float inv_col = inv_b[n * Nb + j];
#pragma unroll
        for (int ka = 0; ka < kRowsA; ++ka) {
          const float s = acc[ka][kb] * inv_row[ka] * inv_col;
          if (s > best[ka]) {
            best[ka] = s;
            arg[ka] = j;
          }
        }
      }
    }
  }

  // The 16 threads of a row group (same ty) are 16 consecutive lanes of one warp.
#pragma unroll
  for (int ka = 0; ka < kRowsA; ++ka) {
    float v = best[ka];
    int64_t j = arg[ka];
#pragma unroll
    for (int offset = kSide / 2; offset > 0; offset /= 2) {
      const float other_v = __shfl_xor_sync(0xffffffffu, v, offset, kSide);
      const int64_t other_j = __shfl_xor_sync(0xffffffffu, j, offset, kSide);
      if (other_v > v || (other_v == v && other_j < j)) {
        v = other_v;
        j = other_j;
      }
    }
    const int64_t i = i0 + ty + kSide * ka;
    if (tx == 0 && i < Na) {
      const bool protected_row = i < a_protected;
      score[n * Na + i] = protected_row ? kNegInf : v;
      index[n * Na + i] = (protected_row || v == kNegInf) ? 0 : j;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> best_match_cuda(
    const at::Tensor& a_in,
    const at::Tensor& b_in,
    int64_t a_protected,
    int64_t b_protected) {
  check_best_match_inputs(a_in, b_in, a_protected, b_protected);
  TORCH_CHECK(a_in.is_cuda(), "tokcomp::best_match (CUDA): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const int64_t batch = a.size(0);
  const int64_t Na = a.size(1);
  const int64_t Nb = b.size(1);
  const int64_t C = a.size(2);
  at::Tensor score = at::empty({batch, Na}, a.options().dtype(at::kFloat));
  at::Tensor index = at::empty({batch, Na}, a.options().dtype(at::kLong));
  if (batch == 0 || Na == 0) {
    return {score, index};
  }
  at::Tensor inv_a = at::empty({batch, Na}, a.options().dtype(at::kFloat));
  at::Tensor inv_b = at::empty({batch, Nb}, a.options().dtype(at::kFloat));
  const int64_t tiles_a = (Na + kTileA - 1) / kTileA;
  TORCH_CHECK(
      batch * tiles_a <= std::numeric_limits<int32_t>::max(),
      "tokcomp::best_match (CUDA): too many rows (",
      batch,
      " x ",
      Na,
      ")");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(a.scalar_type(), "tokcomp::best_match (CUDA)", [&] {
    gpu::launch_inverse_norms<scalar_t>(a, inv_a, stream);
    gpu::launch_inverse_norms<scalar_t>(b, inv_b, stream);
    best_match_kernel<scalar_t><<<batch * tiles_a, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(),
        inv_a.const_data_ptr<float>(),
        inv_b.const_data_ptr<float>(),
        score.mutable_data_ptr<float>(),
        index.mutable_data_ptr<int64_t>(),
        Na,
        Nb,
        C,
        a_protected,
        b_protected,
        tiles_a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {score, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CUDA, m) {
  m.impl("best_match", &best_match_cuda);
}

}  // namespace tokcomp

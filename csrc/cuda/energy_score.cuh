// CUDA kernel of tokcomp::energy_score (device code for nvcc and NVRTC; host side in
// energy_score.cu and tokcomp/ops/cupy_kernels.py): E[b, i] = mean_j ELU(cos(m_i, m_j) - margin,
// alpha) over the T rows of metric[b], without forming the T x T similarity matrix.
//
// Launched after inverse_norms_kernel has computed 1 / max(|row|, 1e-12) of every row: one block
// per (batch element, tile of kTileA rows); the rows of the same element stream through shared
// memory in tiles of kTileB rows (cosine_tiles.cuh), each of the 16 x 16 threads turns its
// kRowsA x kColsB dot products into cosines (dot * inv_i * inv_j), adds their ELUs to a running
// sum per row, and the 16 threads sharing rows add theirs up with warp shuffles at the end.
// A NaN cosine (a row holding a NaN or an inf) counts as -inf (the non-finite rule of
// tokcomp.ops): its term is -alpha.
#pragma once

#include "common.cuh"
#include "cosine_tiles.cuh"

namespace tokcomp::gpu {

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) energy_score_kernel(
    const scalar_t* __restrict__ metric,
    const float* __restrict__ inv_norm,
    float* __restrict__ energy,
    int64_t T,
    int64_t C,
    float margin,
    float alpha,
    int64_t tiles_per_batch) {
  __shared__ CosineTiles tiles;

  const int64_t n = blockIdx.x / tiles_per_batch;
  const int64_t i0 = (blockIdx.x % tiles_per_batch) * kTileA;
  const int tx = threadIdx.x % kSide;  // columns tx + 16 k
  const int ty = threadIdx.x / kSide;  // rows ty + 16 k
  const scalar_t* xn = metric + n * T * C;
  const float* inv = inv_norm + n * T;

  float sum[kRowsA];
  float inv_row[kRowsA];
#pragma unroll
  for (int ka = 0; ka < kRowsA; ++ka) {
    sum[ka] = 0.f;
    const int64_t i = i0 + ty + kSide * ka;
    inv_row[ka] = i < T ? inv[i] : 0.f;
  }
  for (int64_t j0 = 0; j0 < T; j0 += kTileB) {
    float acc[kRowsA][kColsB];
    tile_dots(xn, T, xn, T, C, i0, j0, tiles, acc);
#pragma unroll
    for (int kb = 0; kb < kColsB; ++kb) {
      const int64_t j = j0 + tx + kSide * kb;
      if (j < T) {
        const float inv_col = inv[j];
#pragma unroll
        for (int ka = 0; ka < kRowsA; ++ka) {
          const float x = acc[ka][kb] * inv_row[ka] * inv_col - margin;
          // A NaN (the cosine of a non-finite row) counts as -inf: ELU(-inf) = -alpha.
          sum[ka] += x > 0.f ? x : alpha * (x == x ? expf(x) - 1.f : -1.f);
        }
      }
    }
  }

  // The 16 threads of a row group (same ty) are 16 consecutive lanes of one warp.
#pragma unroll
  for (int ka = 0; ka < kRowsA; ++ka) {
    float v = sum[ka];
#pragma unroll
    for (int offset = kSide / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(0xffffffffu, v, offset, kSide);
    }
    const int64_t i = i0 + ty + kSide * ka;
    if (tx == 0 && i < T) {
      energy[n * T + i] = v / static_cast<float>(T);
    }
  }
}

}  // namespace tokcomp::gpu

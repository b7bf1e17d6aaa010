// CUDA kernel of tokcomp::best_match (device code for nvcc and NVRTC; host side in
// best_match.cu and tokcomp/ops/cupy_kernels.py): for every row of a, the best cosine score over
// the rows of b and its index (first index on ties, like torch.max).
//
// Launched after inverse_norms_kernel has computed 1 / max(|row|, 1e-12) of a and b: one block
// per (batch element, tile of kTileA rows of a); the b rows stream through shared memory in tiles
// of kTileB rows x kTileC channels (converted to float32), each of the 16 x 16 threads computes a
// kRowsA x kColsB block of dot products, keeps a running best (value, index) per row, and the 16
// threads sharing rows reduce theirs with warp shuffles at the end. Scores are
// dot * inv_norm_a * inv_norm_b. A NaN score is never the best (comparisons with NaN are false):
// a row whose every score is NaN gets -inf and index 0, as one with no eligible partner.
#pragma once

#include "common.cuh"
#include "cosine_tiles.cuh"

namespace tokcomp::gpu {

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
  const float kNegInf = neg_inf();

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
    tile_dots(an, Na, bn, Nb, C, i0, j0, tiles, acc);
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

}  // namespace tokcomp::gpu

// Building blocks of the CUDA kernels that compare rows by cosine similarity (best_match,
// energy_score): inverse row norms, and the dot products of a tile of kTileA rows of a against a
// tile of kTileB rows of b through shared memory, each of the 16 x 16 threads of a block
// computing a kRowsA x kColsB block of them. Device code only (nvcc and NVRTC, common.cuh).
#pragma once

#include "common.cuh"

namespace tokcomp::gpu {

constexpr int kThreads = 256;  // 16 x 16
constexpr int kNormThreads = 256;  // inverse_norms_kernel: 8 rows (warps) per block
constexpr int kSide = 16;
constexpr int kRowsA = 2;  // a rows per thread
constexpr int kColsB = 4;  // b rows per thread
constexpr int kTileA = kSide * kRowsA;  // 32 a rows per block
constexpr int kTileB = kSide * kColsB;  // 64 b rows per shared tile
constexpr int kTileC = 32;  // channels per shared tile
constexpr float kEps = 1e-12f;  // F.normalize's eps

// inv_norm[row] = 1 / max(|x[row, :]|, eps) for `rows` rows of C channels; one warp per row.
template <typename scalar_t>
__global__ void inverse_norms_kernel(
    const scalar_t* __restrict__ x,
    float* __restrict__ inv_norm,
    int64_t rows,
    int64_t C) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= rows) {
    return;
  }
  const scalar_t* row = x + warp * C;
  float sum_sq = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float v = to_float(row[c]);
    sum_sq += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  }
  if (lane == 0) {
    inv_norm[warp] = 1.f / fmaxf(sqrtf(sum_sq), kEps);
  }
}

// Shared memory of tile_dots: the current channel chunk of both row tiles, channel-major.
struct CosineTiles {
  float a[kTileC][kTileA + 1];
  float b[kTileC][kTileB + 1];
};

// acc[ka][kb] = dot(an row i0 + ty + kSide * ka, bn row j0 + tx + kSide * kb) over all C channels
// (rows past Na / Nb count as zero), for the thread (tx, ty) = (tid % kSide, tid / kSide) of a
// kThreads block. Every thread of the block must call it (it synchronises the block).
template <typename scalar_t>
__device__ __forceinline__ void tile_dots(
    const scalar_t* __restrict__ an,
    int64_t Na,
    const scalar_t* __restrict__ bn,
    int64_t Nb,
    int64_t C,
    int64_t i0,
    int64_t j0,
    CosineTiles& tiles,
    float (&acc)[kRowsA][kColsB]) {
  const int tid = threadIdx.x;
  const int tx = tid % kSide;
  const int ty = tid / kSide;
#pragma unroll
  for (int ka = 0; ka < kRowsA; ++ka) {
#pragma unroll
    for (int kb = 0; kb < kColsB; ++kb) {
      acc[ka][kb] = 0.f;
    }
  }
  for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
    // Coalesced loads: consecutive threads read consecutive channels of a row.
    for (int e = tid; e < kTileA * kTileC; e += kThreads) {
      const int r = e / kTileC;
      const int c = e % kTileC;
      const int64_t gi = i0 + r;
      const int64_t gc = c0 + c;
      tiles.a[c][r] = (gi < Na && gc < C) ? to_float(an[gi * C + gc]) : 0.f;
    }
    for (int e = tid; e < kTileB * kTileC; e += kThreads) {
      const int r = e / kTileC;
      const int c = e % kTileC;
      const int64_t gj = j0 + r;
      const int64_t gc = c0 + c;
      tiles.b[c][r] = (gj < Nb && gc < C) ? to_float(bn[gj * C + gc]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < kTileC; ++c) {
      float av[kRowsA];
      float bv[kColsB];
#pragma unroll
      for (int ka = 0; ka < kRowsA; ++ka) {
        av[ka] = tiles.a[c][ty + kSide * ka];
      }
#pragma unroll
      for (int kb = 0; kb < kColsB; ++kb) {
        bv[kb] = tiles.b[c][tx + kSide * kb];
      }
#pragma unroll
      for (int ka = 0; ka < kRowsA; ++ka) {
#pragma unroll
        for (int kb = 0; kb < kColsB; ++kb) {
          acc[ka][kb] = fmaf(av[ka], bv[kb], acc[ka][kb]);
        }
      }
    }
    __syncthreads();
  }
}

}  // namespace tokcomp::gpu

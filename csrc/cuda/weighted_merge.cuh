// CUDA kernel of tokcomp::weighted_merge (device code for nvcc and NVRTC; host side in
// weighted_merge.cu and tokcomp/ops/cupy_kernels.py): out[b, j] is the weight-weighted mean of
// token keep_idx[b, j] and of every token src_idx[b, r] with dst_pos[b, r] == j; out_size[b, j] is
// the sum of their sizes.
//
// Deterministic, no atomics: one block per (batch element, tile of output rows, channel chunk). The
// block keeps its rows' float32 sums in shared memory, starts them from the kept tokens, then scans
// dst_pos in chunks of blockDim entries: the entries that land in its tile are compacted in order
// (warp ballots + a prefix over the warps), and their rows are added in increasing r, each thread
// owning a fixed set of channels. Every output row therefore sums its sources in the same order as
// the reference, on every run. Scanning dst_pos costs O(R) per block, small next to moving the rows
// for the sizes tokens come in.
#pragma once

#include "common.cuh"

namespace tokcomp::gpu {

constexpr int kMergeMaxThreads = 256;
constexpr int kMergeMaxWarps = kMergeMaxThreads / 32;
constexpr int kMergeMaxTileRows = 32;
constexpr int64_t kMergeMaxChunk = 2048;  // channels per block
constexpr int64_t kMergeSharedFloats = 8192;  // 32 KiB of float32 sums per block

template <typename scalar_t>
__global__ void __launch_bounds__(kMergeMaxThreads) weighted_merge_kernel(
    const scalar_t* __restrict__ x,
    const float* __restrict__ weight,
    const float* __restrict__ size,
    const int64_t* __restrict__ keep_idx,
    const int64_t* __restrict__ src_idx,
    const int64_t* __restrict__ dst_pos,
    scalar_t* __restrict__ out,
    float* __restrict__ out_size,
    int64_t N,
    int64_t C,
    int64_t K,
    int64_t R,
    int64_t tile_rows,
    int64_t tiles,
    int64_t chunk,
    int64_t chunks) {
  extern __shared__ float sums[];  // [tile_rows][width]
  __shared__ float norm[kMergeMaxTileRows];
  __shared__ float total[kMergeMaxTileRows];
  __shared__ int hit_row[kMergeMaxThreads];
  __shared__ int64_t hit_src[kMergeMaxThreads];
  __shared__ int warp_hits[kMergeMaxWarps];

  const int64_t block = blockIdx.x;
  const int64_t part = block % chunks;
  const int64_t tile = (block / chunks) % tiles;
  const int64_t n = block / (chunks * tiles);
  const int64_t j0 = tile * tile_rows;
  const int64_t rows = min(tile_rows, K - j0);
  const int64_t c0 = part * chunk;
  const int64_t width = min(chunk, C - c0);
  const int tid = threadIdx.x;
  const int threads = blockDim.x;
  const int lane = tid % 32;
  const int warp = tid / 32;

  const scalar_t* xn = x + n * N * C + c0;
  const float* wn = weight + n * N;
  const float* sn = size + n * N;
  const int64_t* src = src_idx + n * R;
  const int64_t* dst = dst_pos + n * R;

  // Start from the kept tokens, scaled by their weight.
  for (int64_t e = tid; e < rows * width; e += threads) {
    const int64_t r = e / width;
    const int64_t c = e % width;
    const int64_t k = keep_idx[n * K + j0 + r];
    TOKCOMP_KERNEL_ASSERT(0 <= k && k < N);
    sums[e] = wn[k] * to_float(xn[k * C + c]);
  }
  if (tid < rows) {
    const int64_t k = keep_idx[n * K + j0 + tid];
    TOKCOMP_KERNEL_ASSERT(0 <= k && k < N);  // also without channels (the loop above is empty)
    norm[tid] = wn[k];
    total[tid] = sn[k];
  }
  __syncthreads();

  for (int64_t base = 0; base < R; base += threads) {
    const int64_t r = base + tid;
    bool hit = false;
    int row = 0;
    int64_t s = 0;
    if (r < R) {
      const int64_t d = dst[r];
      TOKCOMP_KERNEL_ASSERT(0 <= d && d < K);
      if (d >= j0 && d < j0 + rows) {
        hit = true;
        row = static_cast<int>(d - j0);
        s = src[r];
        TOKCOMP_KERNEL_ASSERT(0 <= s && s < N);
      }
    }
    const unsigned mask = __ballot_sync(0xffffffffu, hit);
    if (lane == 0) {
      warp_hits[warp] = __popc(mask);
    }
    __syncthreads();
    int offset = 0;
    int count = 0;
    for (int w = 0; w < threads / 32; ++w) {
      offset += w < warp ? warp_hits[w] : 0;
      count += warp_hits[w];
    }
    if (hit) {
      const int pos = offset + __popc(mask & ((1u << lane) - 1u));
      hit_row[pos] = row;
      hit_src[pos] = s;
    }
    __syncthreads();
    // Sources in increasing r; each thread only ever touches its own channels.
    for (int h = 0; h < count; ++h) {
      const int hr = hit_row[h];
      const int64_t hs = hit_src[h];
      const float w = wn[hs];
      const scalar_t* xs = xn + hs * C;
      float* acc = sums + hr * width;
      for (int64_t c = tid; c < width; c += threads) {
        acc[c] += w * to_float(xs[c]);
      }
      if (tid == 0) {
        norm[hr] += w;
        total[hr] += sn[hs];
      }
    }
    __syncthreads();
  }

  for (int64_t e = tid; e < rows * width; e += threads) {
    const int64_t r = e / width;
    const int64_t c = e % width;
    out[(n * K + j0 + r) * C + c0 + c] = from_float<scalar_t>(sums[e] / norm[r]);
  }
  if (part == 0 && tid < rows) {
    out_size[n * K + j0 + tid] = total[tid];
  }
}

}  // namespace tokcomp::gpu

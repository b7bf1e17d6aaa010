// CUDA kernel of tokcomp::weighted_merge: out[b, j] is the weight-weighted mean of token
// keep_idx[b, j] and of every token src_idx[b, r] with dst_pos[b, r] == j; out_size[b, j] is
// the sum of their sizes.
//
// Deterministic, no atomics: one block per (batch element, tile of output rows, channel
// chunk). The block keeps its rows' float32 sums in shared memory, starts them from the kept
// tokens, then scans dst_pos in chunks of blockDim entries: the entries that land in its tile
// are compacted in order (warp ballots + a prefix over the warps), and their rows are added in
// increasing r, each thread owning a fixed set of channels. Every output row therefore sums
// its sources in the same order as the reference, on every run. Scanning dst_pos costs O(R)
// per block, small next to moving the rows for the sizes tokens come in.
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

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxTileRows = 32;
constexpr int64_t kMaxChunk = 2048;  // channels per block
constexpr int64_t kSharedFloats = 8192;  // 32 KiB of float32 sums per block

template <typename scalar_t>
__global__ void __launch_bounds__(kMaxThreads) weighted_merge_kernel(
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
  __shared__ float norm[kMaxTileRows];
  __shared__ float total[kMaxTileRows];
  __shared__ int hit_row[kMaxThreads];
  __shared__ int64_t hit_src[kMaxThreads];
  __shared__ int warp_hits[kMaxWarps];

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
    CUDA_KERNEL_ASSERT(0 <= k && k < N);
    sums[e] = wn[k] * static_cast<float>(xn[k * C + c]);
  }
  if (tid < rows) {
    const int64_t k = keep_idx[n * K + j0 + tid];
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
      CUDA_KERNEL_ASSERT(0 <= d && d < K);
      if (d >= j0 && d < j0 + rows) {
        hit = true;
        row = static_cast<int>(d - j0);
        s = src[r];
        CUDA_KERNEL_ASSERT(0 <= s && s < N);
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
        acc[c] += w * static_cast<float>(xs[c]);
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
    out[(n * K + j0 + r) * C + c0 + c] = static_cast<scalar_t>(sums[e] / norm[r]);
  }
  if (part == 0 && tid < rows) {
    out_size[n * K + j0 + tid] = total[tid];
  }
}

std::tuple<at::Tensor, at::Tensor> weighted_merge_cuda(
    const at::Tensor& x_in,
    const at::Tensor& weight_in,
    const at::Tensor& size_in,
    const at::Tensor& keep_in,
    const at::Tensor& src_in,
    const at::Tensor& dst_in) {
  check_weighted_merge_inputs(x_in, weight_in, size_in, keep_in, src_in, dst_in);
  TORCH_CHECK(x_in.is_cuda(), "tokcomp::weighted_merge (CUDA): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor size = size_in.contiguous();
  const at::Tensor keep_idx = keep_in.contiguous();
  const at::Tensor src_idx = src_in.contiguous();
  const at::Tensor dst_pos = dst_in.contiguous();
  const int64_t batch = x.size(0);
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t K = keep_idx.size(1);
  const int64_t R = src_idx.size(1);
  at::Tensor out = at::empty({batch, K, C}, x.options());
  at::Tensor out_size = at::empty({batch, K}, size.options());
  if (batch == 0 || K == 0) {
    return {out, out_size};
  }

  const int64_t chunk = std::max<int64_t>(std::min(C, kMaxChunk), 1);
  const int64_t chunks = (std::max<int64_t>(C, 1) + chunk - 1) / chunk;
  const int64_t tile_rows = std::clamp<int64_t>(kSharedFloats / chunk, 1, kMaxTileRows);
  const int64_t tiles = (K + tile_rows - 1) / tile_rows;
  const int threads = static_cast<int>(
      std::clamp<int64_t>((chunk + 31) / 32 * 32, 64, kMaxThreads));
  const int64_t blocks = batch * tiles * chunks;
  TORCH_CHECK(
      blocks <= std::numeric_limits<int32_t>::max(),
      "tokcomp::weighted_merge (CUDA): too many output rows (",
      batch,
      " x ",
      K,
      ")");
  const size_t shared_bytes = static_cast<size_t>(tile_rows * chunk) * sizeof(float);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(x.scalar_type(), "tokcomp::weighted_merge (CUDA)", [&] {
    weighted_merge_kernel<scalar_t>
        <<<static_cast<unsigned int>(blocks), threads, shared_bytes, stream>>>(
            x.const_data_ptr<scalar_t>(),
            weight.const_data_ptr<float>(),
            size.const_data_ptr<float>(),
            keep_idx.const_data_ptr<int64_t>(),
            src_idx.const_data_ptr<int64_t>(),
            dst_pos.const_data_ptr<int64_t>(),
            out.mutable_data_ptr<scalar_t>(),
            out_size.mutable_data_ptr<float>(),
            N,
            C,
            K,
            R,
            tile_rows,
            tiles,
            chunk,
            chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, out_size};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CUDA, m) {
  m.impl("weighted_merge", &weighted_merge_cuda);
}

}  // namespace tokcomp

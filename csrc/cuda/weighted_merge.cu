// tokcomp::weighted_merge on CUDA: checks, the block geometry (rows per tile, channels per chunk)
// and the launch of the kernel of weighted_merge.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../ops.h"
#include "weighted_merge.cuh"

namespace tokcomp {
namespace {

using gpu::kMergeMaxChunk;
using gpu::kMergeMaxThreads;
using gpu::kMergeMaxTileRows;
using gpu::kMergeSharedFloats;

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
    // No output rows: sources are still an error (every dst_pos is out of range [0, 0)), as on
    // the CPU and in the reference. The value is read only to word the error.
    TORCH_CHECK(
        batch == 0 || R == 0,
        "tokcomp::weighted_merge: dst_pos value ",
        dst_pos[0][0].item<int64_t>(),
        " out of range [0, ",
        K,
        ")");
    return {out, out_size};
  }

  const int64_t chunk = std::max<int64_t>(std::min(C, kMergeMaxChunk), 1);
  const int64_t chunks = (std::max<int64_t>(C, 1) + chunk - 1) / chunk;
  const int64_t tile_rows =
      std::clamp<int64_t>(kMergeSharedFloats / chunk, 1, kMergeMaxTileRows);
  const int64_t tiles = (K + tile_rows - 1) / tile_rows;
  const int threads = static_cast<int>(
      std::clamp<int64_t>((chunk + 31) / 32 * 32, 64, kMergeMaxThreads));
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
    gpu::weighted_merge_kernel<scalar_t>
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

// Host-side helpers shared by the nvcc wrappers (csrc/cuda/*.cu) of the kernel headers; the cupy
// route does the same launches from Python (tokcomp/ops/cupy_kernels.py).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cosine_tiles.cuh"

namespace tokcomp::gpu {

// Threads of a block whose threads stride over n entries: n rounded up to whole warps, within
// [32, max_threads].
inline int warp_rounded_threads(int64_t n, int max_threads) {
  return static_cast<int>(std::clamp<int64_t>((n + 31) / 32 * 32, 32, max_threads));
}

// inv[row] = 1 / max(|x[row, :]|, eps) for every row of the contiguous (B, N, C) tensor x.
template <typename scalar_t>
void launch_inverse_norms(const at::Tensor& x, at::Tensor& inv, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kNormThreads / 32;
  const int64_t rows = x.size(0) * x.size(1);
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  inverse_norms_kernel<scalar_t><<<blocks, kNormThreads, 0, stream>>>(
      x.const_data_ptr<scalar_t>(), inv.mutable_data_ptr<float>(), rows, x.size(2));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace tokcomp::gpu

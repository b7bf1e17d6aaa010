// tokcomp::energy_score on CUDA: checks, then two launches, the inverse row norms
// (cosine_tiles.cuh) and the kernel of energy_score.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../ops.h"
#include "energy_score.cuh"
#include "launch.h"

namespace tokcomp {
namespace {

using gpu::kThreads;
using gpu::kTileA;

at::Tensor energy_score_cuda(const at::Tensor& metric_in, double margin, double alpha) {
  check_energy_score_inputs(metric_in);
  TORCH_CHECK(metric_in.is_cuda(), "tokcomp::energy_score (CUDA): metric must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(metric_in.device());
  const at::Tensor metric = metric_in.contiguous();
  const int64_t batch = metric.size(0);
  const int64_t T = metric.size(1);
  const int64_t C = metric.size(2);
  at::Tensor energy = at::empty({batch, T}, metric.options().dtype(at::kFloat));
  if (energy.numel() == 0) {
    return energy;
  }
  at::Tensor inv_norm = at::empty({batch, T}, metric.options().dtype(at::kFloat));
  const int64_t tiles = (T + kTileA - 1) / kTileA;
  TORCH_CHECK(
      batch * tiles <= std::numeric_limits<int32_t>::max(),
      "tokcomp::energy_score (CUDA): too many rows (",
      batch,
      " x ",
      T,
      ")");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(metric.scalar_type(), "tokcomp::energy_score (CUDA)", [&] {
    gpu::launch_inverse_norms<scalar_t>(metric, inv_norm, stream);
    gpu::energy_score_kernel<scalar_t><<<batch * tiles, kThreads, 0, stream>>>(
        metric.const_data_ptr<scalar_t>(),
        inv_norm.const_data_ptr<float>(),
        energy.mutable_data_ptr<float>(),
        T,
        C,
        static_cast<float>(margin),
        static_cast<float>(alpha),
        tiles);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return energy;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CUDA, m) {
  m.impl("energy_score", &energy_score_cuda);
}

}  // namespace tokcomp

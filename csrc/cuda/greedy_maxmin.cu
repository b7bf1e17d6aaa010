// tokcomp::greedy_maxmin on CUDA: checks and the launch of the kernel of greedy_maxmin.cuh, one
// block per batch element.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../ops.h"
#include "launch.h"
#include "greedy_maxmin.cuh"

namespace tokcomp {
namespace {

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
  const int threads = gpu::warp_rounded_threads(N, gpu::kMaxminMaxThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(dist.scalar_type(), "tokcomp::greedy_maxmin (CUDA)", [&] {
    gpu::greedy_maxmin_kernel<scalar_t><<<static_cast<unsigned int>(batch), threads, 0, stream>>>(
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

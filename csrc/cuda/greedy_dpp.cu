// tokcomp::greedy_dpp on CUDA: checks and the launch of the kernel of greedy_dpp.cuh, one block
// per batch element.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../ops.h"
#include "launch.h"
#include "greedy_dpp.cuh"

namespace tokcomp {
namespace {

at::Tensor greedy_dpp_cuda(
    const at::Tensor& similarity_in,
    const at::Tensor& relevance_in,
    int64_t k) {
  check_greedy_dpp_inputs(similarity_in, relevance_in, k);
  TORCH_CHECK(similarity_in.is_cuda(), "tokcomp::greedy_dpp (CUDA): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(similarity_in.device());
  const at::Tensor similarity = similarity_in.contiguous();
  const at::Tensor relevance = relevance_in.to(at::kFloat).contiguous();
  const int64_t batch = similarity.size(0);
  const int64_t N = similarity.size(1);
  at::Tensor out = at::empty({batch, k}, similarity.options().dtype(at::kLong));
  if (batch == 0) {
    return out;
  }
  TORCH_CHECK(
      batch <= std::numeric_limits<int32_t>::max(),
      "tokcomp::greedy_dpp (CUDA): too many batch elements (",
      batch,
      ")");
  at::Tensor scratch = at::empty({batch, k + 1, N}, relevance.options());
  const int threads = gpu::warp_rounded_threads(N, gpu::kDppMaxThreads);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(similarity.scalar_type(), "tokcomp::greedy_dpp (CUDA)", [&] {
    gpu::greedy_dpp_kernel<scalar_t><<<static_cast<unsigned int>(batch), threads, 0, stream>>>(
        similarity.const_data_ptr<scalar_t>(),
        relevance.const_data_ptr<float>(),
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
  m.impl("greedy_dpp", &greedy_dpp_cuda);
}

}  // namespace tokcomp

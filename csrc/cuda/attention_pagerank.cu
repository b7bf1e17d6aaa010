// tokcomp::attention_pagerank on CUDA: checks, the choice of the cached or uncached kernel of
// attention_pagerank.cuh for the shared memory of this GPU, and the launch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../ops.h"
#include "launch.h"
#include "attention_pagerank.cuh"

namespace tokcomp {
namespace {

template <typename scalar_t, bool kCached>
void launch(
    const at::Tensor& attn,
    at::Tensor& out,
    int64_t matrices,
    int64_t N,
    int64_t iterations,
    size_t shared_bytes,
    cudaStream_t stream) {
  const auto kernel = &gpu::attention_pagerank_kernel<scalar_t, kCached>;
  if (shared_bytes > 48 * 1024) {  // above the default limit: opt in
    C10_CUDA_CHECK(cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)));
  }
  const int threads = gpu::warp_rounded_threads(N, gpu::kPagerankMaxThreads);
  kernel<<<static_cast<unsigned int>(matrices), threads, shared_bytes, stream>>>(
      attn.const_data_ptr<scalar_t>(),
      out.mutable_data_ptr<float>(),
      N,
      iterations,
      static_cast<float>(1.0 / static_cast<double>(N)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor attention_pagerank_cuda(const at::Tensor& attn_in, int64_t iterations) {
  check_attention_pagerank_inputs(attn_in, iterations);
  TORCH_CHECK(attn_in.is_cuda(), "tokcomp::attention_pagerank (CUDA): attn must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(attn_in.device());
  const at::Tensor attn = attn_in.contiguous();
  const int64_t N = attn.size(2);
  const int64_t matrices = attn.size(0) * attn.size(1);
  at::Tensor out = at::empty({attn.size(0), attn.size(1), N}, attn.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return out;
  }
  TORCH_CHECK(
      matrices <= std::numeric_limits<int32_t>::max(),
      "tokcomp::attention_pagerank (CUDA): too many matrices (",
      matrices,
      ")");
  const size_t vectors_bytes = 2 * static_cast<size_t>(N) * sizeof(float);
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  TORCH_CHECK(
      vectors_bytes <= limit,
      "tokcomp::attention_pagerank (CUDA): N = ",
      N,
      " is too large for the shared memory of this GPU");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(attn.scalar_type(), "tokcomp::attention_pagerank (CUDA)", [&] {
    const size_t cached_bytes =
        vectors_bytes + static_cast<size_t>(N) * static_cast<size_t>(N) * sizeof(scalar_t);
    if (iterations > 1 && cached_bytes <= limit) {
      launch<scalar_t, true>(attn, out, matrices, N, iterations, cached_bytes, stream);
    } else {
      launch<scalar_t, false>(attn, out, matrices, N, iterations, vectors_bytes, stream);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CUDA, m) {
  m.impl("attention_pagerank", &attention_pagerank_cuda);
}

}  // namespace tokcomp

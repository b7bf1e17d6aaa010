// tokcomp::best_match on CUDA: checks, then two launches, the inverse row norms of a and b
// (cosine_tiles.cuh) and the kernel of best_match.cuh.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../ops.h"
#include "best_match.cuh"
#include "launch.h"

namespace tokcomp {
namespace {

using gpu::kThreads;
using gpu::kTileA;

std::tuple<at::Tensor, at::Tensor> best_match_cuda(
    const at::Tensor& a_in,
    const at::Tensor& b_in,
    int64_t a_protected,
    int64_t b_protected) {
  check_best_match_inputs(a_in, b_in, a_protected, b_protected);
  TORCH_CHECK(a_in.is_cuda(), "tokcomp::best_match (CUDA): inputs must be CUDA tensors");
  const c10::cuda::CUDAGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous();
  const at::Tensor b = b_in.contiguous();
  const int64_t batch = a.size(0);
  const int64_t Na = a.size(1);
  const int64_t Nb = b.size(1);
  const int64_t C = a.size(2);
  at::Tensor score = at::empty({batch, Na}, a.options().dtype(at::kFloat));
  at::Tensor index = at::empty({batch, Na}, a.options().dtype(at::kLong));
  if (batch == 0 || Na == 0) {
    return {score, index};
  }
  at::Tensor inv_a = at::empty({batch, Na}, a.options().dtype(at::kFloat));
  at::Tensor inv_b = at::empty({batch, Nb}, a.options().dtype(at::kFloat));
  const int64_t tiles_a = (Na + kTileA - 1) / kTileA;
  TORCH_CHECK(
      batch * tiles_a <= std::numeric_limits<int32_t>::max(),
      "tokcomp::best_match (CUDA): too many rows (",
      batch,
      " x ",
      Na,
      ")");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  TOKCOMP_DISPATCH_FLOAT_TYPES(a.scalar_type(), "tokcomp::best_match (CUDA)", [&] {
    gpu::launch_inverse_norms<scalar_t>(a, inv_a, stream);
    gpu::launch_inverse_norms<scalar_t>(b, inv_b, stream);
    gpu::best_match_kernel<scalar_t><<<batch * tiles_a, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(),
        b.const_data_ptr<scalar_t>(),
        inv_a.const_data_ptr<float>(),
        inv_b.const_data_ptr<float>(),
        score.mutable_data_ptr<float>(),
        index.mutable_data_ptr<int64_t>(),
        Na,
        Nb,
        C,
        a_protected,
        b_protected,
        tiles_a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {score, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CUDA, m) {
  m.impl("best_match", &best_match_cuda);
}

}  // namespace tokcomp

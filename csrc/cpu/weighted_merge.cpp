// CPU kernel of tokcomp::weighted_merge: out[b, j] is the weight-weighted mean of token
// keep_idx[b, j] and of every token src_idx[b, r] with dst_pos[b, r] == j; out_size[b, j] is
// the sum of their sizes.
//
// One fused pass per batch element: the sources are first grouped by destination (a stable
// counting sort of dst_pos, so each output row sums its sources in the reference's order),
// then each output row is built once in a float32 buffer (kept row scaled by its weight, plus
// its weighted sources), divided by the summed weight and written in x's dtype. Work is split
// over batch elements and, when the batch is small, over channel chunks (at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../ops.h"
#include "convert.h"

namespace tokcomp {
namespace {

using cpu::from_float;
using cpu::to_float;

constexpr int64_t kChunkAlign = 16;  // channel chunks are multiples of 16 floats (one line)
constexpr int64_t kMinChunk = 64;

// Sources of batch element `n` grouped by destination: the sources of output row j are
// order[start[j] .. start[j + 1]), in increasing r. Checks every index.
void group_sources(
    const int64_t* src,
    const int64_t* dst,
    int64_t N,
    int64_t K,
    int64_t R,
    std::vector<int64_t>& start,
    std::vector<int64_t>& order) {
  std::fill(start.begin(), start.end(), 0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t d = dst[r];
    TORCH_CHECK(
        0 <= d && d < K,
        "tokcomp::weighted_merge: dst_pos value ",
        d,
        " out of range [0, ",
        K,
        ")");
    TORCH_CHECK(
        0 <= src[r] && src[r] < N,
        "tokcomp::weighted_merge: src_idx value ",
        src[r],
        " out of range [0, ",
        N,
        ")");
    ++start[d + 1];
  }
  for (int64_t j = 0; j < K; ++j) {
    start[j + 1] += start[j];
  }
  // Fill with a moving cursor per destination (start[j] advances), then shift back.
  for (int64_t r = 0; r < R; ++r) {
    order[start[dst[r]]++] = r;
  }
  for (int64_t j = K; j > 0; --j) {
    start[j] = start[j - 1];
  }
  start[0] = 0;
}

template <typename scalar_t>
void weighted_merge_cpu_kernel(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& size,
    const at::Tensor& keep_idx,
    const at::Tensor& src_idx,
    const at::Tensor& dst_pos,
    at::Tensor& out,
    at::Tensor& out_size) {
  const int64_t batch = x.size(0);
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t K = keep_idx.size(1);
  const int64_t R = src_idx.size(1);

  // Channel chunks: one per batch element when there are enough of them to share out.
  const int64_t threads = at::get_num_threads();
  int64_t width = std::max<int64_t>(C, 1);
  if (batch < 4 * threads) {
    const int64_t want = std::min(
        (4 * threads + batch - 1) / batch, std::max<int64_t>(C / kMinChunk, 1));
    width = (C + want - 1) / want;
    width = std::max<int64_t>((width + kChunkAlign - 1) / kChunkAlign * kChunkAlign, 1);
  }
  const int64_t chunks = std::max<int64_t>((C + width - 1) / width, 1);

  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const float* w_ptr = weight.const_data_ptr<float>();
  const float* s_ptr = size.const_data_ptr<float>();
  const int64_t* keep_ptr = keep_idx.const_data_ptr<int64_t>();
  const int64_t* src_ptr = src_idx.const_data_ptr<int64_t>();
  const int64_t* dst_ptr = dst_pos.const_data_ptr<int64_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  float* out_size_ptr = out_size.mutable_data_ptr<float>();

  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> start(K + 1);
    std::vector<int64_t> order(R);
    std::vector<float> acc(width);
    int64_t grouped = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / chunks;
      const int64_t part = task % chunks;
      const int64_t c0 = part * width;
      const int64_t cw = std::min(C, c0 + width) - c0;
      const int64_t* src = src_ptr + n * R;
      if (grouped != n) {
        group_sources(src, dst_ptr + n * R, N, K, R, start, order);
        grouped = n;
      }
      const scalar_t* xb = x_ptr + n * N * C + c0;
      const float* wb = w_ptr + n * N;
      const float* sb = s_ptr + n * N;
      float* a = acc.data();
      for (int64_t j = 0; j < K; ++j) {
        const int64_t k = keep_ptr[n * K + j];
        TORCH_CHECK(
            0 <= k && k < N,
            "tokcomp::weighted_merge: keep_idx value ",
            k,
            " out of range [0, ",
            N,
            ")");
        const float wk = wb[k];
        const scalar_t* xk = xb + k * C;
#pragma omp simd
        for (int64_t c = 0; c < cw; ++c) {
          a[c] = wk * to_float(xk[c]);
        }
        float norm = wk;
        float total = sb[k];
        for (int64_t e = start[j]; e < start[j + 1]; ++e) {
          const int64_t s = src[order[e]];
          const float ws = wb[s];
          const scalar_t* xs = xb + s * C;
#pragma omp simd
          for (int64_t c = 0; c < cw; ++c) {
            a[c] += ws * to_float(xs[c]);
          }
          norm += ws;
          total += sb[s];
        }
        scalar_t* o = out_ptr + (n * K + j) * C + c0;
#pragma omp simd
        for (int64_t c = 0; c < cw; ++c) {
          o[c] = from_float<scalar_t>(a[c] / norm);
        }
        if (part == 0) {
          out_size_ptr[n * K + j] = total;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> weighted_merge_cpu(
    const at::Tensor& x_in,
    const at::Tensor& weight_in,
    const at::Tensor& size_in,
    const at::Tensor& keep_in,
    const at::Tensor& src_in,
    const at::Tensor& dst_in) {
  check_weighted_merge_inputs(x_in, weight_in, size_in, keep_in, src_in, dst_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor size = size_in.contiguous();
  const at::Tensor keep_idx = keep_in.contiguous();
  const at::Tensor src_idx = src_in.contiguous();
  const at::Tensor dst_pos = dst_in.contiguous();
  at::Tensor out = at::empty({x.size(0), keep_idx.size(1), x.size(2)}, x.options());
  at::Tensor out_size = at::empty({x.size(0), keep_idx.size(1)}, size.options());
  // No output rows: nothing to compute, but sources (whose every dst_pos is then out of range)
  // must still be rejected, as the reference does.
  if (x.size(0) == 0 || (keep_idx.size(1) == 0 && src_idx.size(1) == 0)) {
    return {out, out_size};
  }
  TOKCOMP_DISPATCH_FLOAT_TYPES(x.scalar_type(), "tokcomp::weighted_merge (CPU)", [&] {
    weighted_merge_cpu_kernel<scalar_t>(
        x, weight, size, keep_idx, src_idx, dst_pos, out, out_size);
  });
  return {out, out_size};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CPU, m) {
  m.impl("weighted_merge", &weighted_merge_cpu);
}

}  // namespace tokcomp

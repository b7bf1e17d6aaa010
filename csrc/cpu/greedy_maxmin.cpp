// CPU kernel of tokcomp::greedy_maxmin: greedy weighted max-min (farthest-point) selection of k
// rows per batch element, with the semantics of tokcomp/ops/maxmin.py: pick first[b]; then, k - 1
// times, the unpicked j with the largest score[j] = min over picked i of dist[b, i, j] *
// weight[b, j] (lowest index on ties). Output (B, k) int64 in pick order.
//
// One task per batch element (at::parallel_for over B); the whole selection runs in one float32
// score vector of N entries (in L1 for the sizes VLM token pruning uses). Picked entries are set
// to -inf, so they are never picked again and min() keeps them there. A step is two vectorised
// passes: the update score[j] = min(score[j], dist[pick, j] * weight[j]) fused with the maximum
// of the new scores, then a scan for the first entry equal to that maximum. Only the k picked
// rows of dist are read. The product and the minimum are the same float32 operations as the
// reference's, so the picks agree exactly. A NaN or -inf product counts as the lowest float32
// (the non-finite rule of tokcomp.ops): above the picked entries' -inf, below every other score.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "../ops.h"
#include "convert.h"
#include "simd.h"

namespace tokcomp {
namespace {

using cpu::to_float;

// dist * weight, NaN and -inf as the lowest float32 (a max that vectorises: NaN compares false).
TOKCOMP_ALWAYS_INLINE float score_of(float dist, float weight) {
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  const float v = dist * weight;
  return v > kLowest ? v : kLowest;
}

template <typename scalar_t>
void select_one(
    const scalar_t* dist,
    const float* weight,
    int64_t N,
    int64_t first,
    int64_t k,
    float* score,
    int64_t* picks) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const scalar_t* row = dist + first * N;
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    score[j] = score_of(to_float(row[j]), weight[j]);
  }
  int64_t pick = first;
  picks[0] = pick;
  for (int64_t t = 1; t < k; ++t) {
    score[pick] = kNegInf;
    float best = kNegInf;
    if (t > 1) {  // the first step starts from the scores of `first` alone
      row = dist + pick * N;
#pragma omp simd reduction(max : best)
      for (int64_t j = 0; j < N; ++j) {
        const float v = score_of(to_float(row[j]), weight[j]);
        const float s = v < score[j] ? v : score[j];
        score[j] = s;
        best = s > best ? s : best;
      }
    } else {
#pragma omp simd reduction(max : best)
      for (int64_t j = 0; j < N; ++j) {
        best = score[j] > best ? score[j] : best;
      }
    }
    pick = 0;
    while (score[pick] != best) {
      ++pick;
    }
    picks[t] = pick;
  }
}

template <typename scalar_t>
void greedy_maxmin_cpu_kernel(
    const at::Tensor& dist,
    const at::Tensor& weight,
    const at::Tensor& first,
    int64_t k,
    at::Tensor& out) {
  const int64_t batch = dist.size(0);
  const int64_t N = dist.size(1);
  const scalar_t* dist_ptr = dist.const_data_ptr<scalar_t>();
  const float* weight_ptr = weight.const_data_ptr<float>();
  const int64_t* first_ptr = first.const_data_ptr<int64_t>();
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  for (int64_t n = 0; n < batch; ++n) {
    TORCH_CHECK(
        0 <= first_ptr[n] && first_ptr[n] < N,
        "tokcomp::greedy_maxmin: first value ",
        first_ptr[n],
        " out of range [0, ",
        N,
        ")");
  }
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(N);
    for (int64_t n = begin; n < end; ++n) {
      select_one(
          dist_ptr + n * N * N,
          weight_ptr + n * N,
          N,
          first_ptr[n],
          k,
          score.data(),
          out_ptr + n * k);
    }
  });
}

at::Tensor greedy_maxmin_cpu(
    const at::Tensor& dist_in,
    const at::Tensor& weight_in,
    const at::Tensor& first_in,
    int64_t k) {
  check_greedy_maxmin_inputs(dist_in, weight_in, first_in, k);
  const at::Tensor dist = dist_in.contiguous();
  const at::Tensor weight = weight_in.to(at::kFloat).contiguous();
  const at::Tensor first = first_in.contiguous();
  at::Tensor out = at::empty({dist.size(0), k}, first.options());
  if (dist.size(0) == 0) {
    return out;
  }
  TOKCOMP_DISPATCH_FLOAT_TYPES(dist.scalar_type(), "tokcomp::greedy_maxmin (CPU)", [&] {
    greedy_maxmin_cpu_kernel<scalar_t>(dist, weight, first, k, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CPU, m) {
  m.impl("greedy_maxmin", &greedy_maxmin_cpu);
}

}  // namespace tokcomp

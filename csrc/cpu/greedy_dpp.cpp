// CPU kernel of tokcomp::greedy_dpp: greedy MAP inference of the DPP with kernel
// L[j, m] = (r[j] * S[j, m]) * r[m] (Chen et al. 2018), k steps per batch element, with the
// semantics of tokcomp/ops/dpp.py. Output (B, k) int64, the picks ascending.
//
// One task per batch element (at::parallel_for over B). A step reads one row of S, subtracts
// its projections on the earlier vectors c_t (t ascending, each a vectorised pass over N) and
// updates d2; the next pick is the first maximum of the ranked d2. Every product and difference
// is rounded on its own, as in the reference: this file is compiled without floating-point
// contraction (the library is built with -mfma, which would fuse a - b * c), so the picks agree
// exactly. A NaN or -inf d2 ranks as the lowest float32, picked rows below it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../ops.h"
#include "convert.h"
#include "simd.h"

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace tokcomp {
namespace {

using cpu::to_float;

// The first unpicked m with the largest d2[m], NaN and -inf ranking as the lowest float32.
int64_t next_pick(const float* d2, const uint8_t* taken, int64_t N) {
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  float best = kNegInf;
  int64_t pick = -1;
  for (int64_t m = 0; m < N; ++m) {
    const float ranked = taken[m] ? kNegInf : (d2[m] > kLowest ? d2[m] : kLowest);
    if (pick < 0 || ranked > best) {
      best = ranked;
      pick = m;
    }
  }
  return pick;
}

template <typename scalar_t>
void select_one(
    const scalar_t* similarity,
    const float* relevance,
    int64_t N,
    int64_t k,
    float* vectors,
    float* d2,
    uint8_t* taken,
    int64_t* picks) {
  for (int64_t m = 0; m < N; ++m) {
    d2[m] = (relevance[m] * to_float(similarity[m * N + m])) * relevance[m];
    taken[m] = 0;
  }
  for (int64_t step = 0; step < k; ++step) {
    const int64_t pick = next_pick(d2, taken, N);
    picks[step] = pick;
    taken[pick] = 1;
    if (step == k - 1) {
      break;
    }
    const scalar_t* row = similarity + pick * N;
    const float scale = relevance[pick];
    float* e = vectors + step * N;
#pragma omp simd
    for (int64_t m = 0; m < N; ++m) {
      e[m] = (scale * to_float(row[m])) * relevance[m];
    }
    for (int64_t t = 0; t < step; ++t) {
      const float* c = vectors + t * N;
      const float cj = c[pick];
#pragma omp simd
      for (int64_t m = 0; m < N; ++m) {
        e[m] = e[m] - cj * c[m];
      }
    }
    const float norm = std::sqrt(d2[pick]);
#pragma omp simd
    for (int64_t m = 0; m < N; ++m) {
      e[m] = e[m] / norm;
      d2[m] = d2[m] - e[m] * e[m];
    }
  }
  std::sort(picks, picks + k);
}

template <typename scalar_t>
void greedy_dpp_cpu_kernel(
    const at::Tensor& similarity,
    const at::Tensor& relevance,
    int64_t k,
    at::Tensor& out) {
  const int64_t N = similarity.size(1);
  const scalar_t* similarity_ptr = similarity.const_data_ptr<scalar_t>();
  const float* relevance_ptr = relevance.const_data_ptr<float>();
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, similarity.size(0), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> vectors(std::max<int64_t>(k - 1, 1) * N);
    std::vector<float> d2(N);
    std::vector<uint8_t> taken(N);
    for (int64_t n = begin; n < end; ++n) {
      select_one(
          similarity_ptr + n * N * N,
          relevance_ptr + n * N,
          N,
          k,
          vectors.data(),
          d2.data(),
          taken.data(),
          out_ptr + n * k);
    }
  });
}

at::Tensor greedy_dpp_cpu(
    const at::Tensor& similarity_in,
    const at::Tensor& relevance_in,
    int64_t k) {
  check_greedy_dpp_inputs(similarity_in, relevance_in, k);
  const at::Tensor similarity = similarity_in.contiguous();
  const at::Tensor relevance = relevance_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({similarity.size(0), k}, similarity.options().dtype(at::kLong));
  if (similarity.size(0) == 0) {
    return out;
  }
  TOKCOMP_DISPATCH_FLOAT_TYPES(similarity.scalar_type(), "tokcomp::greedy_dpp (CPU)", [&] {
    greedy_dpp_cpu_kernel<scalar_t>(similarity, relevance, k, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CPU, m) {
  m.impl("greedy_dpp", &greedy_dpp_cpu);
}

}  // namespace tokcomp

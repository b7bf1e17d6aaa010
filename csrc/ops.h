// Shared declarations and input checks of tokcomp's custom ops (namespace `tokcomp`).
//
// The schemas are defined once in tokcomp.cpp; cpu/ and cuda/ register one kernel each
// through TORCH_LIBRARY_IMPL. The checks below are what every backend enforces, so the
// error messages are the same on every device.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

// Runs __VA_ARGS__ (a lambda body using `scalar_t`) for float32, bfloat16 and float16.
#define TOKCOMP_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)        \
  AT_DISPATCH_SWITCH(                                       \
      TYPE,                                                 \
      NAME,                                                 \
      AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)             \
          AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)      \
              AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace tokcomp {

inline bool is_supported_float(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// a: (B, Na, C), b: (B, Nb, C), same float dtype and device, 0 <= protected <= rows.
inline void check_best_match_inputs(
    const at::Tensor& a,
    const at::Tensor& b,
    int64_t a_protected,
    int64_t b_protected) {
  TORCH_CHECK(
      a.dim() == 3 && b.dim() == 3,
      "tokcomp::best_match: a and b must be (B, N, C) tensors, got shapes ",
      a.sizes(),
      " and ",
      b.sizes());
  TORCH_CHECK(
      a.size(0) == b.size(0) && a.size(2) == b.size(2),
      "tokcomp::best_match: batch and channel sizes of a and b must agree, got ",
      a.sizes(),
      " and ",
      b.sizes());
  TORCH_CHECK(b.size(1) > 0, "tokcomp::best_match: set B (the second input) is empty");
  TORCH_CHECK(
      a.scalar_type() == b.scalar_type(),
      "tokcomp::best_match: a and b must have the same dtype, got ",
      a.scalar_type(),
      " and ",
      b.scalar_type());
  TORCH_CHECK(
      is_supported_float(a),
      "tokcomp::best_match: dtype must be float32, bfloat16 or float16, got ",
      a.scalar_type());
  TORCH_CHECK(
      a.device() == b.device(),
      "tokcomp::best_match: a and b must be on the same device, got ",
      a.device(),
      " and ",
      b.device());
  TORCH_CHECK(
      0 <= a_protected && a_protected <= a.size(1),
      "tokcomp::best_match: a_protected must be in [0, ",
      a.size(1),
      "], got ",
      a_protected);
  TORCH_CHECK(
      0 <= b_protected && b_protected <= b.size(1),
      "tokcomp::best_match: b_protected must be in [0, ",
      b.size(1),
      "], got ",
      b_protected);
}

// x: (B, N, C) float; weight, size: (B, N) float32; keep_idx: (B, K); src_idx, dst_pos:
// (B, R); indices int64; everything on x's device.
inline void check_weighted_merge_inputs(
    const at::Tensor& x,
    const at::Tensor& weight,
    const at::Tensor& size,
    const at::Tensor& keep_idx,
    const at::Tensor& src_idx,
    const at::Tensor& dst_pos) {
  TORCH_CHECK(
      x.dim() == 3, "tokcomp::weighted_merge: x must be a (B, N, C) tensor, got shape ", x.sizes());
  TORCH_CHECK(
      is_supported_float(x),
      "tokcomp::weighted_merge: x must be float32, bfloat16 or float16, got ",
      x.scalar_type());
  const auto batch = x.size(0);
  const auto tokens = x.size(1);
  TORCH_CHECK(
      weight.dim() == 2 && weight.size(0) == batch && weight.size(1) == tokens,
      "tokcomp::weighted_merge: weight must be (B, N) = (",
      batch,
      ", ",
      tokens,
      "), got shape ",
      weight.sizes());
  TORCH_CHECK(
      size.dim() == 2 && size.size(0) == batch && size.size(1) == tokens,
      "tokcomp::weighted_merge: size must be (B, N) = (",
      batch,
      ", ",
      tokens,
      "), got shape ",
      size.sizes());
  TORCH_CHECK(
      weight.scalar_type() == at::kFloat && size.scalar_type() == at::kFloat,
      "tokcomp::weighted_merge: weight and size must be float32, got ",
      weight.scalar_type(),
      " and ",
      size.scalar_type());
  TORCH_CHECK(
      keep_idx.dim() == 2 && keep_idx.size(0) == batch,
      "tokcomp::weighted_merge: keep_idx must be (B, K) with B = ",
      batch,
      ", got shape ",
      keep_idx.sizes());
  TORCH_CHECK(
      src_idx.dim() == 2 && src_idx.size(0) == batch && src_idx.sizes() == dst_pos.sizes(),
      "tokcomp::weighted_merge: src_idx and dst_pos must both be (B, R) with B = ",
      batch,
      ", got shapes ",
      src_idx.sizes(),
      " and ",
      dst_pos.sizes());
  TORCH_CHECK(
      keep_idx.scalar_type() == at::kLong && src_idx.scalar_type() == at::kLong &&
          dst_pos.scalar_type() == at::kLong,
      "tokcomp::weighted_merge: keep_idx, src_idx and dst_pos must be int64, got ",
      keep_idx.scalar_type(),
      ", ",
      src_idx.scalar_type(),
      " and ",
      dst_pos.scalar_type());
  for (const at::Tensor* t : {&weight, &size, &keep_idx, &src_idx, &dst_pos}) {
    TORCH_CHECK(
        t->device() == x.device(),
        "tokcomp::weighted_merge: all inputs must be on x's device ",
        x.device(),
        ", got one on ",
        t->device());
  }
}

// metric: (B, T, C) float.
inline void check_energy_score_inputs(const at::Tensor& metric) {
  TORCH_CHECK(
      metric.dim() == 3,
      "tokcomp::energy_score: metric must be a (B, T, C) tensor, got shape ",
      metric.sizes());
  TORCH_CHECK(
      is_supported_float(metric),
      "tokcomp::energy_score: metric must be float32, bfloat16 or float16, got ",
      metric.scalar_type());
}

// attn: (B, H, N, N) float; iterations >= 0.
inline void check_attention_pagerank_inputs(const at::Tensor& attn, int64_t iterations) {
  TORCH_CHECK(
      attn.dim() == 4 && attn.size(2) == attn.size(3),
      "tokcomp::attention_pagerank: attn must be a (B, H, N, N) tensor, got shape ",
      attn.sizes());
  TORCH_CHECK(
      is_supported_float(attn),
      "tokcomp::attention_pagerank: attn must be float32, bfloat16 or float16, got ",
      attn.scalar_type());
  TORCH_CHECK(
      iterations >= 0,
      "tokcomp::attention_pagerank: iterations must be >= 0, got ",
      iterations);
}

// dist: (B, N, N) float; weight: (B, N) float; first: (B,) int64; 1 <= k <= N; one device.
// Values (first in [0, N), weight >= 0, finite distances) are the caller's promise; the CPU
// kernel checks `first`.
inline void check_greedy_maxmin_inputs(
    const at::Tensor& dist,
    const at::Tensor& weight,
    const at::Tensor& first,
    int64_t k) {
  TORCH_CHECK(
      dist.dim() == 3 && dist.size(1) == dist.size(2),
      "tokcomp::greedy_maxmin: dist must be a (B, N, N) tensor, got shape ",
      dist.sizes());
  const auto batch = dist.size(0);
  const auto tokens = dist.size(1);
  TORCH_CHECK(
      weight.dim() == 2 && weight.size(0) == batch && weight.size(1) == tokens,
      "tokcomp::greedy_maxmin: weight must be (B, N) = (",
      batch,
      ", ",
      tokens,
      "), got shape ",
      weight.sizes());
  TORCH_CHECK(
      first.dim() == 1 && first.size(0) == batch,
      "tokcomp::greedy_maxmin: first must be (B,) = (",
      batch,
      ",), got shape ",
      first.sizes());
  TORCH_CHECK(
      is_supported_float(dist) && is_supported_float(weight),
      "tokcomp::greedy_maxmin: dist and weight must be float32, bfloat16 or float16, got ",
      dist.scalar_type(),
      " and ",
      weight.scalar_type());
  TORCH_CHECK(
      first.scalar_type() == at::kLong,
      "tokcomp::greedy_maxmin: first must be int64, got ",
      first.scalar_type());
  TORCH_CHECK(
      1 <= k && k <= tokens,
      "tokcomp::greedy_maxmin: k must be in [1, ",
      tokens,
      "], got ",
      k);
  TORCH_CHECK(
      weight.device() == dist.device() && first.device() == dist.device(),
      "tokcomp::greedy_maxmin: dist, weight and first must be on the same device, got ",
      dist.device(),
      ", ",
      weight.device(),
      " and ",
      first.device());
}

// similarity: (B, N, N) float; relevance: (B, N) float; 1 <= k <= N; one device.
inline void check_greedy_dpp_inputs(
    const at::Tensor& similarity,
    const at::Tensor& relevance,
    int64_t k) {
  TORCH_CHECK(
      similarity.dim() == 3 && similarity.size(1) == similarity.size(2),
      "tokcomp::greedy_dpp: similarity must be a (B, N, N) tensor, got shape ",
      similarity.sizes());
  const auto batch = similarity.size(0);
  const auto tokens = similarity.size(1);
  TORCH_CHECK(
      relevance.dim() == 2 && relevance.size(0) == batch && relevance.size(1) == tokens,
      "tokcomp::greedy_dpp: relevance must be (B, N) = (",
      batch,
      ", ",
      tokens,
      "), got shape ",
      relevance.sizes());
  TORCH_CHECK(
      is_supported_float(similarity) && is_supported_float(relevance),
      "tokcomp::greedy_dpp: similarity and relevance must be float32, bfloat16 or float16, got ",
      similarity.scalar_type(),
      " and ",
      relevance.scalar_type());
  TORCH_CHECK(
      1 <= k && k <= tokens,
      "tokcomp::greedy_dpp: k must be in [1, ",
      tokens,
      "], got ",
      k);
  TORCH_CHECK(
      relevance.device() == similarity.device(),
      "tokcomp::greedy_dpp: similarity and relevance must be on the same device, got ",
      similarity.device(),
      " and ",
      relevance.device());
}

}  // namespace tokcomp

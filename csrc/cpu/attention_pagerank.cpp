// CPU kernel of tokcomp::attention_pagerank: for every (batch, head) matrix A (N x N) of attn,
// `iterations` steps of s <- A^T s from s = 1/N, i.e. s'_j = sum_i s_i A[i, j]; out = s (float32).
//
// One task per matrix (at::parallel_for over B * H), which stays in cache (L2 at N = 197) for all
// its iterations, where the reference streams the whole attn tensor from memory once per
// iteration. float32 matrices are read in place; bfloat16 and float16 ones are converted once
// into a per-thread float32 buffer. A step keeps the sums s'_j of a block of columns in registers
// while the rows stream past: one broadcast of s_i and one fused multiply-add per vector of A.
//   * AVX-512 (chosen at run time): blocks of up to kMaxVectors x 16 columns, i.e. the whole row
//     for N <= 384, so A is read front to back in one sequential pass; the last vector of a block
//     uses masked loads, so no padding is needed.
//   * portable (AVX2): blocks of kBlock, then 16, then the remaining columns.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ops.h"
#include "convert.h"
#include "simd.h"

namespace tokcomp {
namespace {

using cpu::to_float;

constexpr int64_t kBlock = 64;  // portable: columns whose sums stay in registers
constexpr int64_t kVector = 16;  // then one AVX-512 register (two AVX2 ones) at a time

// out[l] = sum_i s[i] a[i * stride + l] for l < width (W when W > 0).
template <int64_t W>
TOKCOMP_ALWAYS_INLINE void column_block(
    const float* __restrict a,
    int64_t N,
    int64_t stride,
    const float* __restrict s,
    float* __restrict out,
    int64_t width = W) {
  constexpr int64_t kWidth = W > 0 ? W : kVector;
  float acc[kWidth];
#pragma omp simd
  for (int64_t l = 0; l < kWidth; ++l) {
    acc[l] = 0.f;
  }
  for (int64_t i = 0; i < N; ++i) {
    const float si = s[i];
    const float* __restrict row = a + i * stride;
    if constexpr (W > 0) {
#pragma omp simd
      for (int64_t l = 0; l < W; ++l) {
        acc[l] += si * row[l];
      }
    } else {
      for (int64_t l = 0; l < width; ++l) {
        acc[l] += si * row[l];
      }
    }
  }
  for (int64_t l = 0; l < width; ++l) {
    out[l] = acc[l];
  }
}

// One step out = A^T s on the float32 matrix a (N x N, rows `stride` floats apart), portable.
void step_portable(const float* a, int64_t N, int64_t stride, const float* s, float* out) {
  int64_t j = 0;
  for (; j + kBlock <= N; j += kBlock) {
    column_block<kBlock>(a + j, N, stride, s, out + j);
  }
  for (; j + kVector <= N; j += kVector) {
    column_block<kVector>(a + j, N, stride, s, out + j);
  }
  if (j < N) {
    column_block<0>(a + j, N, stride, s, out + j, N - j);
  }
}

#ifdef TOKCOMP_X86_DISPATCH
constexpr int kMaxVectors = 24;  // accumulator registers of a block (of 32)

// out[l] = sum_i s[i] a[i * stride + l] for the R vectors of 16 columns from a; the last vector
// holds the columns set in `tail`.
template <int R>
__attribute__((target("avx512f"))) void column_vectors_avx512(
    const float* a,
    int64_t N,
    int64_t stride,
    const float* s,
    float* out,
    __mmask16 tail) {
  __m512 acc[R];
#pragma GCC unroll 32
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
  }
  for (int64_t i = 0; i < N; ++i) {
    const __m512 si = _mm512_set1_ps(s[i]);
    const float* row = a + i * stride;
#pragma GCC unroll 32
    for (int r = 0; r + 1 < R; ++r) {
      acc[r] = _mm512_fmadd_ps(si, _mm512_loadu_ps(row + kVector * r), acc[r]);
    }
    const __m512 last = _mm512_maskz_loadu_ps(tail, row + kVector * (R - 1));
    acc[R - 1] = _mm512_fmadd_ps(si, last, acc[R - 1]);
  }
#pragma GCC unroll 32
  for (int r = 0; r + 1 < R; ++r) {
    _mm512_storeu_ps(out + kVector * r, acc[r]);
  }
  _mm512_mask_storeu_ps(out + kVector * (R - 1), tail, acc[R - 1]);
}

using ColumnVectorsFn = void (*)(const float*, int64_t, int64_t, const float*, float*, __mmask16);

template <int... Rs>
constexpr std::array<ColumnVectorsFn, kMaxVectors> column_vectors_table(
    std::integer_sequence<int, Rs...>) {
  return {&column_vectors_avx512<Rs + 1>...};
}

constexpr auto kColumnVectors =
    column_vectors_table(std::make_integer_sequence<int, kMaxVectors>{});

// One step out = A^T s, AVX-512.
void step_avx512(const float* a, int64_t N, int64_t stride, const float* s, float* out) {
  for (int64_t j = 0; j < N; j += kVector * kMaxVectors) {
    const int64_t columns = std::min<int64_t>(N - j, kVector * kMaxVectors);
    const int64_t vectors = (columns + kVector - 1) / kVector;
    const int64_t last = columns - kVector * (vectors - 1);
    const auto tail = static_cast<__mmask16>((1u << last) - 1u);
    kColumnVectors[vectors - 1](a + j, N, stride, s, out + j, tail);
  }
}
#endif

template <typename scalar_t>
void attention_pagerank_cpu_kernel(const at::Tensor& attn, int64_t iterations, at::Tensor& out) {
  const int64_t batch = attn.size(0);
  const int64_t heads = attn.size(1);
  const int64_t N = attn.size(2);
  const scalar_t* src = attn.const_data_ptr<scalar_t>();
  const int64_t batch_stride = attn.stride(0);
  const int64_t head_stride = attn.stride(1);
  const int64_t row_stride = attn.stride(2);
  float* out_ptr = out.mutable_data_ptr<float>();
  auto step = &step_portable;
#ifdef TOKCOMP_X86_DISPATCH
  if (cpu::use_avx512()) {
    step = &step_avx512;
  }
#endif

  const float start = static_cast<float>(1.0 / static_cast<double>(N));  // as the reference

  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    constexpr bool kInPlace = std::is_same_v<scalar_t, float>;
    std::vector<float> converted(kInPlace ? 0 : N * N);
    std::vector<float> s(N);
    std::vector<float> spare(N);
    for (int64_t task = begin; task < end; ++task) {
      const scalar_t* a = src + (task / heads) * batch_stride + (task % heads) * head_stride;
      const float* matrix = nullptr;
      int64_t stride = N;
      if constexpr (kInPlace) {
        matrix = a;
        stride = row_stride;
      } else {
        for (int64_t i = 0; i < N; ++i) {
          const scalar_t* row = a + i * row_stride;
          float* dst = converted.data() + i * N;
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) {
            dst[j] = to_float(row[j]);
          }
        }
        matrix = converted.data();
      }
      std::fill(s.begin(), s.end(), start);
      for (int64_t it = 0; it < iterations; ++it) {
        step(matrix, N, stride, s.data(), spare.data());
        std::swap(s, spare);
      }
      std::copy(s.begin(), s.end(), out_ptr + task * N);
    }
  });
}

at::Tensor attention_pagerank_cpu(const at::Tensor& attn_in, int64_t iterations) {
  check_attention_pagerank_inputs(attn_in, iterations);
  const at::Tensor attn = cpu::rows_with_unit_channel_stride(attn_in);
  const int64_t N = attn.size(2);
  at::Tensor out = at::empty({attn.size(0), attn.size(1), N}, attn.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return out;
  }
  if (iterations == 0) {
    return out.fill_(1.0 / static_cast<double>(N));
  }
  TOKCOMP_DISPATCH_FLOAT_TYPES(attn.scalar_type(), "tokcomp::attention_pagerank (CPU)", [&] {
    attention_pagerank_cpu_kernel<scalar_t>(attn, iterations, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CPU, m) {
  m.impl("attention_pagerank", &attention_pagerank_cpu);
}

}  // namespace tokcomp

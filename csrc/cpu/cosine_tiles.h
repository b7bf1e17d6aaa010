// Building blocks of the CPU kernels that compare rows by cosine similarity (best_match,
// energy_score): row normalisation, packing rows into channel-major panels, register-blocked
// dot-product micro-kernels (portable loops the compiler vectorises for AVX2 + FMA, and AVX-512
// intrinsics), and the run-time choice between them.
//
// A "row kernel" is a struct Body with `template <int M, typename Dot> static void run(...)`
// (always inline) that handles a tile of M rows with the micro-kernel Dot; RowKernels<Body,
// Args...>::get() instantiates it for every M, compiled for AVX-512 when use_avx512() (simd.h),
// for the portable target otherwise.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <utility>

#include "convert.h"
#include "simd.h"

namespace tokcomp::cpu {

constexpr int64_t kLanes = 16;  // rows per panel: two AVX2 registers
constexpr int kPortableRows = 6;  // rows per micro-tile: 6 x 2 AVX2 accumulator registers
constexpr int kMaxRows = 8;       // rows per micro-tile with AVX-512: 8 x 2 accumulators
constexpr float kEps = 1e-12f;  // F.normalize's eps

// dst[r, :] = src[r, :] / max(|src[r, :]|, eps) in float32, for `rows` rows of C channels
// `stride` elements apart in src (dst is packed).
template <typename scalar_t>
void normalize_rows(const scalar_t* src, int64_t rows, int64_t C, int64_t stride, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * stride;
    float* d = dst + r * C;
    float sum_sq = 0.f;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t c = 0; c < C; ++c) {
      const float v = to_float(s[c]);
      d[c] = v;
      sum_sq += v * v;
    }
    const float denom = std::max(std::sqrt(sum_sq), kEps);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      d[c] /= denom;
    }
  }
}

// panel[c][l] = rows[l][c] for `count` <= kLanes normalised rows of C channels (row-major);
// lanes past `count` are zero.
inline void to_panel(const float* rows, int64_t count, int64_t C, float* panel) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t l = 0; l < kLanes; ++l) {
      panel[c * kLanes + l] = l < count ? rows[l * C + c] : 0.f;
    }
  }
}

// Normalised rows of b (Nb rows of C channels, `stride` apart) packed as
// panels[p][c][l] = row p * kLanes + l, channel c; rows past Nb are zero. `rows_buf` holds
// kLanes x C floats.
template <typename scalar_t>
void pack_panels(
    const scalar_t* b,
    int64_t Nb,
    int64_t C,
    int64_t stride,
    int64_t first_panel,
    float* rows_buf,
    float* panels) {
  const int64_t num_panels = (Nb + kLanes - 1) / kLanes;
  for (int64_t p = first_panel; p < num_panels; ++p) {
    const int64_t j0 = p * kLanes;
    const int64_t rows = std::min(kLanes, Nb - j0);
    normalize_rows(b + j0 * stride, rows, C, stride, rows_buf);
    to_panel(rows_buf, rows, C, panels + p * C * kLanes);
  }
}

// acc[i][l] = dot(row i, panel row l) for M rows (row-major, C wide): one broadcast
// of row i, channel c, times the kLanes floats of the panel at channel c, per row and channel.
struct PortableDot {
  static constexpr bool kPairs = false;

  template <int M>
  static TOKCOMP_ALWAYS_INLINE void run(
      const float* __restrict a,
      int64_t C,
      const float* __restrict panel,
      float (&acc)[kMaxRows][kLanes]) {
    float t[M][kLanes];
    for (int i = 0; i < M; ++i) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        t[i][l] = 0.f;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const float* __restrict bp = panel + c * kLanes;
      for (int i = 0; i < M; ++i) {
        const float av = a[i * C + c];
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) {
          t[i][l] += av * bp[l];
        }
      }
    }
    for (int i = 0; i < M; ++i) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        acc[i][l] = t[i][l];
      }
    }
  }
};

#ifdef TOKCOMP_X86_DISPATCH
// The same with AVX-512 (a panel channel is one register), selected at run time when the CPU
// has it: up to kMaxRows accumulator registers.
struct Avx512Dot {
  static constexpr bool kPairs = true;

  template <int M>
  __attribute__((target("avx512f"))) static inline void run(
      const float* __restrict a,
      int64_t C,
      const float* __restrict panel,
      float (&acc)[kMaxRows][kLanes]) {
    static_assert(kLanes == 16, "one AVX-512 register per panel channel");
    __m512 t[M];
    for (int i = 0; i < M; ++i) {
      t[i] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m512 bv = _mm512_loadu_ps(panel + c * kLanes);
      for (int i = 0; i < M; ++i) {
        t[i] = _mm512_fmadd_ps(_mm512_set1_ps(a[i * C + c]), bv, t[i]);
      }
    }
    for (int i = 0; i < M; ++i) {
      _mm512_storeu_ps(acc[i], t[i]);
    }
  }

  // Two panels at once: each broadcast of a[i][c] feeds two FMAs (2 x M accumulators), so
  // loads stay well below the FMA rate.
  template <int M>
  __attribute__((target("avx512f"))) static inline void run_pair(
      const float* __restrict a,
      int64_t C,
      const float* __restrict panel0,
      const float* __restrict panel1,
      float (&acc0)[kMaxRows][kLanes],
      float (&acc1)[kMaxRows][kLanes]) {
    __m512 t0[M];
    __m512 t1[M];
    for (int i = 0; i < M; ++i) {
      t0[i] = _mm512_setzero_ps();
      t1[i] = _mm512_setzero_ps();
    }
    for (int64_t c = 0; c < C; ++c) {
      const __m512 b0 = _mm512_loadu_ps(panel0 + c * kLanes);
      const __m512 b1 = _mm512_loadu_ps(panel1 + c * kLanes);
      for (int i = 0; i < M; ++i) {
        const __m512 av = _mm512_set1_ps(a[i * C + c]);
        t0[i] = _mm512_fmadd_ps(av, b0, t0[i]);
        t1[i] = _mm512_fmadd_ps(av, b1, t1[i]);
      }
    }
    for (int i = 0; i < M; ++i) {
      _mm512_storeu_ps(acc0[i], t0[i]);
      _mm512_storeu_ps(acc1[i], t1[i]);
    }
  }
};
#endif

// Scores of M rows against panels [first, count), each panel's (kMaxRows x kLanes) dot
// products passed to visit(acc, panel) in increasing panel order (two panels per step where
// the Dot kernel pairs them).
template <int M, typename Dot, typename Visit>
TOKCOMP_ALWAYS_INLINE void for_each_panel(
    const float* rows, int64_t C, const float* panels, int64_t first, int64_t count,
    Visit&& visit) {
  float acc[kMaxRows][kLanes];
  int64_t p = first;
  if constexpr (Dot::kPairs) {
    float acc1[kMaxRows][kLanes];
    for (; p + 1 < count; p += 2) {
      Dot::template run_pair<M>(
          rows, C, panels + p * C * kLanes, panels + (p + 1) * C * kLanes, acc, acc1);
      visit(acc, p);
      visit(acc1, p + 1);
    }
  }
  for (; p < count; ++p) {
    Dot::template run<M>(rows, C, panels + p * C * kLanes, acc);
    visit(acc, p);
  }
}

// Body::run<M, Dot> for M = 1..rows, rows = kMaxRows with AVX-512, kPortableRows otherwise:
// table[m - 1] handles m rows.
template <typename Body, typename... Args>
struct RowKernels {
  using Fn = void (*)(Args...);
  int rows;
  std::array<Fn, kMaxRows> table;

  static const RowKernels& get() {
    static const RowKernels kernels = [] {
#ifdef TOKCOMP_X86_DISPATCH
      if (use_avx512()) {
        return avx512(std::make_integer_sequence<int, kMaxRows>{});
      }
#endif
      return portable(std::make_integer_sequence<int, kMaxRows>{});
    }();
    return kernels;
  }

 private:
  template <int M>
  static void run_portable(Args... args) {
    Body::template run<M, PortableDot>(args...);
  }

  template <int... Ms>
  static RowKernels portable(std::integer_sequence<int, Ms...>) {
    return {kPortableRows, {&run_portable<std::min(Ms + 1, kPortableRows)>...}};
  }

#ifdef TOKCOMP_X86_DISPATCH
  template <int M>
  __attribute__((target("avx512f"))) static void run_avx512(Args... args) {
    Body::template run<M, Avx512Dot>(args...);
  }

  template <int... Ms>
  static RowKernels avx512(std::integer_sequence<int, Ms...>) {
    return {kMaxRows, {&run_avx512<Ms + 1>...}};
  }
#endif
};

}  // namespace tokcomp::cpu

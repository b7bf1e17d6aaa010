// CPU kernel of tokcomp::best_match: for every row of a, the best cosine score over the rows of
// b and its index (first index on ties, like torch.max).
//
// Layout of the computation, per batch element:
//   * the rows of b are normalised once (float32, divided by max(|row|, 1e-12) as F.normalize
//     does) and packed into panels of kLanes rows stored channel-major, so the inner loop reads
//     kLanes consecutive floats per channel;
//   * the rows of a are normalised a tile at a time into a small buffer, and a register-blocked
//     micro-kernel computes the rows x kLanes dot products of a row tile against a panel with
//     one broadcast and kLanes-wide fused multiply-adds per channel: 6-row tiles written as
//     plain loops the compiler vectorises (AVX2 + FMA with the flags setup.py passes), or 8-row
//     tiles against two panels at once with AVX-512 intrinsics, chosen at run time when the CPU
//     has AVX-512F (the library itself stays loadable on any AVX2 CPU);
//   * a running per-lane maximum (value and index) is kept per row, reduced across lanes at the
//     end; protected and padding columns get a -inf bias so they are never chosen.
// Work is split over batch x row ranges with at::parallel_for (OpenMP), so one image also uses
// every thread; each task packs the panels of its batch element once and reuses them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TOKCOMP_X86_DISPATCH 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TOKCOMP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TOKCOMP_ALWAYS_INLINE inline
#endif

#include "../ops.h"
#include "convert.h"

namespace tokcomp {
namespace {

using cpu::to_float;

constexpr int64_t kLanes = 16;  // b rows per panel: two AVX2 registers
constexpr int kPortableRows = 6;  // a rows per micro-tile: 6 x 2 AVX2 accumulator registers
constexpr int kMaxRows = 8;       // a rows per micro-tile with AVX-512: 8 x 2 accumulators
constexpr float kEps = 1e-12f;  // F.normalize's eps
constexpr int64_t kMinRowsPerTask = 24;

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
    if (rows < kLanes) {
      std::fill(rows_buf + rows * C, rows_buf + kLanes * C, 0.f);
    }
    float* panel = panels + p * C * kLanes;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t l = 0; l < kLanes; ++l) {
        panel[c * kLanes + l] = rows_buf[l * C + c];
      }
    }
  }
}

// acc[i][l] = dot(a row i, panel row l) for M rows of a (row-major, C wide): one broadcast
// of a[i][c] times the kLanes floats of the panel at channel c, per row and channel.
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

// Best score and index over panels [first_panel, num_panels) for M normalised rows of a.
template <int M, typename Dot>
TOKCOMP_ALWAYS_INLINE void match_rows_body(
    const float* a_rows,
    int64_t C,
    const float* panels,
    int64_t first_panel,
    int64_t num_panels,
    const float* bias,
    float* score,
    int64_t* index) {
  float best[M][kLanes];
  int32_t arg[M][kLanes];
  for (int i = 0; i < M; ++i) {
    for (int64_t l = 0; l < kLanes; ++l) {
      best[i][l] = -std::numeric_limits<float>::infinity();
      arg[i][l] = 0;
    }
  }
  // Fold one panel's scores into the running per-lane maxima (columns in increasing order per
  // lane, strict comparison: the first index wins ties).
  auto update = [&](const float (&acc)[kMaxRows][kLanes], int64_t p) {
    const float* pb = bias + p * kLanes;
    const int32_t j0 = static_cast<int32_t>(p * kLanes);
    for (int i = 0; i < M; ++i) {
#pragma omp simd
      for (int32_t l = 0; l < static_cast<int32_t>(kLanes); ++l) {
        const float s = acc[i][l] + pb[l];
        const bool better = s > best[i][l];
        best[i][l] = better ? s : best[i][l];
        arg[i][l] = better ? j0 + l : arg[i][l];
      }
    }
  };
  float acc[kMaxRows][kLanes];
  int64_t p = first_panel;
  if constexpr (Dot::kPairs) {
    float acc1[kMaxRows][kLanes];
    for (; p + 1 < num_panels; p += 2) {
      Dot::template run_pair<M>(
          a_rows, C, panels + p * C * kLanes, panels + (p + 1) * C * kLanes, acc, acc1);
      update(acc, p);
      update(acc1, p + 1);
    }
  }
  for (; p < num_panels; ++p) {
    Dot::template run<M>(a_rows, C, panels + p * C * kLanes, acc);
    update(acc, p);
  }
  for (int i = 0; i < M; ++i) {
    float v = best[i][0];
    int32_t j = arg[i][0];
    for (int64_t l = 1; l < kLanes; ++l) {
      if (best[i][l] > v || (best[i][l] == v && arg[i][l] < j)) {
        v = best[i][l];
        j = arg[i][l];
      }
    }
    score[i] = v;
    index[i] = v == -std::numeric_limits<float>::infinity() ? 0 : j;
  }
}

using MatchRowsFn = void (*)(
    const float*, int64_t, const float*, int64_t, int64_t, const float*, float*, int64_t*);

template <int M>
void match_rows_portable(
    const float* a_rows,
    int64_t C,
    const float* panels,
    int64_t first_panel,
    int64_t num_panels,
    const float* bias,
    float* score,
    int64_t* index) {
  match_rows_body<M, PortableDot>(a_rows, C, panels, first_panel, num_panels, bias, score, index);
}

#ifdef TOKCOMP_X86_DISPATCH
template <int M>
__attribute__((target("avx512f"))) void match_rows_avx512(
    const float* a_rows,
    int64_t C,
    const float* panels,
    int64_t first_panel,
    int64_t num_panels,
    const float* bias,
    float* score,
    int64_t* index) {
  match_rows_body<M, Avx512Dot>(a_rows, C, panels, first_panel, num_panels, bias, score, index);
}
#endif

// The row-tile kernels for 1..rows rows: table[m - 1] handles m rows.
struct MatchKernels {
  int rows;
  std::array<MatchRowsFn, kMaxRows> table;
};

template <int... Ms>
MatchKernels portable_kernels(std::integer_sequence<int, Ms...>) {
  return {kPortableRows, {&match_rows_portable<std::min(Ms + 1, kPortableRows)>...}};
}

#ifdef TOKCOMP_X86_DISPATCH
template <int... Ms>
MatchKernels avx512_kernels(std::integer_sequence<int, Ms...>) {
  return {kMaxRows, {&match_rows_avx512<Ms + 1>...}};
}
#endif

// AVX-512 kernels when the CPU has AVX-512F (checked once), the portable ones otherwise or when
// the environment sets TOKCOMP_CPU_AVX512=0 (to test or compare the portable path).
const MatchKernels& match_kernels() {
  static const MatchKernels kernels = [] {
#ifdef TOKCOMP_X86_DISPATCH
    const char* env = std::getenv("TOKCOMP_CPU_AVX512");
    const bool allowed = env == nullptr || std::string(env) != "0";
    if (allowed && __builtin_cpu_supports("avx512f")) {
      return avx512_kernels(std::make_integer_sequence<int, kMaxRows>{});
    }
#endif
    return portable_kernels(std::make_integer_sequence<int, kMaxRows>{});
  }();
  return kernels;
}

template <typename scalar_t>
void best_match_cpu_kernel(
    const at::Tensor& a,
    const at::Tensor& b,
    int64_t a_protected,
    int64_t b_protected,
    at::Tensor& score,
    at::Tensor& index) {
  const int64_t batch = a.size(0);
  const int64_t Na = a.size(1);
  const int64_t Nb = b.size(1);
  const int64_t C = a.size(2);
  const int64_t num_panels = (Nb + kLanes - 1) / kLanes;
  const int64_t first_panel = b_protected / kLanes;
  const int64_t active = Na - a_protected;

  // Split each batch element's rows so that small batches still keep every thread busy, but
  // give each task enough rows to amortise packing the panels.
  const int64_t threads = at::get_num_threads();
  int64_t splits = 1;
  if (batch < 4 * threads && active > 0) {
    const int64_t by_threads = (4 * threads + batch - 1) / batch;
    const int64_t by_rows = (active + kMinRowsPerTask - 1) / kMinRowsPerTask;
    splits = std::min(by_threads, by_rows);
    splits = std::max<int64_t>(splits, 1);
  }

  const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
  const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
  const int64_t a_batch = a.stride(0);
  const int64_t a_row = a.stride(1);
  const int64_t b_batch = b.stride(0);
  const int64_t b_row = b.stride(1);
  float* score_ptr = score.mutable_data_ptr<float>();
  int64_t* index_ptr = index.mutable_data_ptr<int64_t>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const MatchKernels& kernels = match_kernels();

  std::vector<float> bias(num_panels * kLanes);
  for (int64_t j = 0; j < num_panels * kLanes; ++j) {
    bias[j] = (j >= b_protected && j < Nb) ? 0.f : kNegInf;
  }

  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panels;
    std::vector<float> rows_buf;
    std::vector<float> a_buf(kMaxRows * C);
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / splits;
      const int64_t part = task % splits;
      float* sc = score_ptr + n * Na;
      int64_t* ix = index_ptr + n * Na;
      if (part == 0) {
        for (int64_t i = 0; i < a_protected; ++i) {
          sc[i] = kNegInf;
          ix[i] = 0;
        }
      }
      const int64_t lo = a_protected + active * part / splits;
      const int64_t hi = a_protected + active * (part + 1) / splits;
      if (lo >= hi) {
        continue;
      }
      if (packed != n) {
        if (panels.empty()) {
          panels.resize(num_panels * C * kLanes);
          rows_buf.resize(kLanes * C);
        }
        pack_panels(b_ptr + n * b_batch, Nb, C, b_row, first_panel, rows_buf.data(), panels.data());
        packed = n;
      }
      for (int64_t i0 = lo; i0 < hi; i0 += kernels.rows) {
        const int64_t m = std::min<int64_t>(kernels.rows, hi - i0);
        normalize_rows(a_ptr + n * a_batch + i0 * a_row, m, C, a_row, a_buf.data());
        kernels.table[m - 1](
            a_buf.data(), C, panels.data(), first_panel, num_panels, bias.data(), sc + i0, ix + i0);
      }
    }
  });
}

at::Tensor rows_with_unit_channel_stride(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> best_match_cpu(
    const at::Tensor& a_in,
    const at::Tensor& b_in,
    int64_t a_protected,
    int64_t b_protected) {
  check_best_match_inputs(a_in, b_in, a_protected, b_protected);
  TORCH_CHECK(
      b_in.size(1) < std::numeric_limits<int32_t>::max(),
      "tokcomp::best_match: set B has too many rows (",
      b_in.size(1),
      ")");
  // Rows may be strided (e.g. x[:, ::2] and x[:, 1::2]): only channels must be contiguous.
  const at::Tensor a = rows_with_unit_channel_stride(a_in);
  const at::Tensor b = rows_with_unit_channel_stride(b_in);
  at::Tensor score = at::empty({a.size(0), a.size(1)}, a.options().dtype(at::kFloat));
  at::Tensor index = at::empty({a.size(0), a.size(1)}, a.options().dtype(at::kLong));
  if (a.numel() == 0 && a.size(2) != 0) {
    return {score, index};
  }
  TOKCOMP_DISPATCH_FLOAT_TYPES(a.scalar_type(), "tokcomp::best_match (CPU)", [&] {
    best_match_cpu_kernel<scalar_t>(a, b, a_protected, b_protected, score, index);
  });
  return {score, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CPU, m) {
  m.impl("best_match", &best_match_cpu);
}

}  // namespace tokcomp

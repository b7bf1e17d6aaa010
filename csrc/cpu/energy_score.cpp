// CPU kernel of tokcomp::energy_score: E[b, i] = mean_j ELU(cos(m_i, m_j) - margin, alpha) over
// the T rows of metric[b] (PiToMe's energy), without forming the T x T similarity matrix.
//
// Per batch element the rows are normalised once (float32, divided by max(|row|, 1e-12) as
// F.normalize does) and also packed into channel-major panels of kLanes rows. The register-
// blocked micro-kernels of cosine_tiles.h compute a tile of rows x kLanes cosines at a time; the
// ELU (with a vectorised exp) is applied while the tile is in registers and summed into per-lane
// row totals, so nothing T x T is ever stored.
//
// Cosine similarity is symmetric: when there are at least as many batch elements as threads,
// each task owns a batch element and computes every pair once (the tiles on and above the
// diagonal), adding ELU(s_ij) to row i and, for j > i, to row j as well. With fewer batch
// elements than threads the rows of each element are split over tasks instead, and each task
// computes its rows against all T columns (twice the arithmetic, but every thread busy).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../ops.h"
#include "cosine_tiles.h"

namespace tokcomp {
namespace {

using cpu::kLanes;
using cpu::kMaxRows;

constexpr int64_t kMinRowsPerTask = 24;

TOKCOMP_ALWAYS_INLINE float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

TOKCOMP_ALWAYS_INLINE uint32_t float_to_bits(float value) {
  uint32_t out;
  std::memcpy(&out, &value, sizeof(out));
  return out;
}

// exp(x) for x <= 0 (clamped at -87, where it is 1.6e-38): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by Cephes' degree-6 polynomial, 2^n from the exponent bits; n comes out of the
// round-to-nearest shift 1.5 * 2^23. Within 1e-7 of the exact value, and exactly 1 at 0.
// Written without branches or selects on computed values, so loops over it vectorise.
TOKCOMP_ALWAYS_INLINE float exp_nonpositive(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23
  x = x < -87.0f ? -87.0f : x;
  const float shifted = __builtin_fmaf(x, 1.44269504088896341f, kShift);
  const float n = shifted - kShift;
  float r = __builtin_fmaf(n, -0.693359375f, x);
  r = __builtin_fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  const float poly = __builtin_fmaf(p * r, r, r) + 1.0f;
  const uint32_t exponent = (float_to_bits(shifted) - float_to_bits(kShift) + 127u) << 23;
  return poly * bits_to_float(exponent);
}

// ELU(x) = x for x > 0, alpha (exp(x) - 1) otherwise, as max(x, 0) + alpha (exp(min(x, 0)) - 1):
// the negative part comes from the sign bit, with no select on the result. A NaN (the cosine of
// a non-finite row) counts as -inf, as anything below -87 does: alpha (exp(-87) - 1) = -alpha.
TOKCOMP_ALWAYS_INLINE float elu(float x, float alpha) {
  x = x > -87.0f ? x : -87.0f;
  const uint32_t bits = float_to_bits(x);
  const uint32_t sign_mask = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  const float negative = bits_to_float(bits & sign_mask);
  return (x - negative) + alpha * (exp_nonpositive(negative) - 1.0f);
}

// Adds to total[row0 + i] (i < M) the terms ELU(cos(row i, column j) - margin) of the columns
// j < T in the panels from `first_panel` on; with `symmetric`, only those with j >= row0 + i,
// and each term with j > row0 + i is also added to total[j]. `rows` holds the M normalised rows.
struct EnergyRows {
  template <int M, typename Dot>
  static TOKCOMP_ALWAYS_INLINE void run(
      const float* rows,
      int64_t C,
      const float* panels,
      int64_t row0,
      int64_t T,
      bool symmetric,
      float margin,
      float alpha,
      float* total) {
    const int64_t num_panels = (T + kLanes - 1) / kLanes;
    const int64_t first_panel = symmetric ? row0 / kLanes : 0;
    float row_sum[M][kLanes];
    for (int i = 0; i < M; ++i) {
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        row_sum[i][l] = 0.f;
      }
    }
    // Fold one panel's cosines: interior panels (all columns valid, all on the counted side of
    // the diagonal) directly, edge panels through 0/1 masks built in a separate loop.
    auto fold = [&](const float (&acc)[kMaxRows][kLanes], int64_t p) {
      const int64_t j0 = p * kLanes;
      float col_sum[kLanes];
#pragma omp simd
      for (int64_t l = 0; l < kLanes; ++l) {
        col_sum[l] = 0.f;
      }
      const bool interior = j0 + kLanes <= T && (!symmetric || j0 >= row0 + M);
      for (int i = 0; i < M; ++i) {
        if (interior) {
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            const float e = elu(acc[i][l] - margin, alpha);
            row_sum[i][l] += e;
            col_sum[l] += e;
          }
        } else {
          const int64_t row = row0 + i;
          float row_mask[kLanes];
          float col_mask[kLanes];
          for (int64_t l = 0; l < kLanes; ++l) {
            const int64_t j = j0 + l;
            row_mask[l] = (j < T && (!symmetric || j >= row)) ? 1.f : 0.f;
            col_mask[l] = (j < T && j > row) ? 1.f : 0.f;
          }
#pragma omp simd
          for (int64_t l = 0; l < kLanes; ++l) {
            const float e = elu(acc[i][l] - margin, alpha);
            row_sum[i][l] += e * row_mask[l];
            col_sum[l] += e * col_mask[l];
          }
        }
      }
      if (symmetric) {
        for (int64_t l = 0; l < kLanes && j0 + l < T; ++l) {
          total[j0 + l] += col_sum[l];
        }
      }
    };
    cpu::for_each_panel<M, Dot>(rows, C, panels, first_panel, num_panels, fold);
    for (int i = 0; i < M; ++i) {
      float sum = 0.f;
      for (int64_t l = 0; l < kLanes; ++l) {
        sum += row_sum[i][l];
      }
      total[row0 + i] += sum;
    }
  }
};

using EnergyKernels = cpu::RowKernels<
    EnergyRows,
    const float*,
    int64_t,
    const float*,
    int64_t,
    int64_t,
    bool,
    float,
    float,
    float*>;

template <typename scalar_t>
void energy_score_cpu_kernel(const at::Tensor& metric, float margin, float alpha, at::Tensor& out) {
  const int64_t batch = metric.size(0);
  const int64_t T = metric.size(1);
  const int64_t C = metric.size(2);
  const int64_t num_panels = (T + kLanes - 1) / kLanes;
  const int64_t threads = at::get_num_threads();
  const bool symmetric = batch >= threads;
  const int64_t by_threads = (4 * threads + batch - 1) / batch;
  const int64_t by_rows = (T + kMinRowsPerTask - 1) / kMinRowsPerTask;
  const int64_t splits = symmetric ? 1 : std::clamp<int64_t>(std::min(by_threads, by_rows), 1, T);
  const scalar_t* src = metric.const_data_ptr<scalar_t>();
  const int64_t batch_stride = metric.stride(0);
  const int64_t row_stride = metric.stride(1);
  float* out_ptr = out.mutable_data_ptr<float>();
  const EnergyKernels& kernels = EnergyKernels::get();

  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(T * C);
    std::vector<float> panels(num_panels * C * kLanes);
    std::vector<float> total(num_panels * kLanes);
    int64_t packed = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / splits;
      const int64_t part = task % splits;
      const int64_t lo = T * part / splits;
      const int64_t hi = T * (part + 1) / splits;
      if (packed != n) {
        cpu::normalize_rows(src + n * batch_stride, T, C, row_stride, rows.data());
        for (int64_t p = 0; p < num_panels; ++p) {
          const int64_t count = std::min(kLanes, T - p * kLanes);
          cpu::to_panel(rows.data() + p * kLanes * C, count, C, panels.data() + p * C * kLanes);
        }
        packed = n;
      }
      std::fill(total.begin(), total.end(), 0.f);
      for (int64_t i0 = lo; i0 < hi; i0 += kernels.rows) {
        const int64_t m = std::min<int64_t>(kernels.rows, hi - i0);
        kernels.table[m - 1](
            rows.data() + i0 * C, C, panels.data(), i0, T, symmetric, margin, alpha, total.data());
      }
      const float inv_count = 1.f / static_cast<float>(T);
      for (int64_t i = lo; i < hi; ++i) {
        out_ptr[n * T + i] = total[i] * inv_count;
      }
    }
  });
}

at::Tensor energy_score_cpu(const at::Tensor& metric_in, double margin, double alpha) {
  check_energy_score_inputs(metric_in);
  const at::Tensor metric = cpu::rows_with_unit_channel_stride(metric_in);
  at::Tensor out = at::empty({metric.size(0), metric.size(1)}, metric.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    return out;
  }
  TOKCOMP_DISPATCH_FLOAT_TYPES(metric.scalar_type(), "tokcomp::energy_score (CPU)", [&] {
    energy_score_cpu_kernel<scalar_t>(
        metric, static_cast<float>(margin), static_cast<float>(alpha), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(tokcomp, CPU, m) {
  m.impl("energy_score", &energy_score_cpu);
}

}  // namespace tokcomp

// CPU kernel of tokcomp::best_match: for every row of a, the best cosine score over the rows of
// b and its index (first index on ties, like torch.max).
//
// Layout of the computation, per batch element:
//   * the rows of b are normalised once (float32, divided by max(|row|, 1e-12) as F.normalize
//     does) and packed into panels of kLanes rows stored channel-major, so the inner loop reads
//     kLanes consecutive floats per channel;
//   * the rows of a are normalised a tile at a time into a small buffer, and a register-blocked
//     micro-kernel (cosine_tiles.h) computes the rows x kLanes dot products of a row tile against
//     a panel with one broadcast and kLanes-wide fused multiply-adds per channel: 6-row tiles
//     (portable, AVX2) or 8-row tiles against two panels at once (AVX-512, chosen at run time);
//   * a running per-lane maximum (value and index) is kept per row, reduced across lanes at the
//     end; protected and padding columns get a -inf bias so they are never chosen.
// Work is split over batch x row ranges with at::parallel_for (OpenMP), so one image also uses
// every thread; each task packs the panels of its batch element once and reuses them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "../ops.h"
#include "cosine_tiles.h"

namespace tokcomp {
namespace {

using cpu::kLanes;
using cpu::kMaxRows;
using cpu::normalize_rows;
using cpu::pack_panels;
using cpu::rows_with_unit_channel_stride;

constexpr int64_t kMinRowsPerTask = 24;

// Best score and index over panels [first_panel, num_panels) for M normalised rows of a.
struct MatchRows {
  template <int M, typename Dot>
  static TOKCOMP_ALWAYS_INLINE void run(
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
    cpu::for_each_panel<M, Dot>(a_rows, C, panels, first_panel, num_panels, update);
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
};

using MatchKernels = cpu::RowKernels<
    MatchRows,
    const float*,
    int64_t,
    const float*,
    int64_t,
    int64_t,
    const float*,
    float*,
    int64_t*>;

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
  const MatchKernels& kernels = MatchKernels::get();

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
  // Nothing to compute without rows of a. (Not a.numel() == 0: with C == 0 the rows still get
  // scores, and an empty batch must return here, the row splitting divides by it.)
  if (a.size(0) == 0 || a.size(1) == 0) {
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

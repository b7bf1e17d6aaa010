"""tokcomp's CUDA kernels compiled at run time by NVRTC through cupy: the route for CUDA tensors
when `tokcomp._C` was built without CUDA (no nvcc at install time). `pip install tokcomp[cupy]`.

Each op is a torch custom op `torch.ops.tokcomp_cupy.<name>` with the schema of the compiled
`torch.ops.tokcomp.<name>` and the same fake kernels (`tokcomp.ops._fake`), so it traces under
torch.compile. cupy is imported only inside the ops and `available()`, i.e. only for CUDA
tensors: importing this module never needs cupy nor a GPU. Tensors cross over zero-copy through
DLPack (`cupy.from_dlpack`; 16-bit floats as int16 views, since cupy has no bfloat16) and the
kernels run on torch's current stream, so they are ordered with torch's own work. torch
allocates every output.

The kernel source is the string `SOURCE` below rather than a file under csrc/: this route is for
installs without a CUDA toolchain, typically from a wheel, and csrc/ is not part of the installed
package; a module string ships with the package as is (no package data) and is what the NVRTC
syntax check in tests/test_cuda_sources_compile.py compiles. It includes no headers (16-bit
floats are converted with bit operations and PTX), so NVRTC needs no include paths. The
algorithms are those of the nvcc kernels in csrc/cuda/ (same tiling, same reduction orders for
the exact ops), held to the same references by tests/test_ops_parity.py.
"""

import importlib
import warnings
from functools import cache
from typing import Any

import torch

from tokcomp.ops import _fake

SOURCE = r"""
typedef long long i64;
struct tc_half { unsigned short bits; };
struct tc_bf16 { unsigned short bits; };

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(tc_half v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
  return f;
}
__device__ __forceinline__ float to_float(tc_bf16 v) {
  return __uint_as_float(((unsigned int)v.bits) << 16);
}

__device__ __forceinline__ void store(float* out, float v) { *out = v; }
__device__ __forceinline__ void store(tc_half* out, float v) {
  unsigned short bits;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(v));
  out->bits = bits;
}
__device__ __forceinline__ void store(tc_bf16* out, float v) {  // round to nearest even
  const unsigned int u = __float_as_uint(v);
  const unsigned int rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  out->bits = v != v ? (unsigned short)0x7FC0 : (unsigned short)rounded;
}

// ---- cosine tiles (best_match, energy_score): 16 x 16 threads, each kRowsA x kColsB dots ----
#define SIDE 16
#define ROWS_A 2
#define COLS_B 4
#define TILE_A (SIDE * ROWS_A)
#define TILE_B (SIDE * COLS_B)
#define TILE_C 32
#define TILE_THREADS (SIDE * SIDE)

struct Tiles {
  float a[TILE_C][TILE_A + 1];
  float b[TILE_C][TILE_B + 1];
};

// inv[row] = 1 / max(|x[row, :]|, 1e-12), one warp per row.
template <typename T>
__global__ void inverse_norms(const T* __restrict__ x, float* __restrict__ inv, i64 rows, i64 C) {
  const i64 row = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float sum_sq = 0.f;
  for (i64 c = lane; c < C; c += 32) {
    const float v = to_float(x[row * C + c]);
    sum_sq += v * v;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    sum_sq += __shfl_xor_sync(0xffffffffu, sum_sq, offset);
  }
  if (lane == 0) inv[row] = 1.f / fmaxf(sqrtf(sum_sq), 1e-12f);
}

// acc[ka][kb] = dot(an row i0 + ty + SIDE ka, bn row j0 + tx + SIDE kb); all threads must call.
template <typename T>
__device__ __forceinline__ void tile_dots(
    const T* __restrict__ an, i64 Na, const T* __restrict__ bn, i64 Nb, i64 C, i64 i0, i64 j0,
    Tiles& tiles, float (&acc)[ROWS_A][COLS_B]) {
  const int tid = threadIdx.x, tx = tid % SIDE, ty = tid / SIDE;
  for (int ka = 0; ka < ROWS_A; ++ka)
    for (int kb = 0; kb < COLS_B; ++kb) acc[ka][kb] = 0.f;
  for (i64 c0 = 0; c0 < C; c0 += TILE_C) {
    for (int e = tid; e < TILE_A * TILE_C; e += TILE_THREADS) {
      const int r = e / TILE_C, c = e % TILE_C;
      const i64 gi = i0 + r, gc = c0 + c;
      tiles.a[c][r] = (gi < Na && gc < C) ? to_float(an[gi * C + gc]) : 0.f;
    }
    for (int e = tid; e < TILE_B * TILE_C; e += TILE_THREADS) {
      const int r = e / TILE_C, c = e % TILE_C;
      const i64 gj = j0 + r, gc = c0 + c;
      tiles.b[c][r] = (gj < Nb && gc < C) ? to_float(bn[gj * C + gc]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < TILE_C; ++c) {
      float av[ROWS_A], bv[COLS_B];
#pragma unroll
      for (int ka = 0; ka < ROWS_A; ++ka) av[ka] = tiles.a[c][ty + SIDE * ka];
#pragma unroll
      for (int kb = 0; kb < COLS_B; ++kb) bv[kb] = tiles.b[c][tx + SIDE * kb];
#pragma unroll
      for (int ka = 0; ka < ROWS_A; ++ka)
#pragma unroll
        for (int kb = 0; kb < COLS_B; ++kb) acc[ka][kb] = fmaf(av[ka], bv[kb], acc[ka][kb]);
    }
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(TILE_THREADS) best_match(
    const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ inv_a,
    const float* __restrict__ inv_b, float* __restrict__ score, i64* __restrict__ index, i64 Na,
    i64 Nb, i64 C, i64 a_protected, i64 b_protected, i64 tiles_a) {
  __shared__ Tiles tiles;
  const i64 n = blockIdx.x / tiles_a, i0 = (blockIdx.x % tiles_a) * TILE_A;
  const int tx = threadIdx.x % SIDE, ty = threadIdx.x / SIDE;
  float best[ROWS_A], inv_row[ROWS_A];
  i64 arg[ROWS_A];
  for (int ka = 0; ka < ROWS_A; ++ka) {
    const i64 i = i0 + ty + SIDE * ka;
    best[ka] = NEG_INF;
    arg[ka] = 0;
    inv_row[ka] = i < Na ? inv_a[n * Na + i] : 0.f;
  }
  const i64 j_begin = i0 + TILE_A > a_protected ? (b_protected / TILE_B) * TILE_B : Nb;
  for (i64 j0 = j_begin; j0 < Nb; j0 += TILE_B) {
    float acc[ROWS_A][COLS_B];
    tile_dots(a + n * Na * C, Na, b + n * Nb * C, Nb, C, i0, j0, tiles, acc);
    for (int kb = 0; kb < COLS_B; ++kb) {  // increasing columns, strict >: first index wins
      const i64 j = j0 + tx + SIDE * kb;
      if (j >= b_protected && j < Nb) {
        const float inv_col = inv_b[n * Nb + j];
        for (int ka = 0; ka < ROWS_A; ++ka) {
          const float s = acc[ka][kb] * inv_row[ka] * inv_col;
          if (s > best[ka]) { best[ka] = s; arg[ka] = j; }
        }
      }
    }
  }
  for (int ka = 0; ka < ROWS_A; ++ka) {
    float v = best[ka];
    i64 j = arg[ka];
    for (int offset = SIDE / 2; offset > 0; offset /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, offset, SIDE);
      const i64 oj = __shfl_xor_sync(0xffffffffu, j, offset, SIDE);
      if (ov > v || (ov == v && oj < j)) { v = ov; j = oj; }
    }
    const i64 i = i0 + ty + SIDE * ka;
    if (tx == 0 && i < Na) {
      const bool protected_row = i < a_protected;
      score[n * Na + i] = protected_row ? NEG_INF : v;
      index[n * Na + i] = (protected_row || v == NEG_INF) ? 0 : j;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(TILE_THREADS) energy_score(
    const T* __restrict__ x, const float* __restrict__ inv_norm, float* __restrict__ energy, i64 N,
    i64 C, float margin, float alpha, i64 tiles_per_batch) {
  __shared__ Tiles tiles;
  const i64 n = blockIdx.x / tiles_per_batch, i0 = (blockIdx.x % tiles_per_batch) * TILE_A;
  const int tx = threadIdx.x % SIDE, ty = threadIdx.x / SIDE;
  const T* xn = x + n * N * C;
  const float* inv = inv_norm + n * N;
  float sum[ROWS_A], inv_row[ROWS_A];
  for (int ka = 0; ka < ROWS_A; ++ka) {
    const i64 i = i0 + ty + SIDE * ka;
    sum[ka] = 0.f;
    inv_row[ka] = i < N ? inv[i] : 0.f;
  }
  for (i64 j0 = 0; j0 < N; j0 += TILE_B) {
    float acc[ROWS_A][COLS_B];
    tile_dots(xn, N, xn, N, C, i0, j0, tiles, acc);
    for (int kb = 0; kb < COLS_B; ++kb) {
      const i64 j = j0 + tx + SIDE * kb;
      if (j < N) {
        const float inv_col = inv[j];
        for (int ka = 0; ka < ROWS_A; ++ka) {
          const float v = acc[ka][kb] * inv_row[ka] * inv_col - margin;
          sum[ka] += v > 0.f ? v : alpha * (expf(v) - 1.f);
        }
      }
    }
  }
  for (int ka = 0; ka < ROWS_A; ++ka) {
    float v = sum[ka];
    for (int offset = SIDE / 2; offset > 0; offset /= 2) {
      v += __shfl_xor_sync(0xffffffffu, v, offset, SIDE);
    }
    const i64 i = i0 + ty + SIDE * ka;
    if (tx == 0 && i < N) energy[n * N + i] = v / (float)N;
  }
}

// ---- weighted_merge: one block per output row; its sources come grouped by destination ------
// (sources[b, starts[b, j] .. starts[b, j + 1]) in increasing r), each thread owns channels.
template <typename T>
__global__ void weighted_merge(
    const T* __restrict__ x, const float* __restrict__ weight, const float* __restrict__ size,
    const i64* __restrict__ keep_idx, const i64* __restrict__ sources,
    const i64* __restrict__ starts, T* __restrict__ out, float* __restrict__ out_size, i64 N, i64 C,
    i64 K, i64 R) {
  const i64 n = blockIdx.x / K, j = blockIdx.x % K;
  const T* xn = x + n * N * C;
  const float* w = weight + n * N;
  const i64* src = sources + n * R;
  const i64 k = keep_idx[n * K + j];
  const i64 lo = starts[n * (K + 1) + j], hi = starts[n * (K + 1) + j + 1];
  float norm = w[k];
  for (i64 e = lo; e < hi; ++e) norm += w[src[e]];
  for (i64 c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = w[k] * to_float(xn[k * C + c]);
    for (i64 e = lo; e < hi; ++e) acc += w[src[e]] * to_float(xn[src[e] * C + c]);
    store(out + (n * K + j) * C + c, acc / norm);
  }
  if (threadIdx.x == 0) {
    float total = size[n * N + k];
    for (i64 e = lo; e < hi; ++e) total += size[n * N + src[e]];
    out_size[n * K + j] = total;
  }
}

// ---- attention_pagerank: one block per matrix, s in shared memory, the matrix too if CACHED --
template <typename T, bool CACHED>
__global__ void __launch_bounds__(1024) attention_pagerank(
    const T* __restrict__ attn, float* __restrict__ out, i64 N, i64 iterations, float start) {
  extern __shared__ float shared[];
  float* s = shared;
  float* next = shared + N;
  const T* a = attn + (i64)blockIdx.x * N * N;
  if (CACHED) {
    T* cache = (T*)(shared + 2 * N);
    for (i64 e = threadIdx.x; e < N * N; e += blockDim.x) cache[e] = a[e];
    a = cache;
  }
  for (i64 j = threadIdx.x; j < N; j += blockDim.x) s[j] = start;
  __syncthreads();
  for (i64 it = 0; it < iterations; ++it) {
    for (i64 j = threadIdx.x; j < N; j += blockDim.x) {
      float acc = 0.f;
      for (i64 i = 0; i < N; ++i) acc = fmaf(s[i], to_float(a[i * N + j]), acc);
      next[j] = acc;
    }
    __syncthreads();
    float* done = next;
    next = s;
    s = done;
  }
  for (i64 j = threadIdx.x; j < N; j += blockDim.x) out[(i64)blockIdx.x * N + j] = s[j];
}

// ---- greedy_maxmin: one block per batch element, thread t owns score[t + blockDim * m] ------
__device__ __forceinline__ void keep_better(float& value, i64& index, float v, i64 j) {
  if (v > value || (v == value && j < index)) { value = v; index = j; }
}

template <typename T>
__global__ void __launch_bounds__(1024) greedy_maxmin(
    const T* __restrict__ dist, const float* __restrict__ weight, const i64* __restrict__ first,
    float* __restrict__ scratch, i64* __restrict__ out, i64 N, i64 k) {
  __shared__ float warp_value[32];
  __shared__ i64 warp_index[32];
  __shared__ i64 chosen;
  const i64 n = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = (blockDim.x + 31) / 32;
  const T* d = dist + n * N * N;
  const float* w = weight + n * N;
  float* score = scratch + n * N;
  i64 pick = first[n];
  for (i64 j = tid; j < N; j += blockDim.x) score[j] = to_float(d[pick * N + j]) * w[j];
  if (tid == 0) out[n * k] = pick;
  for (i64 t = 1; t < k; ++t) {
    const T* row = t > 1 ? d + pick * N : 0;  // step 1 starts from the scores of `first` alone
    float best = NEG_INF;
    i64 arg = N;
    for (i64 j = tid; j < N; j += blockDim.x) {
      float v = NEG_INF;
      if (j != pick) {
        v = score[j];
        if (row) {
          const float u = to_float(row[j]) * w[j];
          v = u < v ? u : v;
        }
      }
      score[j] = v;
      keep_better(best, arg, v, j);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      const float ov = __shfl_xor_sync(0xffffffffu, best, offset);
      const i64 oj = __shfl_xor_sync(0xffffffffu, arg, offset);
      keep_better(best, arg, ov, oj);
    }
    if (lane == 0) { warp_value[warp] = best; warp_index[warp] = arg; }
    __syncthreads();
    if (tid == 0) {
      float value = warp_value[0];
      i64 index = warp_index[0];
      for (int other = 1; other < warps; ++other) {
        keep_better(value, index, warp_value[other], warp_index[other]);
      }
      chosen = index;
      out[n * k + t] = index;
    }
    __syncthreads();
    pick = chosen;
  }
}
"""

#: C++ type of each supported torch dtype in SOURCE.
TYPE_NAMES = {torch.float32: "float", torch.float16: "tc_half", torch.bfloat16: "tc_bf16"}
_TEMPLATES = ("inverse_norms", "best_match", "energy_score", "weighted_merge", "greedy_maxmin")
#: Every kernel instantiation SOURCE is compiled with (NVRTC name expressions).
NAME_EXPRESSIONS = tuple(
    [f"{kernel}<{type_name}>" for kernel in _TEMPLATES for type_name in TYPE_NAMES.values()]
    + [
        f"attention_pagerank<{type_name}, {cached}>"
        for type_name in TYPE_NAMES.values()
        for cached in ("true", "false")
    ]
)
#: NVRTC options; the architecture comes from cupy (the current device).
OPTIONS = ("--std=c++17",)

_TILE_A, _TILE_THREADS = 32, 256  # TILE_A, TILE_THREADS in SOURCE


def _cupy() -> Any:
    return importlib.import_module("cupy")


@cache
def _module() -> Any:
    return _cupy().RawModule(code=SOURCE, options=OPTIONS, name_expressions=NAME_EXPRESSIONS)


@cache
def available() -> bool:
    """Whether cupy imports, sees a GPU and compiles the kernels here (warning once with the
    reason when cupy is installed but unusable)."""
    try:
        cupy = _cupy()
    except ImportError:
        return False
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return False
        with cupy.cuda.Device(torch.cuda.current_device()):
            _module().get_function(NAME_EXPRESSIONS[0])  # compiles (or loads from cupy's cache)
    except Exception as err:  # cupy raises CUDA runtime, driver and compiler errors of its own
        warnings.warn(
            f"cupy {cupy.__version__} is installed but cannot run tokcomp's kernels ({err}); "
            "CUDA tensors use the PyTorch reference ops",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def _array(tensor: torch.Tensor) -> Any:
    """A zero-copy cupy view of a contiguous tensor (16-bit floats as int16: same bits)."""
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.view(torch.int16)
    return _cupy().from_dlpack(tensor)


def _launch(
    kernel: str,
    device: torch.device,
    grid: int,
    block: int,
    args: tuple,
    shared_mem: int = 0,
) -> None:
    """Run SOURCE's `kernel` (a name expression) on torch's current stream of `device`."""
    cupy = _cupy()
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        function = _module().get_function(kernel)
        if shared_mem > 48 * 1024:  # above the default limit: opt in
            function.max_dynamic_shared_size_bytes = shared_mem
        values = tuple(_kernel_arg(value) for value in args)
        function((grid,), (block,), values, shared_mem=shared_mem)


def _kernel_arg(value: torch.Tensor | float | int) -> Any:
    """A kernel argument: a tensor as its device pointer (a cupy view; null when empty, never
    read then), a float as float32, an int as int64."""
    import numpy

    if isinstance(value, torch.Tensor):
        return _array(value) if value.numel() else numpy.uint64(0)
    return numpy.float32(value) if isinstance(value, float) else numpy.int64(value)


def _check(op: str, *tensors: torch.Tensor) -> torch.device:
    """The common device of `tensors`, which must be CUDA tensors."""
    device = tensors[0].device
    if device.type != "cuda" or any(t.device != device for t in tensors):
        raise ValueError(f"tokcomp_cupy::{op}: inputs must be CUDA tensors on one device")
    return device


def _type_name(op: str, tensor: torch.Tensor) -> str:
    if tensor.dtype not in TYPE_NAMES:
        raise TypeError(
            f"tokcomp_cupy::{op}: dtype must be float32, bfloat16 or float16, got {tensor.dtype}"
        )
    return TYPE_NAMES[tensor.dtype]


def _inverse_norms(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """1 / max(|row|, 1e-12) of every row of the contiguous (B, N, C) x, float32 (B, N)."""
    inv = torch.empty(x.shape[:2], device=x.device, dtype=torch.float32)
    rows = x.shape[0] * x.shape[1]
    blocks = (rows * 32 + _TILE_THREADS - 1) // _TILE_THREADS
    args = (x, inv, rows, x.shape[2])
    _launch(f"inverse_norms<{type_name}>", x.device, blocks, _TILE_THREADS, args)
    return inv


@torch.library.custom_op("tokcomp_cupy::best_match", mutates_args=(), device_types="cuda")
def best_match(
    a: torch.Tensor, b: torch.Tensor, a_protected: int, b_protected: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokcomp::best_match through cupy (best cosine score and index over b for every row of a)."""
    device = _check("best_match", a, b)
    type_name = _type_name("best_match", a)
    if b.dtype != a.dtype:
        raise TypeError(f"tokcomp_cupy::best_match: a and b dtypes differ ({a.dtype}, {b.dtype})")
    a, b = a.contiguous(), b.contiguous()
    (batch, rows_a, channels), rows_b = a.shape, b.shape[1]
    score = torch.empty(batch, rows_a, device=device, dtype=torch.float32)
    index = torch.empty(batch, rows_a, device=device, dtype=torch.int64)
    if score.numel() == 0:
        return score, index
    inv_a, inv_b = _inverse_norms(a, type_name), _inverse_norms(b, type_name)
    tiles = (rows_a + _TILE_A - 1) // _TILE_A
    args = (a, b, inv_a, inv_b, score, index, rows_a, rows_b, channels, a_protected, b_protected)
    _launch(f"best_match<{type_name}>", device, batch * tiles, _TILE_THREADS, (*args, tiles))
    return score, index


@torch.library.custom_op("tokcomp_cupy::weighted_merge", mutates_args=(), device_types="cuda")
def weighted_merge(
    x: torch.Tensor,
    weight: torch.Tensor,
    size: torch.Tensor,
    keep_idx: torch.Tensor,
    src_idx: torch.Tensor,
    dst_pos: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokcomp::weighted_merge through cupy; the sources of each output row are grouped by a
    stable sort of dst_pos, so each row sums them in increasing r."""
    device = _check("weighted_merge", x, weight, size, keep_idx, src_idx, dst_pos)
    type_name = _type_name("weighted_merge", x)
    (batch, tokens, channels), kept, sources = x.shape, keep_idx.shape[1], src_idx.shape[1]
    out = torch.empty(batch, kept, channels, device=device, dtype=x.dtype)
    out_size = torch.empty(batch, kept, device=device, dtype=torch.float32)
    if out_size.numel() == 0:
        return out, out_size
    sorted_dst, order = dst_pos.sort(dim=1, stable=True)
    grouped = src_idx.gather(1, order).contiguous()
    bounds = torch.arange(kept + 1, device=device).expand(batch, -1).contiguous()
    starts = torch.searchsorted(sorted_dst.contiguous(), bounds)
    block = min(256, max(32, (channels + 31) // 32 * 32))
    args = (
        x.contiguous(),
        weight.float().contiguous(),
        size.float().contiguous(),
        keep_idx.contiguous(),
        grouped,
        starts,
        out,
        out_size,
        tokens,
        channels,
        kept,
        sources,
    )
    _launch(f"weighted_merge<{type_name}>", device, batch * kept, block, args)
    return out, out_size


@torch.library.custom_op("tokcomp_cupy::energy_score", mutates_args=(), device_types="cuda")
def energy_score(metric: torch.Tensor, margin: float, alpha: float) -> torch.Tensor:
    """tokcomp::energy_score through cupy (mean ELU of cosine minus margin, per row)."""
    device = _check("energy_score", metric)
    type_name = _type_name("energy_score", metric)
    metric = metric.contiguous()
    batch, tokens, channels = metric.shape
    energy = torch.empty(batch, tokens, device=device, dtype=torch.float32)
    if energy.numel() == 0:
        return energy
    inv = _inverse_norms(metric, type_name)
    tiles = (tokens + _TILE_A - 1) // _TILE_A
    args = (metric, inv, energy, tokens, channels, float(margin), float(alpha), tiles)
    _launch(f"energy_score<{type_name}>", device, batch * tiles, _TILE_THREADS, args)
    return energy


@torch.library.custom_op("tokcomp_cupy::attention_pagerank", mutates_args=(), device_types="cuda")
def attention_pagerank(attn: torch.Tensor, iterations: int) -> torch.Tensor:
    """tokcomp::attention_pagerank through cupy (s <- A^T s from 1/N, per attention matrix)."""
    device = _check("attention_pagerank", attn)
    type_name = _type_name("attention_pagerank", attn)
    attn = attn.contiguous()
    batch, heads, tokens = attn.shape[:3]
    out = torch.empty(batch, heads, tokens, device=device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    vectors = 2 * tokens * 4
    cached = vectors + tokens * tokens * attn.element_size()
    limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    use_cache = iterations > 1 and cached <= limit
    kernel = f"attention_pagerank<{type_name}, {'true' if use_cache else 'false'}>"
    block = min(1024, max(32, (tokens + 31) // 32 * 32))
    args = (attn, out, tokens, iterations, float(1.0 / tokens))
    _launch(kernel, device, batch * heads, block, args, cached if use_cache else vectors)
    return out


@torch.library.custom_op("tokcomp_cupy::greedy_maxmin", mutates_args=(), device_types="cuda")
def greedy_maxmin(
    dist: torch.Tensor, weight: torch.Tensor, first: torch.Tensor, k: int
) -> torch.Tensor:
    """tokcomp::greedy_maxmin through cupy (greedy weighted max-min picks, tokcomp.ops.maxmin)."""
    device = _check("greedy_maxmin", dist, weight, first)
    type_name = _type_name("greedy_maxmin", dist)
    batch, tokens = dist.shape[:2]
    out = torch.empty(batch, k, device=device, dtype=torch.int64)
    if batch == 0:
        return out
    weight = weight.float().contiguous()
    scratch = torch.empty(batch, tokens, device=device, dtype=torch.float32)
    block = min(1024, max(32, (tokens + 31) // 32 * 32))
    args = (dist.contiguous(), weight, first.long().contiguous(), scratch, out, tokens, k)
    _launch(f"greedy_maxmin<{type_name}>", device, batch, block, args)
    return out


_fake.register("tokcomp_cupy")

"""tokcomp's CUDA kernels compiled at run time by NVRTC through cupy: the route for CUDA tensors
when `tokcomp._C` was built without CUDA (no nvcc at install time). `pip install tokcomp[cupy]`.

Each op is a torch custom op `torch.ops.tokcomp_cupy.<name>` with the schema of the compiled
`torch.ops.tokcomp.<name>` and the same fake kernels (`tokcomp.ops._fake`), so it traces under
torch.compile. cupy is imported only inside the ops and `available()`, i.e. only for CUDA
tensors: importing this module never needs cupy nor a GPU. Tensors cross over zero-copy through
DLPack (`cupy.from_dlpack`; 16-bit floats as int16 views, since cupy has no bfloat16) and the
kernels run on torch's current stream, so they are ordered with torch's own work. torch
allocates every output.

The kernels are the nvcc build's own: the device code of every op lives in csrc/cuda/*.cuh,
which the extension's csrc/cuda/*.cu wrap for nvcc and which NVRTC compiles here (common.cuh
swaps torch's 16-bit types for bit patterns under NVRTC), so a fix lands once. An installed
wheel carries those headers as package data (tokcomp/csrc/cuda/, see setup.py); a source
checkout reads them from csrc/cuda/. This module launches them with the same geometry as the
.cu wrappers, reading the constants it needs from the headers.
"""

import hashlib
import importlib
import re
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch

from tokcomp.ops import _fake

#: The kernel headers compiled into the NVRTC program (each includes what it needs).
KERNEL_HEADERS = (
    "best_match.cuh",
    "energy_score.cuh",
    "weighted_merge.cuh",
    "attention_pagerank.cuh",
    "greedy_maxmin.cuh",
    "greedy_dpp.cuh",
)
#: C++ storage type of each supported torch dtype in the NVRTC build of the headers.
TYPE_NAMES = {
    torch.float32: "float",
    torch.float16: "tokcomp::gpu::Half",
    torch.bfloat16: "tokcomp::gpu::BFloat16",
}
_TEMPLATES = (
    "inverse_norms",
    "best_match",
    "energy_score",
    "weighted_merge",
    "greedy_maxmin",
    "greedy_dpp",
)


def _kernel(name: str, *template_args: str) -> str:
    """The name expression of kernel `name` instantiated with `template_args`."""
    return f"tokcomp::gpu::{name}_kernel<{', '.join(template_args)}>"


#: Every kernel instantiation the program is compiled with (NVRTC name expressions).
NAME_EXPRESSIONS = tuple(
    [_kernel(kernel, name) for kernel in _TEMPLATES for name in TYPE_NAMES.values()]
    + [
        _kernel("attention_pagerank", name, cached)
        for name in TYPE_NAMES.values()
        for cached in ("true", "false")
    ]
)
_PACKAGE = Path(__file__).resolve().parents[1]
#: Where the kernel headers are: in the installed package, else in the source checkout.
KERNEL_DIRS = (_PACKAGE / "csrc" / "cuda", _PACKAGE.parent / "csrc" / "cuda")
_CONSTANT = re.compile(r"constexpr\s+(?:int|int64_t)\s+(k\w+)\s*=\s*([\w\s*/]+?);")


def kernel_dir() -> Path:
    """The folder of the CUDA kernel headers (csrc/cuda)."""
    for folder in KERNEL_DIRS:
        if (folder / "common.cuh").is_file():
            return folder
    looked = " and ".join(map(str, KERNEL_DIRS))
    raise FileNotFoundError(
        f"tokcomp's CUDA kernel headers are missing (looked in {looked}): reinstall tokcomp "
        "from a wheel or checkout that has them (csrc/cuda/*.cuh)"
    )


def source() -> str:
    """The NVRTC program: the kernel headers, and their digest so that cupy's compile cache
    (keyed on this text, not on included files) never serves kernels of older headers."""
    folder = kernel_dir()
    digest = hashlib.sha256()
    for header in sorted(folder.glob("*.cuh")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    includes = "".join(f'#include "{name}"\n' for name in KERNEL_HEADERS)
    return f"// kernel headers sha256 {digest.hexdigest()}\n{includes}"


def options() -> tuple[str, ...]:
    """NVRTC options (the architecture comes from cupy: the current device's)."""
    return ("--std=c++17", f"-I{kernel_dir()}")


@cache
def constants() -> dict[str, int]:
    """The integer constants (`constexpr int kName = ...;`) of the kernel headers: the launch
    geometry the kernels were written for, as the .cu wrappers use it."""
    values: dict[str, int] = {}
    for header in ("cosine_tiles.cuh", *KERNEL_HEADERS):
        for name, expression in _CONSTANT.findall((kernel_dir() / header).read_text()):
            values[name] = _evaluate(expression, values)
    return values


def _evaluate(expression: str, values: dict[str, int]) -> int:
    """An integer product or quotient of literals and earlier constants ("kSide * kRowsA")."""
    tokens = re.findall(r"\w+|[*/]", expression)
    result = _operand(tokens[0], values)
    for operator, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        value = _operand(operand, values)
        result = result * value if operator == "*" else result // value
    return result


def _operand(token: str, values: dict[str, int]) -> int:
    return int(token) if token.isdigit() else values[token]


def _cupy() -> Any:
    return importlib.import_module("cupy")


@cache
def _module() -> Any:
    return _cupy().RawModule(code=source(), options=options(), name_expressions=NAME_EXPRESSIONS)


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
    """A zero-copy cupy view of a contiguous tensor (16-bit floats as int16: same bits).
    Detached: DLPack refuses a tensor that requires grad, and the ops' outputs take none."""
    tensor = tensor.detach()
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
    """Run `kernel` (a name expression) on torch's current stream of `device`."""
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
    threads = constants()["kNormThreads"]
    blocks = -(-rows // (threads // 32))  # one warp per row
    args = (x, inv, rows, x.shape[2])
    _launch(_kernel("inverse_norms", type_name), x.device, blocks, threads, args)
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
    if rows_b == 0:  # as the nvcc route (csrc/ops.h); else a launch of zero blocks
        raise ValueError("tokcomp_cupy::best_match: set B (the second input) is empty")
    score = torch.empty(batch, rows_a, device=device, dtype=torch.float32)
    index = torch.empty(batch, rows_a, device=device, dtype=torch.int64)
    if score.numel() == 0:
        return score, index
    inv_a, inv_b = _inverse_norms(a, type_name), _inverse_norms(b, type_name)
    tiles = -(-rows_a // constants()["kTileA"])
    args = (a, b, inv_a, inv_b, score, index, rows_a, rows_b, channels, a_protected, b_protected)
    threads = constants()["kThreads"]
    _launch(_kernel("best_match", type_name), device, batch * tiles, threads, (*args, tiles))
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
    """tokcomp::weighted_merge through cupy (weighted means of kept and merged rows, size sums),
    with the block geometry of csrc/cuda/weighted_merge.cu."""
    device = _check("weighted_merge", x, weight, size, keep_idx, src_idx, dst_pos)
    type_name = _type_name("weighted_merge", x)
    (batch, tokens, channels), kept, sources = x.shape, keep_idx.shape[1], src_idx.shape[1]
    out = torch.empty(batch, kept, channels, device=device, dtype=x.dtype)
    out_size = torch.empty(batch, kept, device=device, dtype=torch.float32)
    if out_size.numel() == 0:
        # No output rows: sources are still an error (every dst_pos is out of range [0, 0)), as
        # on the CPU, in the reference and in csrc/cuda/weighted_merge.cu.
        if batch and sources:
            raise RuntimeError(
                f"tokcomp_cupy::weighted_merge: dst_pos value {int(dst_pos[0, 0])} out of range "
                f"[0, {kept})"
            )
        return out, out_size
    tile_rows, chunk, chunks, threads = _merge_geometry(channels)
    tiles = -(-kept // tile_rows)
    args = (
        x.contiguous(),
        weight.float().contiguous(),
        size.float().contiguous(),
        keep_idx.contiguous(),
        src_idx.contiguous(),
        dst_pos.contiguous(),
        out,
        out_size,
        tokens,
        channels,
        kept,
        sources,
        tile_rows,
        tiles,
        chunk,
        chunks,
    )
    blocks = batch * tiles * chunks
    shared = tile_rows * chunk * 4  # float32 sums
    _launch(_kernel("weighted_merge", type_name), device, blocks, threads, args, shared)
    return out, out_size


def _merge_geometry(channels: int) -> tuple[int, int, int, int]:
    """(output rows per block, channels per block, channel chunks, threads) of weighted_merge."""
    const = constants()
    chunk = max(min(channels, const["kMergeMaxChunk"]), 1)
    chunks = -(-max(channels, 1) // chunk)
    tile_rows = min(max(const["kMergeSharedFloats"] // chunk, 1), const["kMergeMaxTileRows"])
    threads = min(max(-(-chunk // 32) * 32, 64), const["kMergeMaxThreads"])
    return tile_rows, chunk, chunks, threads


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
    tiles = -(-tokens // constants()["kTileA"])
    args = (metric, inv, energy, tokens, channels, float(margin), float(alpha), tiles)
    threads = constants()["kThreads"]
    _launch(_kernel("energy_score", type_name), device, batch * tiles, threads, args)
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
    if vectors > limit:  # as csrc/cuda/attention_pagerank.cu
        raise RuntimeError(
            f"tokcomp_cupy::attention_pagerank: N = {tokens} is too large for the shared memory "
            "of this GPU"
        )
    use_cache = iterations > 1 and cached <= limit
    kernel = _kernel("attention_pagerank", type_name, "true" if use_cache else "false")
    block = min(constants()["kPagerankMaxThreads"], max(32, (tokens + 31) // 32 * 32))
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
    block = min(constants()["kMaxminMaxThreads"], max(32, (tokens + 31) // 32 * 32))
    args = (dist.contiguous(), weight, first.long().contiguous(), scratch, out, tokens, k)
    _launch(_kernel("greedy_maxmin", type_name), device, batch, block, args)
    return out


@torch.library.custom_op("tokcomp_cupy::greedy_dpp", mutates_args=(), device_types="cuda")
def greedy_dpp(similarity: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """tokcomp::greedy_dpp through cupy (greedy DPP MAP picks, tokcomp.ops.dpp)."""
    device = _check("greedy_dpp", similarity, relevance)
    type_name = _type_name("greedy_dpp", similarity)
    batch, tokens = similarity.shape[:2]
    out = torch.empty(batch, k, device=device, dtype=torch.int64)
    if batch == 0:
        return out
    scratch = torch.empty(batch, k + 1, tokens, device=device, dtype=torch.float32)
    block = min(constants()["kDppMaxThreads"], max(32, (tokens + 31) // 32 * 32))
    args = (similarity.contiguous(), relevance.float().contiguous(), scratch, out, tokens, k)
    _launch(_kernel("greedy_dpp", type_name), device, batch, block, args)
    return out


_fake.register("tokcomp_cupy")

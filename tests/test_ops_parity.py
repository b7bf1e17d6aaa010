"""The compiled ops (torch.ops.tokcomp.*) against their PyTorch references, on every device the
extension is built for: "cpu" always (the tests fail, not skip, when tokcomp._C is missing) and
"cuda" when a GPU is visible."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokcomp.ops import backend, bipartite_plan
from tokcomp.ops.dispatch import extension
from tokcomp.ops.match import best_match_reference
from tokcomp.ops.merge import weighted_merge, weighted_merge_reference

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [
    (batch, tokens, channels)
    for batch in (1, 7)
    for tokens in (2, 3, 197, 577)
    for channels in (64, 384)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICE_DTYPES = [(device, dtype) for device in DEVICES for dtype in DTYPES]


def _ids(value: object) -> str:
    return str(value).replace("torch.", "")


@pytest.fixture(autouse=True)
def _compiled_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test needs the extension: loading it must succeed (CI builds it). Loading it
    through the dispatcher also registers the fake kernels (tokcomp/ops/_fake.py)."""
    monkeypatch.delenv("TOKCOMP_BACKEND", raising=False)
    importlib.import_module("tokcomp._C")  # raises with the real reason when missing
    assert extension() is not None


def _require(device: str) -> None:
    module = importlib.import_module("tokcomp._C")
    if device == "cuda":
        assert module.WITH_CUDA, "a GPU is visible but tokcomp._C was built without CUDA"


def _protected_pairs(na: int, nb: int) -> list[tuple[int, int]]:
    """(a_protected, b_protected): 0, 1, 2, 4 and all of B, clipped to the set sizes."""
    pairs = {(min(p, na), min(p, nb)) for p in (0, 1, 2, 4)}
    pairs |= {(0, nb), (min(1, na), nb), (min(2, na), 0)}
    return sorted(pairs)


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(score atol, top-2 gap below which the index may differ). Inputs of every dtype are
    converted to float32 identically; only the summation order differs."""
    return (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 1e-3)


def _check_match(a: torch.Tensor, b: torch.Tensor, a_protected: int, b_protected: int) -> None:
    score, index = torch.ops.tokcomp.best_match(a, b, a_protected, b_protected)
    ref_score, ref_index = best_match_reference(a, b, a_protected, b_protected)
    assert score.dtype == torch.float32 and index.dtype == torch.int64
    assert score.shape == ref_score.shape == index.shape == (a.shape[0], a.shape[1])
    score, index = score.cpu(), index.cpu()
    ref_score, ref_index = ref_score.cpu(), ref_index.cpu()
    atol, gap_tol = _tolerances(a.dtype)
    torch.testing.assert_close(score, ref_score, atol=atol, rtol=0)

    # Every row of a against every row of b, in float64, to find rows with a clear winner.
    full = torch.nn.functional.normalize(a.double(), dim=-1) @ torch.nn.functional.normalize(
        b.double(), dim=-1
    ).transpose(1, 2)
    full = full.cpu()
    full[:, :a_protected] = -torch.inf
    full[:, :, :b_protected] = -torch.inf
    eligible = b.shape[1] - b_protected
    if eligible == 0 or a_protected == a.shape[1]:
        assert torch.all(index == 0) and torch.all(score == -torch.inf)
        return
    assert torch.all(index[:, :a_protected] == 0)
    assert torch.all(index[:, a_protected:] >= b_protected)
    top = full.topk(min(2, eligible), dim=-1).values
    gap = top[..., 0] - top[..., 1] if eligible > 1 else torch.full_like(top[..., 0], torch.inf)
    clear = gap > gap_tol
    clear[:, :a_protected] = False
    assert torch.equal(index[clear], ref_index[clear])
    # Near-ties: the chosen column must still be (within tolerance) a best one.
    chosen = full.gather(2, index[..., None])[..., 0]
    active = torch.zeros_like(clear)
    active[:, a_protected:] = True
    assert torch.all((top[..., 0] - chosen)[active] <= gap_tol)
    assert clear.sum() >= 0.5 * active.sum(), "too few rows with a clear winner to compare"


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES, ids=_ids)
@pytest.mark.parametrize(("batch", "tokens", "channels"), SHAPES, ids=_ids)
def test_best_match_parity(
    device: str, dtype: torch.dtype, batch: int, tokens: int, channels: int
) -> None:
    _require(device)
    generator = torch.Generator().manual_seed(tokens * 1000 + channels + batch)
    x = torch.randn(batch, tokens, channels, generator=generator).to(device=device, dtype=dtype)
    a, b = x[:, ::2].contiguous(), x[:, 1::2].contiguous()
    if b.shape[1] == 0:
        return
    for a_protected, b_protected in _protected_pairs(a.shape[1], b.shape[1]):
        _check_match(a, b, a_protected, b_protected)


@pytest.mark.parametrize("device", DEVICES)
def test_best_match_edge_cases(device: str) -> None:
    _require(device)
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(3, 40, 64, generator=generator)
    # Exact duplicates of b's rows: ties broken towards the first index, like torch.max.
    a = torch.cat([b[:, 5:6], b[:, 7:8], b[:, 7:8] * 3.0], dim=1)
    b[:, 30] = b[:, 7]
    score, index = torch.ops.tokcomp.best_match(a.to(device), b.to(device), 0, 0)
    assert index.cpu().tolist() == [[5, 7, 7]] * 3
    torch.testing.assert_close(score.cpu(), torch.ones(3, 3), atol=1e-5, rtol=0)
    # Zero rows (norm clamped by eps) score 0; empty a gives empty outputs.
    zeros = torch.zeros(2, 4, 64, device=device)
    score, index = torch.ops.tokcomp.best_match(zeros, zeros, 0, 1)
    assert torch.all(score == 0) and torch.all(index == 1)
    empty = torch.ops.tokcomp.best_match(zeros[:, :0], zeros, 0, 0)
    assert empty[0].shape == (2, 0) and empty[1].shape == (2, 0)
    # Non-contiguous inputs are handled by the op itself: strided rows (read in place on CPU),
    # transposed channels, a batch slice with a storage offset.
    x = torch.randn(4, 50, 64, generator=generator).to(device)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    for a, b in ((x[:, ::2], x[:, 1::2]), (xt[:, ::2], xt[:, 1::2]), (x[1:3, 3:20], x[2:4, 20:])):
        score, index = torch.ops.tokcomp.best_match(a, b, 1, 0)
        ref_score, ref_index = best_match_reference(a, b, 1, 0)
        torch.testing.assert_close(score, ref_score, atol=1e-5, rtol=0)
        assert (index == ref_index).float().mean() > 0.95


def _random_plan(
    batch: int, tokens: int, kept: int, sources: int, generator: torch.Generator, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keep, src, dst = [], [], []
    for _ in range(batch):
        perm = torch.randperm(tokens, generator=generator)
        keep.append(perm[:kept])
        src.append(perm[kept : kept + sources])
        if mode == "one_dst":
            dst.append(torch.zeros(sources, dtype=torch.int64))
        else:
            dst.append(torch.randint(0, kept, (sources,), generator=generator))
    return torch.stack(keep), torch.stack(src), torch.stack(dst)


def _check_merge(x, weight, size, keep_idx, src_idx, dst_pos) -> None:
    out, out_size = torch.ops.tokcomp.weighted_merge(x, weight, size, keep_idx, src_idx, dst_pos)
    ref, ref_size = weighted_merge_reference(x, weight, size, keep_idx, src_idx, dst_pos)
    assert out.dtype == x.dtype and out_size.dtype == torch.float32
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # the float32 results may round to neighbouring values of the 16-bit type
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-3, rtol=1.6e-2)
    torch.testing.assert_close(out_size, ref_size, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES, ids=_ids)
@pytest.mark.parametrize("mode", ["random", "one_dst", "no_sources", "prune", "bipartite"])
@pytest.mark.parametrize(("batch", "tokens", "channels"), SHAPES, ids=_ids)
def test_weighted_merge_parity(
    device: str, dtype: torch.dtype, mode: str, batch: int, tokens: int, channels: int
) -> None:
    _require(device)
    generator = torch.Generator().manual_seed(tokens * 7 + channels + batch)
    x = torch.randn(batch, tokens, channels, generator=generator).to(device=device, dtype=dtype)
    weight = (torch.rand(batch, tokens, generator=generator) + 0.25).to(device)
    size = (torch.rand(batch, tokens, generator=generator) * 4 + 1).to(device)
    if mode == "bipartite":
        protected = min(1, tokens)
        r = (tokens - protected) // 2
        keep_idx, src_idx, dst_pos = bipartite_plan(x, protected, r)
    else:
        kept = {"no_sources": tokens, "prune": max(1, tokens // 2)}.get(mode, max(1, tokens // 3))
        sources = tokens - kept if mode in ("random", "one_dst") else 0
        keep_idx, src_idx, dst_pos = _random_plan(batch, tokens, kept, sources, generator, mode)
    _check_merge(x, weight, size, keep_idx.to(device), src_idx.to(device), dst_pos.to(device))
    # weight == size (ToMe's size-weighted average).
    _check_merge(x, size, size, keep_idx.to(device), src_idx.to(device), dst_pos.to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_merge_large_channels_and_noncontiguous(device: str) -> None:
    _require(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 3000, generator=generator).to(device)
    weight = (torch.rand(2, 64, generator=generator) + 0.5).to(device)
    keep_idx, src_idx, dst_pos = (t.to(device) for t in _random_plan(2, 64, 20, 40, generator, "r"))
    _check_merge(x, weight, weight, keep_idx, src_idx, dst_pos)
    # Transposed (non-contiguous) x and a sliced weight: the op makes them contiguous.
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    w2 = torch.rand(2, 128, generator=generator).to(device)[:, ::2] + 0.5
    _check_merge(xt, w2, weight, keep_idx, src_idx, dst_pos)


@pytest.mark.parametrize("device", DEVICES)
def test_ops_trace_with_fake_kernels(device: str) -> None:
    """The fake kernels registered in tokcomp/ops/_fake.py: meta tensors, opcheck, compile."""
    _require(device)
    meta = torch.empty(3, 11, 16, device="meta")
    score, index = torch.ops.tokcomp.best_match(meta[:, ::2], meta[:, 1::2], 1, 0)
    assert score.shape == index.shape == (3, 6) and index.dtype == torch.int64
    x = torch.randn(3, 11, 16, device=device)
    size = torch.rand(3, 11, device=device) + 0.5
    plan = bipartite_plan(x, 1, 4)
    a, b = x[:, ::2].contiguous(), x[:, 1::2].contiguous()
    torch.library.opcheck(torch.ops.tokcomp.best_match.default, (a, b, 1, 0))
    torch.library.opcheck(torch.ops.tokcomp.weighted_merge.default, (x, size, size, *plan))

    def step(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, match = torch.ops.tokcomp.best_match(
            x[:, ::2].contiguous(), x[:, 1::2].contiguous(), 1, 0
        )
        src = score.argsort(dim=1, descending=True)[:, :4]
        keep_idx = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)[:, 1::2]
        return torch.ops.tokcomp.weighted_merge(
            x, size, size, keep_idx.contiguous(), 2 * src, match.gather(1, src)
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for got, want in zip(compiled(x, size), step(x, size), strict=True):
        torch.testing.assert_close(got, want)

    # Through the public API (the dispatcher may break the graph, the result must not change).
    def public_step(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_merge(x, size, size, *bipartite_plan(x, 1, 4))

    compiled = torch.compile(public_step, backend="aot_eager")
    for got, want in zip(compiled(x, size), public_step(x, size), strict=True):
        torch.testing.assert_close(got, want)


def test_dispatcher_uses_extension_on_cpu() -> None:
    module = importlib.import_module("tokcomp._C")
    assert isinstance(module.WITH_CUDA, bool)
    assert backend("cpu") == "cpp"
    if torch.cuda.is_available():
        assert backend("cuda") == "cuda"


@pytest.mark.parametrize("device", DEVICES)
def test_best_match_error_messages(device: str) -> None:
    _require(device)
    op = torch.ops.tokcomp.best_match
    a = torch.randn(2, 5, 8, device=device)
    b = torch.randn(2, 4, 8, device=device)
    with pytest.raises(RuntimeError, match=r"must be \(B, N, C\) tensors"):
        op(a[0], b, 0, 0)
    with pytest.raises(RuntimeError, match="batch and channel sizes of a and b must agree"):
        op(a, b[:, :, :4], 0, 0)
    with pytest.raises(RuntimeError, match="batch and channel sizes of a and b must agree"):
        op(a, b[:1], 0, 0)
    with pytest.raises(RuntimeError, match=r"set B .* is empty"):
        op(a, b[:, :0], 0, 0)
    with pytest.raises(RuntimeError, match="same dtype"):
        op(a, b.double(), 0, 0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        op(a.double(), b.double(), 0, 0)
    with pytest.raises(RuntimeError, match=r"a_protected must be in \[0, 5\], got 6"):
        op(a, b, 6, 0)
    with pytest.raises(RuntimeError, match=r"b_protected must be in \[0, 4\], got -1"):
        op(a, b, 0, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_weighted_merge_error_messages(device: str) -> None:
    _require(device)
    op = torch.ops.tokcomp.weighted_merge
    x = torch.randn(2, 6, 8, device=device)
    w = torch.ones(2, 6, device=device)
    keep = torch.tensor([[0, 1, 2], [3, 4, 5]], device=device)
    src = torch.tensor([[3, 4], [0, 1]], device=device)
    dst = torch.tensor([[0, 2], [1, 1]], device=device)
    with pytest.raises(RuntimeError, match=r"x must be a \(B, N, C\) tensor"):
        op(x[0], w, w, keep, src, dst)
    with pytest.raises(RuntimeError, match=r"weight must be \(B, N\) = \(2, 6\)"):
        op(x, w[:, :5], w, keep, src, dst)
    with pytest.raises(RuntimeError, match=r"size must be \(B, N\)"):
        op(x, w, w[:1], keep, src, dst)
    with pytest.raises(RuntimeError, match="weight and size must be float32"):
        op(x, w.half(), w, keep, src, dst)
    with pytest.raises(RuntimeError, match=r"keep_idx must be \(B, K\)"):
        op(x, w, w, keep[0], src, dst)
    with pytest.raises(RuntimeError, match=r"src_idx and dst_pos must both be \(B, R\)"):
        op(x, w, w, keep, src, dst[:, :1])
    with pytest.raises(RuntimeError, match="must be int64"):
        op(x, w, w, keep.int(), src, dst)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        op(x.double(), w, w, keep, src, dst)
    if device == "cpu":  # out-of-range indices: a clear error on CPU (device assert on CUDA)
        with pytest.raises(RuntimeError, match=r"dst_pos value 3 out of range \[0, 3\)"):
            op(x, w, w, keep, src, torch.tensor([[0, 3], [1, 1]]))
        with pytest.raises(RuntimeError, match=r"src_idx value 6 out of range \[0, 6\)"):
            op(x, w, w, keep, torch.tensor([[3, 6], [0, 1]]), dst)
        with pytest.raises(RuntimeError, match=r"keep_idx value -1 out of range \[0, 6\)"):
            op(x, w, w, torch.tensor([[0, 1, -1], [3, 4, 5]]), src, dst)


@pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="x86-64 only"
)
def test_portable_cpu_kernel_without_avx512() -> None:
    """The AVX2 kernel (chosen on CPUs without AVX-512, or with TOKCOMP_CPU_AVX512=0)."""
    code = (
        "import torch, tokcomp._C\n"
        "from tokcomp.ops.match import best_match_reference as ref\n"
        "g = torch.Generator().manual_seed(3)\n"
        "for n, c in ((197, 384), (577, 64), (9, 100)):\n"
        "    x = torch.randn(3, n, c, generator=g)\n"
        "    a, b = x[:, ::2].contiguous(), x[:, 1::2].contiguous()\n"
        "    s, i = torch.ops.tokcomp.best_match(a, b, 1, 2)\n"
        "    rs, ri = ref(a, b, 1, 2)\n"
        "    torch.testing.assert_close(s, rs, atol=1e-5, rtol=0)\n"
        "    assert (i == ri).float().mean() > 0.99\n"
    )
    env = {**os.environ, "TOKCOMP_CPU_AVX512": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr

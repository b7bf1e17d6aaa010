"""The compiled ops against their PyTorch references, on every device and route there is:
"cpu"/"compiled" (torch.ops.tokcomp.*, C++) always (the tests fail, not skip, when tokcomp._C is
missing), "cuda"/"compiled" (nvcc kernels) when a GPU is visible, and "cuda"/"cupy"
(torch.ops.tokcomp_cupy.*, NVRTC through cupy) when cupy is installed too. On a GPU machine the
same file proves both GPU routes."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokcomp.ops import backend, bipartite_plan, selfcheck
from tokcomp.ops.dispatch import extension
from tokcomp.ops.dpp import cosine_similarity_matrix, greedy_dpp, greedy_dpp_reference
from tokcomp.ops.energy import energy_score, energy_score_reference
from tokcomp.ops.match import best_match_reference
from tokcomp.ops.maxmin import _greedy_maxmin_fast, cosine_distances, greedy_maxmin_reference
from tokcomp.ops.merge import weighted_merge, weighted_merge_reference
from tokcomp.ops.pagerank import attention_pagerank, attention_pagerank_reference

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
#: (device, route): the compiled op on every device, and the cupy op on CUDA when cupy is there.
ROUTES = [(device, "compiled") for device in DEVICES] + (
    [("cuda", "cupy")]
    if torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None
    else []
)


SHAPES = [
    (batch, tokens, channels)
    for batch in (1, 7)
    for tokens in (2, 3, 197, 577)
    for channels in (64, 384)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUTE_DTYPES = [(device, route, dtype) for device, route in ROUTES for dtype in DTYPES]


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


def _op(device: str, route: str, name: str):
    """The op `name` of a route: torch.ops.tokcomp.<name> or torch.ops.tokcomp_cupy.<name>."""
    if route == "cupy":
        cupy_kernels = importlib.import_module("tokcomp.ops.cupy_kernels")
        assert cupy_kernels.available(), "cupy is installed but cannot run tokcomp's kernels"
        return getattr(torch.ops.tokcomp_cupy, name)
    _require(device)
    return getattr(torch.ops.tokcomp, name)


def _protected_pairs(na: int, nb: int) -> list[tuple[int, int]]:
    """(a_protected, b_protected): 0, 1, 2, 4 and all of B, clipped to the set sizes."""
    pairs = {(min(p, na), min(p, nb)) for p in (0, 1, 2, 4)}
    pairs |= {(0, nb), (min(1, na), nb), (min(2, na), 0)}
    return sorted(pairs)


def _tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(score atol, top-2 gap below which the index may differ). Inputs of every dtype are
    converted to float32 identically; only the summation order differs."""
    return (1e-5, 1e-4) if dtype == torch.float32 else (1e-4, 1e-3)


def _check_match(op, a: torch.Tensor, b: torch.Tensor, a_protected: int, b_protected: int) -> None:
    score, index = op(a, b, a_protected, b_protected)
    _check_match_result(score, index, a, b, a_protected, b_protected)


def _check_match_result(
    score: torch.Tensor,
    index: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_protected: int,
    b_protected: int,
) -> None:
    """best_match's (score, index) of a against b: the reference's scores, and its indices
    wherever a row has a clear winner, else a column within the near-tie tolerance of it."""
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


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
@pytest.mark.parametrize(("batch", "tokens", "channels"), SHAPES, ids=_ids)
def test_best_match_parity(
    device: str, route: str, dtype: torch.dtype, batch: int, tokens: int, channels: int
) -> None:
    op = _op(device, route, "best_match")
    generator = torch.Generator().manual_seed(tokens * 1000 + channels + batch)
    x = torch.randn(batch, tokens, channels, generator=generator).to(device=device, dtype=dtype)
    a, b = x[:, ::2].contiguous(), x[:, 1::2].contiguous()
    for a_protected, b_protected in _protected_pairs(a.shape[1], b.shape[1]):
        _check_match(op, a, b, a_protected, b_protected)


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_best_match_edge_cases(device: str, route: str) -> None:
    op = _op(device, route, "best_match")
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(3, 40, 64, generator=generator)
    # Exact duplicates of b's rows: ties broken towards the first index, like torch.max.
    a = torch.cat([b[:, 5:6], b[:, 7:8], b[:, 7:8] * 3.0], dim=1)
    b[:, 30] = b[:, 7]
    score, index = op(a.to(device), b.to(device), 0, 0)
    assert index.cpu().tolist() == [[5, 7, 7]] * 3
    torch.testing.assert_close(score.cpu(), torch.ones(3, 3), atol=1e-5, rtol=0)
    # Zero rows (norm clamped by eps) score 0; empty a gives empty outputs.
    zeros = torch.zeros(2, 4, 64, device=device)
    score, index = op(zeros, zeros, 0, 1)
    assert torch.all(score == 0) and torch.all(index == 1)
    empty = op(zeros[:, :0], zeros, 0, 0)
    assert empty[0].shape == (2, 0) and empty[1].shape == (2, 0)
    # Non-contiguous inputs are handled by the op itself: strided rows (read in place on CPU),
    # transposed channels, a batch slice with a storage offset.
    x = torch.randn(4, 50, 64, generator=generator).to(device)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    for a, b in ((x[:, ::2], x[:, 1::2]), (xt[:, ::2], xt[:, 1::2]), (x[1:3, 3:20], x[2:4, 20:])):
        _check_match(op, a, b, 1, 0)


def _zero_size_cases() -> list[tuple[str, tuple]]:
    """(op, args) with an empty batch, no tokens or no channels, for every op."""
    long = torch.int64

    def merge(batch: int, tokens: int, channels: int, kept: int, sources: int) -> tuple:
        x = torch.randn(batch, tokens, channels)
        weight = torch.rand(batch, tokens) + 0.5
        keep = torch.arange(kept).expand(batch, -1).contiguous()
        src = torch.arange(kept, kept + sources).expand(batch, -1).contiguous()
        return x, weight, weight, keep, src, torch.zeros(batch, sources, dtype=long)

    return [
        ("best_match", (torch.randn(0, 3, 0), torch.randn(0, 2, 0), 0, 0)),
        ("best_match", (torch.randn(0, 3, 4), torch.randn(0, 2, 4), 1, 1)),
        ("best_match", (torch.randn(2, 0, 4), torch.randn(2, 3, 4), 0, 1)),
        ("best_match", (torch.randn(2, 3, 0), torch.randn(2, 4, 0), 1, 1)),
        ("energy_score", (torch.randn(0, 3, 4), 0.5, 1.0)),
        ("energy_score", (torch.randn(2, 0, 4), 0.5, 1.0)),
        ("energy_score", (torch.randn(2, 3, 0), 0.5, 1.0)),
        ("attention_pagerank", (torch.rand(0, 2, 4, 4), 3)),
        ("attention_pagerank", (torch.rand(2, 0, 4, 4), 3)),
        ("attention_pagerank", (torch.rand(2, 3, 0, 0), 3)),
        ("attention_pagerank", (torch.rand(2, 3, 0, 0), 0)),
        ("weighted_merge", merge(0, 5, 4, 2, 2)),
        ("weighted_merge", merge(2, 5, 4, 0, 0)),
        ("weighted_merge", merge(2, 5, 0, 2, 3)),
        ("greedy_maxmin", (torch.rand(0, 4, 4), torch.rand(0, 4), torch.zeros(0, dtype=long), 2)),
        ("greedy_dpp", (torch.rand(0, 4, 4), torch.rand(0, 4), 2)),
    ]


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_zero_size_inputs_match_the_reference(device: str, route: str) -> None:
    """An empty batch, no tokens or no channels: the kernels return what the references return
    (no crash: the CPU best_match once divided by the batch size)."""
    for name, args in _zero_size_cases():
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        got = _as_tuple(_op(device, route, name)(*args))
        want = _as_tuple(selfcheck.CASES[name][1](*args))
        shapes = [tuple(t.shape) for t in args if isinstance(t, torch.Tensor)]
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype, (name, shapes)
            torch.testing.assert_close(g.cpu(), w.cpu(), msg=f"{name} {shapes}")


def _as_tuple(result: torch.Tensor | tuple) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _merges_of_every_a_token(metric: torch.Tensor, protected: int) -> list[dict[int, int]]:
    """Per image, token -> the token it merges into when every unprotected A (even) token
    merges, by plain loops in float64: its most similar unprotected B token among those of
    finite cosine, else the first unprotected B token."""
    tokens = range(protected, metric.shape[1])
    a_tokens, b_tokens = tokens[tokens[0] % 2 :: 2], tokens[1 - tokens[0] % 2 :: 2]
    merges = []
    for row in torch.nn.functional.normalize(metric.double(), dim=-1):
        merge = {}
        for a in a_tokens:
            cosines = {b: float(row[a] @ row[b]) for b in b_tokens}
            finite = {b: cosine for b, cosine in cosines.items() if math.isfinite(cosine)}
            merge[a] = max(finite, key=finite.get) if finite else b_tokens[0]
        merges.append(merge)
    return merges


def _plan_merges(plan) -> list[dict[int, int]]:
    """Per image, token -> the token a plan merges it into."""
    dst_tokens = plan.keep_idx.gather(1, plan.dst_pos).cpu()
    rows = zip(plan.src_idx.cpu().tolist(), dst_tokens.tolist(), strict=True)
    return [dict(zip(src, dst, strict=True)) for src, dst in rows]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend_env", ["auto", "reference"])
@pytest.mark.parametrize("non_finite", ["none", "some_a_nan", "every_a_nan", "every_b_inf"])
def test_bipartite_plan_merges_tokens_without_a_finite_match_into_unprotected_ones(
    device: str, backend_env: str, non_finite: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKCOMP_BACKEND", backend_env)
    tokens, protected = 10, 2
    metric = torch.randn(2, tokens, 8, generator=torch.Generator().manual_seed(0))
    if non_finite == "some_a_nan":
        metric[:, [4, 8]] = torch.nan
    elif non_finite == "every_a_nan":
        metric[:, protected::2] = torch.nan
    elif non_finite == "every_b_inf":
        metric[:, protected + 1 :: 2, 0] = torch.inf
    plan = bipartite_plan(metric.to(device), protected, (tokens - protected) // 2)
    assert _plan_merges(plan) == _merges_of_every_a_token(metric, protected)
    placed = torch.cat([plan.keep_idx, plan.src_idx], dim=1).sort(dim=1).values.cpu()
    assert torch.equal(placed, torch.arange(tokens).expand(2, -1))  # every token placed once


@pytest.mark.parametrize(("tokens", "protected"), [(0, 0), (1, 0), (1, 1)])
def test_bipartite_plan_of_fewer_than_two_tokens_keeps_them(tokens, protected) -> None:
    """No B token to merge into: r = 0 (the range it allows) keeps everything (it raised)."""
    plan = bipartite_plan(torch.randn(2, tokens, 4), protected, 0)
    assert torch.equal(plan.keep_idx, torch.arange(tokens).expand(2, -1))
    assert plan.src_idx.shape == plan.dst_pos.shape == (2, 0)


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


def _check_merge(op, x, weight, size, keep_idx, src_idx, dst_pos) -> None:
    out, out_size = op(x, weight, size, keep_idx, src_idx, dst_pos)
    ref, ref_size = weighted_merge_reference(x, weight, size, keep_idx, src_idx, dst_pos)
    assert out.dtype == x.dtype and out_size.dtype == torch.float32
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:  # the float32 results may round to neighbouring values of the 16-bit type
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-3, rtol=1.6e-2)
    torch.testing.assert_close(out_size, ref_size, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
@pytest.mark.parametrize("mode", ["random", "one_dst", "no_sources", "prune", "bipartite"])
@pytest.mark.parametrize(("batch", "tokens", "channels"), SHAPES, ids=_ids)
def test_weighted_merge_parity(
    device: str, route: str, dtype: torch.dtype, mode: str, batch: int, tokens: int, channels: int
) -> None:
    op = _op(device, route, "weighted_merge")
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
    plan = keep_idx.to(device), src_idx.to(device), dst_pos.to(device)
    _check_merge(op, x, weight, size, *plan)
    _check_merge(op, x, size, size, *plan)  # weight == size (ToMe's size-weighted average)


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_weighted_merge_large_channels_and_noncontiguous(device: str, route: str) -> None:
    op = _op(device, route, "weighted_merge")
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 3000, generator=generator).to(device)
    weight = (torch.rand(2, 64, generator=generator) + 0.5).to(device)
    keep_idx, src_idx, dst_pos = (t.to(device) for t in _random_plan(2, 64, 20, 40, generator, "r"))
    _check_merge(op, x, weight, weight, keep_idx, src_idx, dst_pos)
    # Transposed (non-contiguous) x and a sliced weight: the op makes them contiguous.
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    w2 = torch.rand(2, 128, generator=generator).to(device)[:, ::2] + 0.5
    _check_merge(op, xt, w2, weight, keep_idx, src_idx, dst_pos)


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_ops_trace_with_fake_kernels(device: str, route: str) -> None:
    """The fake kernels registered in tokcomp/ops/_fake.py: meta tensors, opcheck, compile."""
    ops = {name: _op(device, route, name) for name in ("best_match", "weighted_merge")}
    new_ops = ("energy_score", "attention_pagerank", "greedy_maxmin", "greedy_dpp")
    ops |= {name: _op(device, route, name) for name in new_ops}
    meta = torch.empty(3, 11, 16, device="meta")
    score, index = ops["best_match"](meta[:, ::2], meta[:, 1::2], 1, 0)
    assert score.shape == index.shape == (3, 6) and index.dtype == torch.int64
    assert ops["energy_score"](meta, 0.5, 1.0).shape == (3, 11)
    attn_meta = torch.empty(2, 3, 11, 11, device="meta")
    assert ops["attention_pagerank"](attn_meta, 5).shape == (2, 3, 11)
    first_meta = torch.empty(3, dtype=torch.int64, device="meta")
    picks = ops["greedy_maxmin"](attn_meta[0], attn_meta[0, :, 0], first_meta, 4)
    assert picks.shape == (3, 4) and picks.dtype == torch.int64
    dpp_picks = ops["greedy_dpp"](attn_meta[0], attn_meta[0, :, 0], 4)
    assert dpp_picks.shape == (3, 4) and dpp_picks.dtype == torch.int64

    x = torch.randn(3, 11, 16, device=device)
    size = torch.rand(3, 11, device=device) + 0.5
    plan = bipartite_plan(x, 1, 4)
    a, b = x[:, ::2].contiguous(), x[:, 1::2].contiguous()
    attn = torch.randn(2, 3, 11, 11, device=device).softmax(-1)
    dist = cosine_distances(x)
    for op, args in (
        (ops["best_match"], (a, b, 1, 0)),
        (ops["weighted_merge"], (x, size, size, *plan)),
        (ops["energy_score"], (x, 0.5, 1.0)),
        (ops["attention_pagerank"], (attn, 5)),
        (ops["greedy_maxmin"], (dist, size, size.argmax(dim=1), 4)),
        (ops["greedy_dpp"], (cosine_similarity_matrix(x), size, 4)),
    ):
        torch.library.opcheck(op.default, args)

    def step(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, match = ops["best_match"](x[:, ::2].contiguous(), x[:, 1::2].contiguous(), 1, 0)
        src = score.argsort(dim=1, descending=True)[:, :4]
        keep_idx = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)[:, 1::2]
        merged, merged_size = ops["weighted_merge"](
            x, size, size, keep_idx.contiguous(), 2 * src, match.gather(1, src)
        )
        energy = ops["energy_score"](merged, 0.5, 1.0)
        return merged, merged_size + energy

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for got, want in zip(compiled(x, size), step(x, size), strict=True):
        torch.testing.assert_close(got, want)

    # Through the public API (the dispatcher may break the graph, the result must not change).
    def public_step(x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weighted_merge(x, size, size, *bipartite_plan(x, 1, 4))

    compiled = torch.compile(public_step, backend="aot_eager")
    for got, want in zip(compiled(x, size), public_step(x, size), strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
def test_first_call_checks_pass(device: str, route: str, dtype: torch.dtype) -> None:
    """Every kernel passes the check the dispatcher runs on its first call (ops.selfcheck)."""
    for name in selfcheck.CASES:
        problem = selfcheck.mismatch(name, _op(device, route, name), torch.device(device), dtype)
        assert problem is None, f"{name}: {problem}"


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


def test_weighted_merge_without_output_rows_rejects_sources() -> None:
    """keep_idx (B, 0) with sources: every dst_pos is out of range, an error as in the reference
    (the CPU kernel used to return the empty result without looking at them)."""
    x, w = torch.randn(2, 6, 8), torch.ones(2, 6)
    keep = torch.empty(2, 0, dtype=torch.int64)
    src, dst = torch.tensor([[3, 4], [0, 1]]), torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="out of bounds"):
        weighted_merge_reference(x, w, w, keep, src, dst)
    with pytest.raises(RuntimeError, match=r"dst_pos value 0 out of range \[0, 0\)"):
        torch.ops.tokcomp.weighted_merge(x, w, w, keep, src, dst)
    empty = torch.empty(2, 0, dtype=torch.int64)  # no sources either: an empty result
    got = torch.ops.tokcomp.weighted_merge(x, w, w, keep, empty, empty)
    want = weighted_merge_reference(x, w, w, keep, empty, empty)
    for g, r in zip(got, want, strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype


@pytest.mark.skipif(
    not (sys.platform == "linux" and os.uname().machine == "x86_64"), reason="x86-64 only"
)
def test_portable_cpu_kernel_without_avx512(tmp_path) -> None:
    """The AVX2 kernels (chosen on CPUs without AVX-512, or with TOKCOMP_CPU_AVX512=0); the
    matches are checked here, from what the subprocess saved."""
    code = (
        "import sys, torch, tokcomp._C\n"
        "from tokcomp.ops.energy import energy_score_reference\n"
        "from tokcomp.ops.pagerank import attention_pagerank_reference\n"
        "g = torch.Generator().manual_seed(3)\n"
        "matches = []\n"
        "for n, c in ((197, 384), (577, 64), (9, 100)):\n"
        "    x = torch.randn(3, n, c, generator=g)\n"
        "    a, b = x[:, ::2].contiguous(), x[:, 1::2].contiguous()\n"
        "    s, i = torch.ops.tokcomp.best_match(a, b, 1, 2)\n"
        "    matches.append((s, i, a, b))\n"
        "    e = torch.ops.tokcomp.energy_score(x, 0.4, 1.0)\n"
        "    torch.testing.assert_close(e, energy_score_reference(x, 0.4), atol=1e-5, rtol=0)\n"
        "    p = torch.rand(2, 2, n, n, generator=g).softmax(-1)\n"
        "    want = attention_pagerank_reference(p, 7)\n"
        "    torch.testing.assert_close(torch.ops.tokcomp.attention_pagerank(p, 7), want)\n"
        "torch.save(matches, sys.argv[1])\n"
    )
    env = {**os.environ, "TOKCOMP_CPU_AVX512": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "matches.pt")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for score, index, a, b in torch.load(tmp_path / "matches.pt"):
        _check_match_result(score, index, a, b, 1, 2)


# ---- energy_score, attention_pagerank, greedy_maxmin -------------------------------------------


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
@pytest.mark.parametrize(("batch", "tokens", "channels"), SHAPES, ids=_ids)
def test_energy_score_parity(
    device: str, route: str, dtype: torch.dtype, batch: int, tokens: int, channels: int
) -> None:
    op = _op(device, route, "energy_score")
    generator = torch.Generator().manual_seed(tokens * 13 + channels + batch)
    # A shared direction makes many cosines positive: both ELU branches are exercised.
    x = torch.randn(batch, tokens, channels, generator=generator) + 0.5
    x = x.to(device=device, dtype=dtype)
    for margin, alpha in ((0.0, 1.0), (0.5, 1.0), (0.9, 0.3)):
        got = op(x, margin, alpha)
        assert got.dtype == torch.float32 and got.shape == (batch, tokens)
        torch.testing.assert_close(got, energy_score_reference(x, margin, alpha), atol=2e-5, rtol=0)


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_energy_score_edge_cases(device: str, route: str) -> None:
    op = _op(device, route, "energy_score")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 50, 64, generator=generator).to(device)
    x[:, 3] = 0  # zero rows: norm clamped by eps, cosine 0
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    # Strided rows, transposed channels, a batch slice with a storage offset, one token.
    for metric in (x[:, ::2], xt, x[1:3, 5:], x[:, :1]):
        torch.testing.assert_close(
            op(metric, 0.2, 1.0), energy_score_reference(metric, 0.2, 1.0), atol=2e-5, rtol=0
        )
    assert op(x[:, :0], 0.2, 1.0).shape == (4, 0)
    # The public wrapper takes the same route.
    torch.testing.assert_close(
        energy_score(x, 0.2), energy_score_reference(x, 0.2), atol=2e-5, rtol=0
    )


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("tokens", [2, 3, 197, 577])
def test_attention_pagerank_parity(
    device: str, route: str, dtype: torch.dtype, batch: int, tokens: int
) -> None:
    op = _op(device, route, "attention_pagerank")
    generator = torch.Generator().manual_seed(tokens + batch)
    logits = torch.randn(batch, 3, tokens, tokens, generator=generator) * 2
    attn = logits.softmax(dim=-1).to(device=device, dtype=dtype)
    for iterations in (0, 1, 5, 30):
        got = op(attn, iterations)
        assert got.dtype == torch.float32 and got.shape == (batch, 3, tokens)
        want = attention_pagerank_reference(attn, iterations)
        torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_attention_pagerank_edge_cases(device: str, route: str) -> None:
    op = _op(device, route, "attention_pagerank")
    generator = torch.Generator().manual_seed(6)
    attn = torch.randn(3, 4, 40, 40, generator=generator).softmax(dim=-1).to(device)
    # Heads-first view (non-contiguous batch), transposed (strided columns), one token.
    for matrices in (attn.transpose(0, 1), attn.transpose(2, 3), attn[:, :, :1, :1]):
        torch.testing.assert_close(
            op(matrices, 9), attention_pagerank_reference(matrices, 9), atol=1e-7, rtol=1e-4
        )
    assert op(attn[:0], 3).shape == (0, 4, 40)
    torch.testing.assert_close(attention_pagerank(attn, 9), attention_pagerank_reference(attn, 9))


def _maxmin_inputs(
    batch: int, tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine distances of random features, random weights (one zero), first = argmax weight."""
    dist = cosine_distances(torch.randn(batch, tokens, 32, generator=generator))
    weight = torch.rand(batch, tokens, generator=generator) + 0.1
    weight[:, tokens // 2] = 0
    return dist, weight, weight.argmax(dim=1)


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("tokens", [2, 3, 197, 577])
def test_greedy_maxmin_parity(
    device: str, route: str, dtype: torch.dtype, batch: int, tokens: int
) -> None:
    """Exact picks: the kernels do the reference's float32 products and minima, so even ties
    (16-bit distances have many) resolve the same way."""
    op = _op(device, route, "greedy_maxmin")
    generator = torch.Generator().manual_seed(tokens * 3 + batch)
    dist, weight, first = _maxmin_inputs(batch, tokens, generator)
    dist, weight, first = dist.to(device, dtype), weight.to(device), first.to(device)
    for k in sorted({1, 2, max(1, tokens // 3), tokens}):
        got = op(dist, weight, first, k)
        assert got.dtype == torch.int64 and got.shape == (batch, k)
        want = greedy_maxmin_reference(dist.float(), weight, first, k)
        assert torch.equal(got, want), f"k={k}"
        assert all(len(set(row)) == k for row in got.tolist())


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_greedy_maxmin_ties_and_inputs(device: str, route: str) -> None:
    op = _op(device, route, "greedy_maxmin")
    # All distances equal: every step is a tie, broken towards the lowest unpicked index.
    dist = torch.ones(2, 9, 9, device=device)
    weight = torch.ones(2, 9, device=device)
    first = torch.tensor([4, 8], device=device)
    assert op(dist, weight, first, 5).tolist() == [[4, 0, 1, 2, 3], [8, 0, 1, 2, 3]]
    # Zero weights score 0 (not picked while positive scores remain), then the lowest index.
    weight = torch.tensor([[0.0, 0.0, 1.0, 0.0, 2.0]], device=device)
    dist = cosine_distances(torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2)))
    got = op(dist.to(device), weight, torch.tensor([4], device=device), 5)
    assert got.tolist() == greedy_maxmin_reference(dist.to(device), weight, got[:, 0], 5).tolist()
    assert got[0, :2].tolist() == [4, 2] and got[0, 2:].tolist() == [0, 1, 3]
    # Non-contiguous distances (rows scaled: not symmetric, so a kernel reading columns for
    # rows disagrees), a 16-bit weight (converted by the op), k < N.
    generator = torch.Generator().manual_seed(8)
    dist, weight, first = _maxmin_inputs(3, 40, generator)
    dist = (dist * torch.rand(3, 40, 1, generator=generator)).to(device)
    weight, first = weight.to(device), first.to(device)
    want = greedy_maxmin_reference(dist, weight.bfloat16().float(), first, 25)
    assert not torch.equal(want, greedy_maxmin_reference(dist.mT, weight, first, 25))
    got = op(dist.mT.contiguous().mT, weight.bfloat16(), first, 25)
    assert torch.equal(got, want)
    assert op(dist[:0], weight[:0], first[:0], 3).shape == (0, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_new_ops_error_messages(device: str) -> None:
    _require(device)
    energy = torch.ops.tokcomp.energy_score
    x = torch.randn(2, 5, 8, device=device)
    with pytest.raises(RuntimeError, match=r"metric must be a \(B, T, C\) tensor"):
        energy(x[0], 0.5, 1.0)
    with pytest.raises(RuntimeError, match="metric must be float32, bfloat16 or float16"):
        energy(x.double(), 0.5, 1.0)
    pagerank = torch.ops.tokcomp.attention_pagerank
    attn = torch.rand(2, 3, 5, 5, device=device)
    with pytest.raises(RuntimeError, match=r"attn must be a \(B, H, N, N\) tensor"):
        pagerank(attn[..., :4], 1)
    with pytest.raises(RuntimeError, match="iterations must be >= 0, got -1"):
        pagerank(attn, -1)
    with pytest.raises(RuntimeError, match="attn must be float32, bfloat16 or float16"):
        pagerank(attn.double(), 1)
    maxmin = torch.ops.tokcomp.greedy_maxmin
    dist, w = attn[0], attn[0, :, 0]
    first = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(RuntimeError, match=r"dist must be a \(B, N, N\) tensor"):
        maxmin(dist[:, :4], w, first, 2)
    with pytest.raises(RuntimeError, match=r"weight must be \(B, N\) = \(3, 5\)"):
        maxmin(dist, w[:, :4], first, 2)
    with pytest.raises(RuntimeError, match=r"first must be \(B,\) = \(3,\)"):
        maxmin(dist, w, first[:2], 2)
    with pytest.raises(RuntimeError, match="first must be int64"):
        maxmin(dist, w, first.int(), 2)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 5\], got 6"):
        maxmin(dist, w, first, 6)
    with pytest.raises(RuntimeError, match="dist and weight must be float32, bfloat16 or float16"):
        maxmin(dist.double(), w, first, 2)
    if device == "cpu":  # out-of-range first picks: a clear error on CPU (device assert on CUDA)
        with pytest.raises(RuntimeError, match=r"first value 5 out of range \[0, 5\)"):
            maxmin(dist, w, torch.tensor([0, 5, 1]), 2)


def _dpp_inputs(
    batch: int, tokens: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of random features of width 32 (rank-deficient beyond 32 tokens, so
    large k runs d2 out), relevance in (0, 1] as CDPruner's."""
    similarity = cosine_similarity_matrix(torch.randn(batch, tokens, 32, generator=generator))
    relevance = torch.rand(batch, tokens, generator=generator) + 1e-6
    return similarity, relevance


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("tokens", [2, 3, 197, 577])
def test_greedy_dpp_parity(
    device: str, route: str, dtype: torch.dtype, batch: int, tokens: int
) -> None:
    """Exact picks: the kernels do the reference's float32 operations in its order, unfused.
    The reference runs on the CPU (the same IEEE operations; on a GPU its k^2/2 steps would be
    as many kernel launches)."""
    op = _op(device, route, "greedy_dpp")
    generator = torch.Generator().manual_seed(tokens * 5 + batch)
    similarity, relevance = _dpp_inputs(batch, tokens, generator)
    similarity, relevance = similarity.to(device, dtype), relevance.to(device)
    for k in sorted({1, 2, max(1, tokens // 9), tokens}):
        got = op(similarity, relevance, k)
        assert got.dtype == torch.int64 and got.shape == (batch, k)
        want = greedy_dpp_reference(similarity.float().cpu(), relevance.cpu(), k)
        assert torch.equal(got.cpu(), want), f"k={k}"
        assert all(row == sorted(set(row)) for row in got.tolist())


@pytest.mark.parametrize(("device", "route"), ROUTES)
def test_greedy_dpp_ties_and_inputs(device: str, route: str) -> None:
    op = _op(device, route, "greedy_dpp")
    # Orthonormal tokens of equal relevance: every step is a tie, the lowest index wins.
    similarity = torch.eye(9, device=device).expand(2, 9, 9)
    relevance = torch.ones(2, 9, device=device)
    relevance[1, 6] = 2.0
    assert op(similarity, relevance, 3).tolist() == [[0, 1, 2], [0, 1, 6]]
    # Non-contiguous similarities (not symmetric: S need not be), a 16-bit relevance
    # (converted by the op), k < N.
    generator = torch.Generator().manual_seed(8)
    similarity, relevance = _dpp_inputs(3, 40, generator)
    similarity = similarity + 0.3 * torch.rand(3, 40, 40, generator=generator)
    similarity, relevance = similarity.to(device), relevance.to(device)
    want = greedy_dpp_reference(similarity, relevance.bfloat16().float(), 25)
    assert not torch.equal(want, greedy_dpp_reference(similarity.mT, relevance, 25))
    assert torch.equal(op(similarity.mT.contiguous().mT, relevance.bfloat16(), 25), want)
    assert op(similarity[:0], relevance[:0], 3).shape == (0, 3)


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
def test_greedy_dpp_non_finite(device: str, route: str, dtype: torch.dtype) -> None:
    """A NaN d2 ranks lowest: a NaN relevance's token comes after every finite one; an inf
    similarity on the diagonal is picked first."""
    op = _op(device, route, "greedy_dpp")
    generator = torch.Generator().manual_seed(16)
    similarity, relevance = _dpp_inputs(2, 40, generator)
    relevance[0, 7] = torch.nan
    similarity[1, 12, 12] = torch.inf
    similarity, relevance = similarity.to(device, dtype), relevance.to(device)
    for k in (20, 40):
        got = op(similarity, relevance, k)
        want = greedy_dpp_reference(similarity.float().cpu(), relevance.cpu(), k)
        assert torch.equal(got.cpu(), want)
    assert 7 not in op(similarity, relevance, 20)[0].tolist()
    assert 12 in op(similarity, relevance, 1)[1].tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_dpp_error_messages(device: str) -> None:
    _require(device)
    dpp = torch.ops.tokcomp.greedy_dpp
    similarity, relevance = torch.rand(3, 5, 5, device=device), torch.rand(3, 5, device=device)
    with pytest.raises(RuntimeError, match=r"similarity must be a \(B, N, N\) tensor"):
        dpp(similarity[:, :4], relevance, 2)
    with pytest.raises(RuntimeError, match=r"relevance must be \(B, N\) = \(3, 5\)"):
        dpp(similarity, relevance[:, :4], 2)
    with pytest.raises(RuntimeError, match=r"k must be in \[1, 5\], got 0"):
        dpp(similarity, relevance, 0)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        dpp(similarity.double(), relevance, 2)
    with pytest.raises(ValueError, match=r"greedy_dpp: k must be in 1..5, got 6"):
        greedy_dpp(similarity, relevance, 6)
    with pytest.raises(ValueError, match=r"relevance must be \(B, N\) = \(3, 5\)"):
        greedy_dpp(similarity, relevance[0], 2)


# ---- non-finite inputs: one rule on every route (tokcomp.ops) ------------------------------------


def _assert_same(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Equal non-finite values in the same places, finite ones within tolerance."""
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=atol, rtol=rtol, equal_nan=True)


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
def test_best_match_non_finite(device: str, route: str, dtype: torch.dtype) -> None:
    """A NaN score is never the best: rows with a NaN or an inf match nothing (-inf, 0) and are
    never matched; a batch element whose b is all NaN has no match at all."""
    op = _op(device, route, "best_match")
    generator = torch.Generator().manual_seed(11)
    b = torch.randn(3, 70, 48, generator=generator)
    source = torch.stack([torch.randperm(70, generator=generator) for _ in range(3)])
    a = b.gather(1, source[:, :50, None].expand(-1, -1, 48))  # clear winners: near copies
    a = a + 0.05 * torch.randn(a.shape, generator=generator)
    a[0, 5], a[1, 7, 3], a[2, 9, 0] = torch.nan, torch.inf, -torch.inf
    b[0, source[0, 60]], b[1, source[1, 61], 4] = torch.nan, -torch.inf  # rows nobody copies
    b[2, 1:] = torch.nan
    a, b = a.to(device, dtype), b.to(device, dtype)
    score, index = op(a, b, 1, 0)
    ref_score, ref_index = best_match_reference(a, b, 1, 0)
    _assert_same(score, ref_score, atol=_tolerances(dtype)[0])
    assert torch.equal(index.cpu(), ref_index.cpu())
    assert score[0, 5] == score[1, 7] == score[2, 9] == -torch.inf and index[0, 5] == 0
    assert bool((index[0] != source[0, 60].to(device)).all())
    assert index[2].tolist() == [0] * 50


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
def test_energy_score_non_finite(device: str, route: str, dtype: torch.dtype) -> None:
    """A NaN cosine counts as -inf (ELU -alpha): every energy stays finite."""
    op = _op(device, route, "energy_score")
    x = torch.randn(3, 70, 48, generator=torch.Generator().manual_seed(12)) + 0.5
    x[0, 5], x[1, 7, 3], x[1, 8, 0] = torch.nan, torch.inf, -torch.inf
    x[2] = torch.nan
    x = x.to(device, dtype)
    for margin, alpha in ((0.5, 1.0), (0.9, 0.3)):
        got = op(x, margin, alpha)
        _assert_same(got, energy_score_reference(x, margin, alpha), atol=2e-5)
        assert bool(got.isfinite().all())
        torch.testing.assert_close(got[2], torch.full_like(got[2], -alpha))  # all NaN


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
def test_weighted_merge_non_finite(device: str, route: str, dtype: torch.dtype) -> None:
    """NaN and inf in x or weight propagate to the rows they are merged into (IEEE)."""
    op = _op(device, route, "weighted_merge")
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(2, 40, 48, generator=generator)
    x[0, 3, 5], x[0, 10], x[0, 11], x[1, 20, 7] = torch.nan, torch.inf, -torch.inf, -torch.inf
    weight = torch.rand(2, 40, generator=generator) + 0.5
    weight[1, 30] = torch.nan
    plan = _random_plan(2, 40, 12, 28, generator, "random")
    x, weight = x.to(device, dtype), weight.to(device)
    keep_idx, src_idx, dst_pos = (t.to(device) for t in plan)
    out, out_size = op(x, weight, weight, keep_idx, src_idx, dst_pos)
    ref, ref_size = weighted_merge_reference(x, weight, weight, keep_idx, src_idx, dst_pos)
    _assert_same(out.float(), ref.float(), atol=1e-3, rtol=1.6e-2)
    _assert_same(out_size, ref_size, atol=1e-5, rtol=1e-5)
    assert not bool(out.isfinite().all())


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
def test_attention_pagerank_non_finite(device: str, route: str, dtype: torch.dtype) -> None:
    """NaN and inf attention entries propagate through the iterations (IEEE)."""
    op = _op(device, route, "attention_pagerank")
    logits = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(14))
    attn = logits.softmax(dim=-1)
    attn[0, 1, 5, 7], attn[1, 2, 3, 3] = torch.nan, torch.inf
    attn = attn.to(device, dtype)
    for iterations in (1, 3):
        got = op(attn, iterations)
        _assert_same(got, attention_pagerank_reference(attn, iterations), atol=1e-7, rtol=1e-4)
        assert bool(got[0, 0].isfinite().all()) and not bool(got[0, 1].isfinite().all())


@pytest.mark.parametrize(("device", "route", "dtype"), ROUTE_DTYPES, ids=_ids)
def test_greedy_maxmin_non_finite(device: str, route: str, dtype: torch.dtype) -> None:
    """A NaN score counts as -inf: such rows come last, lowest index first; +inf comes first."""
    op = _op(device, route, "greedy_maxmin")
    generator = torch.Generator().manual_seed(15)
    dist, weight, first = _maxmin_inputs(2, 40, generator)
    first[:] = 0
    dist[0, :, 7], dist[0, :, 3], dist[1, :, 4], dist[1, 9, 12] = (
        torch.nan,
        torch.nan,
        torch.inf,
        torch.nan,
    )
    weight[0, 20] = torch.nan
    dist, weight, first = dist.to(device, dtype), weight.to(device), first.to(device)
    got = op(dist, weight, first, 40)
    assert torch.equal(got.cpu(), greedy_maxmin_reference(dist.float(), weight, first, 40).cpu())
    assert got[0, -3:].tolist() == [3, 7, 20] and got[1, 1] == 4
    if (device, route) == ("cpu", "compiled"):  # the PyTorch fallback of greedy_maxmin too
        assert torch.equal(got, _greedy_maxmin_fast(dist.float(), weight, first, 40))


def test_the_cuda_routes_are_collected_where_a_gpu_is_visible() -> None:
    """Without a GPU the CUDA and cupy cases below are not collected: this skip says so in
    the summary instead of a run that looks complete."""
    if not torch.cuda.is_available():
        pytest.skip(
            "no visible GPU: the CUDA and cupy cases of this file were not collected "
            "(eval/gpu_check.sh runs them on a GPU)"
        )
    assert ("cuda", "compiled") in ROUTES

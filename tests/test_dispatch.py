"""The dispatcher (tokcomp.ops.dispatch): routes in order compiled CUDA, cupy, C++, reference;
clean fallbacks without the extension, without a GPU and without cupy; a lookup that traces
under torch.compile. GPU situations are simulated (the real GPU routes are proven by
tests/test_ops_parity.py on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_vit

import tokcomp
from tokcomp.ops import _fake, cupy_kernels, dispatch, selfcheck
from tokcomp.ops import energy as energy_module
from tokcomp.ops.energy import energy_score, energy_score_reference
from tokcomp.ops.match import best_match, best_match_reference
from tokcomp.ops.pagerank import attention_pagerank, attention_pagerank_reference

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")
F32 = torch.float32


@pytest.fixture(autouse=True)
def _fresh_routes(monkeypatch: pytest.MonkeyPatch):
    """Every test resolves routes from scratch and leaves no simulated state behind."""
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    dispatch.clear_cache()
    cupy_kernels.available.cache_clear()
    yield
    monkeypatch.undo()
    dispatch.clear_cache()
    cupy_kernels.available.cache_clear()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, cwd=ROOT
    )


def test_backend_here() -> None:
    assert tokcomp.backend("cpu") == tokcomp.backend() == "cpp"
    assert (
        dispatch.compiled_op("energy_score", torch.device("cpu"), F32)
        is torch.ops.tokcomp.energy_score
    )
    if not torch.cuda.is_available():  # CUDA kernels only if built in (cupy needs a GPU)
        built = dispatch.extension().WITH_CUDA
        assert tokcomp.backend("cuda") == ("cuda" if built else "reference")
        assert dispatch.route("energy_score", "cuda") == ("cuda" if built else "reference")
    assert tokcomp.backend("meta") == "reference"


def test_environment_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def counted_reference(*args: object) -> torch.Tensor:
        calls.append(args)
        return energy_score_reference(*args)

    monkeypatch.setattr(energy_module, "energy_score_reference", counted_reference)
    x = torch.randn(2, 9, 16)
    assert dispatch.route("greedy_maxmin", "cpu") == "cpp"
    energy_score(x, 0.5)
    assert not calls  # the compiled kernel ran
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    assert tokcomp.backend("cpu") == "reference"
    assert dispatch.route("greedy_maxmin", "cpu") == "reference"
    assert torch.equal(energy_score(x, 0.5), energy_score_reference(x, 0.5))
    assert len(calls) == 1  # the reference ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_gpu_cupy_is_never_imported() -> None:
    """No GPU: CUDA devices report "reference" (or "cuda" for a CUDA build), quietly, and cupy
    stays unimported."""
    result = _run(
        "import sys, torch, tokcomp\n"
        "from tokcomp.ops import dispatch\n"
        "want = 'cuda' if dispatch.extension().WITH_CUDA else 'reference'\n"
        "assert tokcomp.backend('cuda') == want\n"
        "assert dispatch.route('best_match', 'cuda') == want\n"
        "assert tokcomp.backend('cpu') == 'cpp'\n"
        "assert 'cupy' not in sys.modules, 'cupy imported without a GPU'\n"
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


def test_without_extension_one_warning_and_reference_results() -> None:
    result = _run(
        "import sys, warnings, torch\n"
        "sys.modules['tokcomp._C'] = None  # as if never built\n"
        "import tokcomp\n"
        "from tokcomp.ops import energy_score, energy_score_reference, greedy_maxmin\n"
        "from tokcomp.ops import greedy_maxmin_reference, cosine_distances\n"
        "import tokcomp.ops.cupy_kernels  # imports without the extension (and without cupy)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    assert tokcomp.backend('cpu') == 'reference'\n"
        "    x = torch.randn(2, 7, 8)\n"
        "    import tokcomp.ops.energy as energy\n"
        "    energy.energy_score_reference = lambda *a: torch.full((2, 7), 7.0)  # a marker\n"
        "    assert torch.equal(energy_score(x, 0.3), torch.full((2, 7), 7.0))\n"
        "    d, w = cosine_distances(x), torch.rand(2, 7)\n"
        "    picks = greedy_maxmin(d, w, w.argmax(1), 4)\n"
        "    assert torch.equal(picks, greedy_maxmin_reference(d, w, w.argmax(1), 4))\n"
        "messages = [str(w.message) for w in caught]\n"
        "assert len(messages) == 1, messages\n"
        "assert 'compiled extension is not available' in messages[0], messages\n"
    )
    assert result.returncode == 0, result.stderr


def _simulate_gpu(monkeypatch: pytest.MonkeyPatch, with_cuda: bool, cupy: bool | None) -> None:
    """A visible GPU, an extension built with or without CUDA, and cupy usable (True),
    installed but unusable (False: available() says no) or missing (None). No first-call
    checks: no kernel can run on the simulated GPU."""
    monkeypatch.setenv(dispatch.VERIFY_ENV, "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    extension = SimpleNamespace(WITH_CUDA=with_cuda)
    monkeypatch.setattr(dispatch, "extension", lambda: extension)
    if cupy is None:
        monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    else:
        monkeypatch.setattr(cupy_kernels, "available", lambda: cupy)


def test_cuda_prefers_the_compiled_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_gpu(monkeypatch, with_cuda=True, cupy=True)
    assert tokcomp.backend("cuda") == "cuda"
    assert (
        dispatch.compiled_op("attention_pagerank", CUDA, F32)
        is torch.ops.tokcomp.attention_pagerank
    )


def test_cuda_falls_back_to_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_gpu(monkeypatch, with_cuda=False, cupy=True)
    assert tokcomp.backend("cuda") == "cupy"
    assert tokcomp.backend("cpu") == "cpp"
    for name in ("best_match", "weighted_merge", "energy_score", "attention_pagerank"):
        assert dispatch.compiled_op(name, CUDA, F32) is getattr(torch.ops.tokcomp_cupy, name)
    assert dispatch.compiled_op("greedy_maxmin", CUDA, F32) is torch.ops.tokcomp_cupy.greedy_maxmin


@pytest.mark.parametrize("cupy", [None, False], ids=["cupy missing", "cupy unusable"])
def test_cuda_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch, cupy: bool | None):
    _simulate_gpu(monkeypatch, with_cuda=False, cupy=cupy)
    with pytest.warns(RuntimeWarning, match="no CUDA kernels here"):
        assert tokcomp.backend("cuda") == "reference"
    assert dispatch.compiled_op("energy_score", CUDA, F32) is None


def test_ops_missing_from_an_older_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension built before an op existed: CPU uses the reference, CUDA tries cupy."""
    assert dispatch.route("no_such_op", "cpu") == "reference"
    _simulate_gpu(monkeypatch, with_cuda=True, cupy=True)
    assert dispatch.route("no_such_op", "cuda") == "cupy"
    assert dispatch.route("energy_score", "cuda") == "cuda"


@pytest.mark.parametrize("backend_env", ["auto", "reference"])
def test_best_match_of_mixed_dtypes_on_every_route(
    backend_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a and b of different float dtypes: the best cosine match of the rows as given (computed
    apart, in float64) on every route; the C++ kernel takes one dtype, and the wrapper used to
    pass them unchanged."""
    monkeypatch.setenv(dispatch.BACKEND_ENV, backend_env)
    a, b = _inputs()
    for dtype_a, dtype_b in ((F32, torch.bfloat16), (torch.float16, F32), (F32, torch.float64)):
        a_, b_ = a.to(dtype_a), b.to(dtype_b)
        score, index = best_match(a_, b_, 1, 2)
        cosine = F.cosine_similarity(a_.double()[:, :, None], b_.double()[:, None], dim=-1)
        want_score, want_index = cosine[:, :, 2:].max(dim=-1)
        torch.testing.assert_close(score[:, 1:], want_score[:, 1:].float(), atol=1e-5, rtol=0)
        assert torch.equal(index[:, 1:], want_index[:, 1:] + 2)
        assert bool((score[:, 0] == -torch.inf).all()) and not index[:, 0].any()


def test_public_ops_compile_in_one_graph() -> None:
    """The route lookup is a constant under torch.compile: no graph break around the ops."""

    def step(x: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        score, index = best_match(x[:, ::2], x[:, 1::2], 1, 0)
        return score, index, energy_score(x, 0.5), attention_pagerank(attn, 5)

    x = torch.randn(2, 11, 16)
    attn = torch.randn(2, 3, 11, 11).softmax(dim=-1)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back
        got = compiled(x, attn)
    want = (
        *best_match_reference(x[:, ::2], x[:, 1::2], 1, 0),
        energy_score_reference(x, 0.5),
        attention_pagerank_reference(attn, 5),
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ---- first-call parity checks of the compiled routes -------------------------------------------


@pytest.fixture
def wrong_best_match():
    """A deliberately wrong CPU kernel for tokcomp::best_match (it forgets b's protected rows),
    registered over the real one for the test and removed after it."""
    library = torch.library.Library("tokcomp", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch says it overrides a registered kernel
        library.impl(
            "best_match", lambda a, b, a_prot, b_prot: best_match_reference(a, b, a_prot, 0), "CPU"
        )
    yield
    library._destroy()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, 21, 16, generator=torch.Generator().manual_seed(4))
    return x[:, ::2], x[:, 1::2]


def test_first_call_checks_each_op_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = selfcheck.mismatch
    monkeypatch.setattr(selfcheck, "mismatch", lambda *args: calls.append(args[:1]) or real(*args))
    a, b = _inputs()
    assert (
        tokcomp.backend("cpu", verbose=True)["best_match"] == "cpp: not checked yet (on first use)"
    )
    for _ in range(3):
        best_match(a, b, 1, 2)
        best_match(a.bfloat16(), b.bfloat16(), 1, 2)
        energy_score(a, 0.5)
    assert sorted(calls) == [("best_match",), ("best_match",), ("energy_score",)]
    report = tokcomp.backend("cpu", verbose=True)
    assert report["best_match"] == "cpp: bfloat16 on cpu verified; float32 on cpu verified"
    assert report["energy_score"] == "cpp: float32 on cpu verified"
    assert set(report) == set(selfcheck.CASES) == set(_fake.FAKES)


def test_a_wrong_kernel_is_caught_and_replaced_by_the_reference(wrong_best_match) -> None:
    a, b = _inputs()
    assert not torch.equal(
        torch.ops.tokcomp.best_match(a, b, 1, 2)[1], best_match_reference(a, b, 1, 2)[1]
    )
    with pytest.warns(
        RuntimeWarning, match=r"cpp kernel of best_match on cpu \(float32\)"
    ) as caught:
        score, index = best_match(a, b, 1, 2)
        best_match(a, b, 1, 2)  # one warning only
    assert len(caught) == 1 and "output 0: values differ by up to" in str(caught[0].message)
    want_score, want_index = best_match_reference(a, b, 1, 2)
    assert torch.equal(score, want_score) and torch.equal(index, want_index)
    assert tokcomp.backend("cpu") == "cpp"  # the other ops keep their kernels
    assert dispatch.compiled_op("energy_score", torch.device("cpu"), F32) is not None
    report = tokcomp.backend("cpu", verbose=True)
    assert report["best_match"] == "cpp: float32 on cpu failed"
    assert report["energy_score"] == "cpp: float32 on cpu verified"


def test_verification_can_be_switched_off(wrong_best_match, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(dispatch.VERIFY_ENV, "0")
    a, b = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, index = best_match(a, b, 1, 2)
    assert torch.equal(index, best_match_reference(a, b, 1, 0)[1])  # the wrong kernel ran
    assert (
        tokcomp.backend("cpu", verbose=True)["best_match"] == "cpp: not checked (TOKCOMP_VERIFY=0)"
    )


@pytest.mark.parametrize("name", sorted(selfcheck.CASES))
def test_dtypes_the_kernels_do_not_take_use_the_reference_unchecked(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.compiled_op(name, torch.device("cpu"), torch.float64) is None
    assert tokcomp.backend("cpu", verbose=True)[name] == "cpp: not checked yet (on first use)"


@torch.no_grad()
def test_a_float64_model_runs_without_a_warning_as_in_float32() -> None:
    model = tokcomp.apply(tiny_vit("vit"), "pitome", keep_ratio=0.7)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    want = model(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model.double()(images.double())
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4)


def test_concurrent_first_calls_check_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = selfcheck.mismatch

    def slow_check(*args):
        calls.append(args[0])
        time.sleep(0.05)  # widen the window in which other threads arrive
        return real(*args)

    monkeypatch.setattr(selfcheck, "mismatch", slow_check)
    x = torch.randn(2, 9, 16)
    want = energy_score_reference(x, 0.5)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: energy_score(x, 0.5), range(8)))
    assert calls == ["energy_score"]
    for got in results:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_wrong_kernel_is_caught_under_torch_compile(wrong_best_match) -> None:
    """The check runs while tracing; the compiled graph calls the reference."""
    a, b = _inputs()
    compiled = torch.compile(
        lambda a, b: best_match(a, b, 1, 2), backend="aot_eager", fullgraph=True
    )
    with pytest.warns(RuntimeWarning, match="cpp kernel of best_match on cpu"):
        score, index = compiled(a, b)
    want_score, want_index = best_match_reference(a, b, 1, 2)
    torch.testing.assert_close(score, want_score)
    assert torch.equal(index, want_index)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cupy_route_hands_over_inputs_that_require_grad(monkeypatch, dtype) -> None:
    """DLPack refuses a tensor that requires grad (PiToMe's energy on a training model's
    keys, Zero-TPrune's attention): the cupy view is taken of the detached tensor. Checked
    through torch's own DLPack export, which cupy.from_dlpack calls."""
    monkeypatch.setattr(cupy_kernels, "_cupy", lambda: SimpleNamespace(from_dlpack=_exported))
    tensor = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    assert cupy_kernels._array(tensor).equal(
        tensor.detach().view(torch.int16) if dtype == torch.bfloat16 else tensor.detach()
    )


def _exported(tensor: torch.Tensor) -> torch.Tensor:
    """What a DLPack consumer receives of `tensor` (raises where torch refuses to export)."""
    return torch.from_dlpack(tensor.__dlpack__())


def test_a_kernel_that_failed_its_check_stays_replaced_when_checks_are_switched_off(
    wrong_best_match, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = _inputs()
    with pytest.warns(RuntimeWarning, match="cpp kernel of best_match"):
        best_match(a, b, 1, 2)
    monkeypatch.setenv(dispatch.VERIFY_ENV, "0")
    assert torch.equal(best_match(a, b, 1, 2)[1], best_match_reference(a, b, 1, 2)[1])
    report = tokcomp.backend("cpu", verbose=True)["best_match"]
    assert report == "cpp: float32 on cpu failed; not checked (TOKCOMP_VERIFY=0)"


def _first_k(similarity_or_dist: torch.Tensor, *args) -> torch.Tensor:
    """A wrong greedy kernel: the first k tokens, whatever the scores."""
    k = args[-1]
    return torch.arange(k).expand(similarity_or_dist.shape[0], -1).clone()


def _last_of_ties(a, b, a_protected, b_protected):
    """A wrong best_match kernel: the last of equal best scores wins (not the first)."""
    score, index = best_match_reference(a, b, a_protected, b_protected)
    scores = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).mT
    scores[:, :, :b_protected] = -torch.inf
    at_best = scores == score[..., None]
    last = (at_best * torch.arange(b.shape[1])).argmax(dim=-1)
    return score, torch.where(at_best.any(dim=-1) & (score > -torch.inf), last, index)


@pytest.mark.parametrize(
    ("name", "wrong"),
    [("greedy_dpp", _first_k), ("greedy_maxmin", _first_k), ("best_match", _last_of_ties)],
)
def test_the_first_call_check_catches_a_kernel_that_picks_wrongly(name, wrong) -> None:
    """The checks pick k < N tokens (with k = N every sorted answer passed) and hold a tie."""
    assert selfcheck.mismatch(name, wrong, torch.device("cpu"), F32) is not None
    right = selfcheck.CASES[name][1]
    assert selfcheck.mismatch(name, right, torch.device("cpu"), F32) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_ops_compute_in_float32_under_autocast_and_give_no_gradient(dtype) -> None:
    """Under CPU autocast the references' products ran in bfloat16 (float64 inputs take the
    reference); inputs that require grad gave outputs whose backward left no gradient."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 9, 8, generator=generator, dtype=dtype).requires_grad_()
    attn = torch.rand(2, 2, 9, 9, generator=generator, dtype=dtype).softmax(-1).requires_grad_()
    plain = (
        best_match(metric, metric, 1, 1),
        energy_score(metric, 0.3),
        attention_pagerank(attn, 3),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = (
            best_match(metric, metric, 1, 1),
            energy_score(metric, 0.3),
            attention_pagerank(attn, 3),
        )
    for want, got in zip(tuple_of_tensors(plain), tuple_of_tensors(cast), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert not got.requires_grad
    with pytest.raises(ValueError, match="margin and alpha must be finite"):
        energy_score(metric, float("nan"))


def tuple_of_tensors(outputs) -> list[torch.Tensor]:
    """best_match's pair and the other ops' tensors, flat."""
    return [t for out in outputs for t in (out if isinstance(out, tuple) else (out,))]

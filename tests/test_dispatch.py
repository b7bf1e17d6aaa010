"""The dispatcher (tokcomp.ops.dispatch): routes in order compiled CUDA, cupy, C++, reference;
clean fallbacks without the extension, without a GPU and without cupy; a lookup that traces
under torch.compile. GPU situations are simulated (the real GPU routes are proven by
tests/test_ops_parity.py on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tokcomp
from tokcomp.ops import cupy_kernels, dispatch
from tokcomp.ops.energy import energy_score, energy_score_reference
from tokcomp.ops.match import best_match, best_match_reference
from tokcomp.ops.pagerank import attention_pagerank, attention_pagerank_reference

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


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
        dispatch.compiled_op("energy_score", torch.device("cpu")) is torch.ops.tokcomp.energy_score
    )
    if not torch.cuda.is_available():  # CUDA kernels only if built in (cupy needs a GPU)
        built = dispatch.extension().WITH_CUDA
        assert tokcomp.backend("cuda") == ("cuda" if built else "reference")
        want = torch.ops.tokcomp.energy_score if built else None
        assert dispatch.compiled_op("energy_score", CUDA) is want
    assert tokcomp.backend("meta") == "reference"


def test_environment_forces_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    assert dispatch.route("greedy_maxmin", "cpu") == "cpp"
    monkeypatch.setenv(dispatch.BACKEND_ENV, "reference")
    assert tokcomp.backend("cpu") == "reference"
    assert dispatch.route("greedy_maxmin", "cpu") == "reference"
    x = torch.randn(2, 9, 16)
    assert torch.equal(energy_score(x, 0.5), energy_score_reference(x, 0.5))


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
        "    assert torch.equal(energy_score(x, 0.3), energy_score_reference(x, 0.3))\n"
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
    installed but unusable (False: available() says no) or missing (None)."""
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
    assert dispatch.compiled_op("attention_pagerank", CUDA) is torch.ops.tokcomp.attention_pagerank


def test_cuda_falls_back_to_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_gpu(monkeypatch, with_cuda=False, cupy=True)
    assert tokcomp.backend("cuda") == "cupy"
    assert tokcomp.backend("cpu") == "cpp"
    for name in ("best_match", "weighted_merge", "energy_score", "attention_pagerank"):
        assert dispatch.compiled_op(name, CUDA) is getattr(torch.ops.tokcomp_cupy, name)
    assert dispatch.compiled_op("greedy_maxmin", CUDA) is torch.ops.tokcomp_cupy.greedy_maxmin


@pytest.mark.parametrize("cupy", [None, False], ids=["cupy missing", "cupy unusable"])
def test_cuda_falls_back_to_the_reference(monkeypatch: pytest.MonkeyPatch, cupy: bool | None):
    _simulate_gpu(monkeypatch, with_cuda=False, cupy=cupy)
    with pytest.warns(RuntimeWarning, match="no CUDA kernels here"):
        assert tokcomp.backend("cuda") == "reference"
    assert dispatch.compiled_op("energy_score", CUDA) is None


def test_ops_missing_from_an_older_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extension built before an op existed: CPU uses the reference, CUDA tries cupy."""
    assert dispatch.route("no_such_op", "cpu") == "reference"
    _simulate_gpu(monkeypatch, with_cuda=True, cupy=True)
    assert dispatch.route("no_such_op", "cuda") == "cupy"
    assert dispatch.route("energy_score", "cuda") == "cuda"


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

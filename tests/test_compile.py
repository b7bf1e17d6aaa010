"""torch.compile of patched models: every fixed-schedule method traces in one graph (no graph
break) on a timm ViT and on Hugging Face vision towers, and the compiled model gives the
eager result (aot_eager for every method, inductor for two), in float32 and under bfloat16
autocast (through the compiled kernels). Tiny models: inductor's compile is the slow part
(about 30-60 s each on a busy 2-core machine)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from method_options import middle
from test_encoders import tiny
from torch import nn
from torch._inductor.utils import run_and_get_code

import tokcomp
from tokcomp import bench
from tokcomp.adapters import find_adapter
from tokcomp.ops import dispatch, energy, match, merge, pagerank

#: The methods with a schedule fixed before the forward: every block method (ToMe, PiToMe,
#: DiffRate, Zero-TPrune, EViT, random).
FIXED = tokcomp.methods("vision")
HF_TOWERS = ("hf_clip", "hf_siglip", "hf_vit")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no cached graphs of another test's model)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def patched(model: nn.Module, method: str) -> nn.Module:
    """`model` with `method` at a middle budget (a third of the MACs removed)."""
    spec = find_adapter(model).spec()
    return tokcomp.apply(model, method, **middle(method, spec.tokens, spec.depth))


def tower(case: str) -> nn.Module:
    """The vision tower of a tiny Hugging Face model (the model itself when it is one)."""
    model = tiny(case)
    return getattr(model, "vision_model", model)


def output(out: object) -> torch.Tensor:
    """A timm model's output, or a Hugging Face tower's pooled output."""
    return getattr(out, "pooler_output", out)


def compiled_output(model: nn.Module, images: torch.Tensor, backend: str) -> torch.Tensor:
    """The output of `model` compiled in one graph (fullgraph: a graph break raises)."""
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    with torch.no_grad():
        return output(compiled(images))


def eager_output(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return output(model(images))


@pytest.mark.parametrize("method", FIXED)
def test_timm_compiles_in_one_graph_with_the_eager_result(method, images):
    model = patched(tiny_vit(), method)
    got = compiled_output(model, images, "aot_eager")
    torch.testing.assert_close(got, eager_output(model, images), atol=1e-5, rtol=1e-5)


def test_zero_tprune_with_sizes_compiles_in_one_graph(images):
    # the setting DINOv2 carries: the S-stage's sizes follow a data-dependent pairing
    spec = find_adapter(tiny_vit()).spec()
    options = {**middle("zero_tprune", spec.tokens, spec.depth), "similarity_share": 1.0}
    model = tokcomp.apply(tiny_vit(), "zero_tprune", **options, similarity_sizes=True)
    got = compiled_output(model, images, "aot_eager")
    torch.testing.assert_close(got, eager_output(model, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", HF_TOWERS)
@pytest.mark.parametrize("method", FIXED)
def test_hf_towers_compile_in_one_graph(method, case, images):
    model = patched(tower(case), method)
    got = compiled_output(model, images, "eager")
    torch.testing.assert_close(got, eager_output(model, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["tome", "random"])
def test_inductor_gives_the_eager_result(method, images):
    """Inductor (C++ codegen here) around tokcomp's ops: merges and the seeded draw."""
    model = patched(tiny_vit(), method)
    got = compiled_output(model, images, "inductor")
    torch.testing.assert_close(got, eager_output(model, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["timm", "hf_vit"])
def test_benchmark_compile_uses_the_cpu_inference_settings_with_the_eager_result(case, images):
    """tokcomp.bench.compiled, as `tokcomp bench --compile` and the harnesses' --compile run
    every model: inductor with its CPU inference settings, the weights frozen into the graph
    and the kernels called from a C++ wrapper (no Python `call`)."""
    model = patched(tiny_vit() if case == "timm" else tower(case), "tome")
    want = eager_output(model, images)
    frozen = bench.compiled(model)
    with torch.no_grad():
        got, code = run_and_get_code(frozen, images)
        torch.testing.assert_close(output(got), want, atol=1e-5, rtol=1e-5)
        assert code and not any("def call(" in source for source in code)
        for layer in model.modules():
            if isinstance(layer, nn.Linear):  # their weights are prepacked copies once frozen
                layer.weight.mul_(1.5)
        assert not torch.allclose(eager_output(model, images), want)
        torch.testing.assert_close(output(frozen(images)), want, atol=1e-5, rtol=1e-5)


def test_a_compiled_model_past_the_recompile_limit_raises_instead_of_running_eagerly():
    """Frozen weights are guarded by identity, so each compiled instance of a class adds code
    for its forward; past dynamo's limit it ran the next one eagerly, timed as compiled."""
    x = torch.randn(2, 8)
    first, second = (bench.compiled(nn.Sequential(nn.Linear(8, 8))) for _ in range(2))
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        first(x)
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            second(x)


@pytest.fixture
def no_reference_ops(monkeypatch):
    """Every op's PyTorch reference raises: the compiled kernels must serve every call (their
    first-call checks, which run the reference, are off)."""
    monkeypatch.setenv(dispatch.VERIFY_ENV, "0")
    for module, name in (
        (match, "best_match_reference"),
        (merge, "weighted_merge_reference"),
        (energy, "energy_score_reference"),
        (pagerank, "attention_pagerank_reference"),
    ):
        monkeypatch.setattr(module, name, _refuse(name))


def _refuse(name: str):
    def reference(*args: object) -> None:
        raise AssertionError(f"{name} ran: a compiled kernel was expected")

    return reference


@pytest.mark.parametrize("method", FIXED)
def test_bfloat16_autocast_compiles_through_the_compiled_ops(method, images, no_reference_ops):
    """CPU autocast to bfloat16 end to end: one graph, the eager autocast result, and the
    C++ kernels (not the reference) serve every op (the keys they match are float32 by
    design: docs/methods.md sections 7 and 8.1)."""
    model = patched(tiny_vit(), method)
    with torch.autocast("cpu", torch.bfloat16):
        got = compiled_output(model, images, "aot_eager")
        want = eager_output(model, images)
    assert want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("method", FIXED)
def test_the_signals_a_block_checks_while_traced_are_a_tuple_built_before(method):
    """dynamo before torch 2.10 cannot trace `in` on a method's frozenset of signals: the
    compression hands the blocks a tuple of them, built when it is made."""
    compression = patched(tiny_vit(), method)._tokcomp.compression
    assert isinstance(compression.needs, tuple)
    assert set(compression.needs) == set(compression.method.needs)

"""eval/bench_cpp_wrapper.py: the two wrappers it compiles with (tokcomp.bench.compiled's
cpp_wrapper, which eval/profile_compiled.py turns off), and the C++ wrapper's figures."""

from __future__ import annotations

import pytest
import torch
from fixtures import eval_script
from torch import nn
from torch._dynamo.utils import counters
from torch._inductor.utils import run_and_get_code


def script():
    return eval_script("bench_cpp_wrapper")


@pytest.mark.parametrize("cpp_wrapper", [True, False])
def test_each_wrapper_compiles_as_asked_with_the_same_result(cpp_wrapper):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)).eval()
    x = torch.randn(8, 16)
    with torch.no_grad():
        compiled = script().compiled(model, cpp_wrapper=cpp_wrapper)
        got, code = run_and_get_code(compiled, x)
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=1e-5)
    python_call = any("def call(" in source for source in code)
    assert python_call == (not cpp_wrapper)


def test_each_model_is_compiled_with_each_wrapper():
    """Compiling the second wrapper on the same model compiled nothing: it ran the first's."""
    torch._dynamo.reset()
    models = {name: nn.Sequential(nn.Linear(16, 4)).eval() for name in ("unpruned", "other")}
    x = torch.randn(8, 16)
    runs = script().compiled_runs(models, x, "float32")
    for label in models:
        before = counters["frames"]["ok"]
        torch.testing.assert_close(runs[label, "C++"](), models[label](x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runs[label, "Python"](), models[label](x), atol=1e-5, rtol=1e-5)
        assert counters["frames"]["ok"] - before == 2  # a compile each


def test_gains_are_medians_of_paired_ratios():
    seconds = {
        ("unpruned", "C++"): [1.0, 1.2, 1.0],
        ("unpruned", "Python"): [1.0, 1.2, 1.1],
        ("tome r=13", "C++"): [0.5, 0.4, 0.5],
        ("tome r=13", "Python"): [0.6, 0.6, 0.55],
    }
    lines = script().report(seconds, repeats=3)
    # unpruned: Python / C++ per round 1.0, 1.0, 1.1; ToMe: 1.2, 1.5, 1.1
    assert lines[1].startswith("unpruned") and "1.000x" in lines[1]
    assert lines[2].startswith("tome r=13") and "1.200x" in lines[2]
    # ToMe over unpruned per round, C++: 2.0, 3.0, 2.0; Python: 1.667, 2.0, 2.0
    assert "C++ 2.000x" in lines[4] and "Python 2.000x" in lines[4]

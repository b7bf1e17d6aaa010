"""eval/profile_compiled.py: its rows (op groups, or each inductor kernel under --kernels)."""

from __future__ import annotations

import torch
from fixtures import eval_script
from torch import nn


def profiler():
    return eval_script("profile_compiled")


def test_a_kernel_adds_up_across_graphs_and_blocks():
    script = profiler()
    assert script.kernel_name("graph_1_cpp_fused_gelu_view_7") == "cpp_fused_gelu_view"
    assert script.op_group("graph_0_cpp_fused_gelu_view_12") == "cpp_fused_gelu_view"
    assert script.op_group("## Call CompiledFxGraph abc ##") == "inductor kernels"
    assert script.op_group("aten::_scaled_dot_product_flash_attention_for_cpu") == (
        "sdpa (flash, CPU)"
    )
    assert script.op_group("tokcomp::best_match") == "tokcomp::best_match"
    assert script.op_group("mkldnn::_linear_pointwise") == "mkldnn::_linear_pointwise"
    assert script.op_group("aten::empty") == "other"


def test_kernel_profile_times_each_inductor_kernel():
    script = profiler()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * 2.0).relu().sum(dim=1), dynamic=False)
    x = torch.randn(64, 256)
    # inductor's own patch: monkeypatch's undo hides a config entry (it reads as unset)
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True}):
        compiled(x)
        rows = script.self_ms(lambda: compiled(x))
    assert any(name.startswith("cpp_fused") for name in rows), sorted(rows)
    assert all(not name.startswith("graph_") for name in rows)


def test_the_profiled_models_show_their_linear_layers():
    """Compiled with the Python wrapper: under the C++ one the profiler records no linear
    layer or attention call, only the graph's own time."""
    script = profiler()
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).eval()
    compiled = script.compiled(model, cpp_wrapper=False)
    x = torch.randn(32, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        compiled(x)
        rows = script.self_ms(lambda: compiled(x))
    assert "mkldnn::_linear_pointwise" in rows, sorted(rows)

"""ToMe on timm ViTs: faithful to the algorithm, exact at r=0, protected tokens, sizes, batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from reference_tome import tome_forward

import tokcomp
from tokcomp.ops import bipartite_plan


@torch.no_grad()
def test_r0_reproduces_unpatched_outputs(timm_variant, images):
    model = tiny_vit(timm_variant)
    expected = model(images)
    tokcomp.apply(model, "tome", r=0)
    torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [1, 5, 13])
@pytest.mark.parametrize("prop_attn", [True, False])
@torch.no_grad()
def test_matches_plain_reference_implementation(r, prop_attn, images):
    model = tiny_vit("vit")
    expected = tome_forward(model, images, r, prop_attn)
    tokcomp.apply(model, "tome", r=r, prop_attn=prop_attn)
    torch.testing.assert_close(model(images), expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_protected_tokens_never_merged_and_sizes_sum_to_input(timm_variant, images):
    model = tokcomp.apply(tiny_vit(timm_variant), "tome", r=12, trace_source=True)
    state = tokcomp.forward_tokens(model, images)
    spec_tokens = tokcomp.config_of(model).model["tokens"]
    protected = state.protected
    assert state.tokens < spec_tokens
    torch.testing.assert_close(state.size.sum(dim=1), torch.full((3,), float(spec_tokens)))
    assert torch.equal(state.size[:, :protected], torch.ones(3, protected))
    identity = torch.eye(spec_tokens)[:protected].expand(3, -1, -1)
    assert torch.equal(state.source[:, :protected], identity)
    # every input patch sits in exactly one token, and size counts its patches
    assert torch.equal(state.source.sum(dim=1), torch.ones(3, spec_tokens))
    assert torch.equal(state.source.sum(dim=2), state.size)


@torch.no_grad()
def test_each_sample_gets_the_result_it_gets_alone(timm_variant, images):
    model = tokcomp.apply(tiny_vit(timm_variant), "tome", r=9)
    batched = model(images)
    alone = torch.cat([model(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_schedule_from_int_r_clips_at_half_the_unprotected_tokens():
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=30)  # 65 tokens, 1 protected
    # 65-30=35; then (35-1)//2=17 merges -> 18; 8 -> 10; 4 -> 6
    assert tokcomp.config_of(model).schedule == [35, 18, 10, 6]


def test_schedule_with_inflection_and_list():
    model = tokcomp.apply(tiny_vit("vit"), "tome", r=6, inflection=-1)
    # ToMe's decreasing schedule: 12, 8, 4, 0 merges over 4 blocks
    assert tokcomp.config_of(model).schedule == [53, 45, 41, 41]
    tokcomp.apply(model, "tome", r=[3, 2])
    assert tokcomp.config_of(model).schedule == [62, 60, 60, 60]


def test_rejects_bad_r():
    with pytest.raises(ValueError, match="non-negative int"):
        tokcomp.apply(tiny_vit("vit"), "tome", r=-1)
    with pytest.raises(ValueError, match="the model has 4"):
        tokcomp.apply(tiny_vit("vit"), "tome", r=[1] * 5)
    with pytest.raises(ValueError, match="at most half"):
        tokcomp.apply(tiny_vit("vit"), "tome", schedule=[30, 20, 10, 5])


@pytest.mark.parametrize("protected", [0, 1, 2, 3, 4, 5])
def test_bipartite_plan_keeps_protected_tokens_first_and_in_order(protected):
    torch.manual_seed(protected)
    metric = torch.randn(2, 17, 8)
    r = (17 - protected) // 2
    plan = bipartite_plan(metric, protected, r)
    assert torch.equal(plan.keep_idx[:, :protected], torch.arange(protected).expand(2, -1))
    assert not set(plan.src_idx.flatten().tolist()) & set(range(protected))
    assert (plan.dst_pos >= protected).all()
    merged = torch.cat([plan.keep_idx, plan.src_idx], dim=1).sort(dim=1).values
    assert torch.equal(merged, torch.arange(17).expand(2, -1))  # every token placed once
    kept_b = plan.keep_idx.gather(1, plan.dst_pos)  # every source lands on a B token
    assert (kept_b % 2 == 1).all()

"""eval/probe_selection.py: its class-attention rule is EViT's ranking without the fused
token, and its garment oracle keeps the brightest input patches."""

from __future__ import annotations

import torch
from conftest import tiny_vit
from fixtures import eval_script

import tokcomp


def probe():
    return eval_script("probe_selection")


def test_attention_rule_keeps_what_evit_keeps_without_fusion():
    model = tiny_vit()
    images = torch.randn(3, 3, 32, 32)
    tokcomp.apply(model, "evit", keep_ratio=0.6, layers=[1, 2], fuse=False)
    expected = model(images)
    tokcomp.apply(
        model, probe().ScoredPrune(score=probe().class_attention, keep_ratio=0.6, layers=[1, 2])
    )
    torch.testing.assert_close(model(images), expected)


def test_garment_oracle_keeps_the_brightest_patches():
    model = tiny_vit(img_size=28, patch_size=2, in_chans=1, depth=2)
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    oracle = probe().GarmentOracle()
    oracle.brightness = probe().patch_brightness(images)
    rule = probe().ScoredPrune(score=oracle, keep_ratio=0.5, layers=[0], trace_source=True)
    tokcomp.apply(model, rule)
    state = tokcomp.forward_tokens(model, probe().normalize(images))
    kept = state.source[:, 1:, 1:].sum(1)  # (B, 196): which input patches survive
    for b in range(2):
        brightest = oracle.brightness[b].topk(98).indices
        assert set(kept[b].nonzero()[:, 0].tolist()) == set(brightest.tolist())


def test_fused_rule_folds_the_dropped_tokens_into_the_last_slot_with_their_mass():
    model = tiny_vit(img_size=28, patch_size=2, in_chans=1, depth=2)
    images = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    oracle = probe().GarmentOracle()
    oracle.brightness = probe().patch_brightness(images)
    rule = probe().ScoredPrune(
        score=oracle, keep_ratio=0.5, layers=[0], fuse=True, trace_source=True
    )
    tokcomp.apply(model, rule)
    state = tokcomp.forward_tokens(model, probe().normalize(images))
    assert state.tokens == 1 + 98
    assert state.size[:, :-1].eq(1).all() and state.size[:, -1].eq(196 - 97).all()
    fused = state.source[:, -1, 1:]  # the input patches inside the fused token
    for b in range(2):
        dimmest = (-oracle.brightness[b]).topk(196 - 97).indices
        assert set(fused[b].nonzero()[:, 0].tolist()) == set(dimmest.tolist())

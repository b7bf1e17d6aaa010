"""The analytic MACs model against torch's FLOP counter on eager-attention runs."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import tiny_siglip_with_head, tiny_vit
from open_clip.transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from vlm_fixtures import tiny_vlm

import tokcomp
from tokcomp.adapters import find_adapter
from tokcomp.schedule import model_macs


def _eager_attention(model) -> None:
    """timm's attention as explicit matmuls, which the FLOP counter sees."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False


def _counted_macs(model, images) -> float:
    """MACs per image counted by torch (FLOPs / 2), attention in its eager (math) form."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(images)
    return counter.get_total_flops() / 2 / images.shape[0]


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("deit_small_patch16_224", None),
        ("deit_small_patch16_224", {"r": 13}),
        ("deit_tiny_distilled_patch16_224", {"r": 8, "inflection": -1}),
        ("vit_base_patch16_reg4_gap_256", {"r": 16}),
    ],
)
def test_analytic_macs_within_2_percent_of_flop_counter(name, options):
    model = timm.create_model(name).eval()
    _eager_attention(model)
    size = model.pretrained_cfg["input_size"][1:]
    images = torch.randn(1, 3, *size)
    if options is None:
        analytic = model_macs(find_adapter(model).spec())
    else:
        analytic = tokcomp.config_of(tokcomp.apply(model, "tome", **options)).macs
    assert analytic == pytest.approx(_counted_macs(model, images), rel=0.02)


@pytest.mark.parametrize(
    "name",
    [
        "vit_small_patch16_224",  # Mlp
        "vit_giant_patch14_dinov2",  # GluMlp (SwiGLUPacked): fc1 holds both input projections
        "aimv2_large_patch14_224",  # SwiGLU: fc1_g, fc1_x, fc2
    ],
)
def test_analytic_mlp_macs_match_the_flop_counter_for_every_timm_mlp(name):
    model = timm.create_model(name, pretrained=False, depth=2, img_size=56).eval()
    _eager_attention(model)
    analytic = model_macs(find_adapter(model).spec())
    assert analytic == pytest.approx(_counted_macs(model, torch.randn(1, 3, 56, 56)), rel=0.02)


@pytest.mark.parametrize("pool", ["", "token", "avg"])
def test_a_timm_head_is_priced_on_every_token_it_reads(pool):
    """Without a pool (global_pool='') timm's head classifies every token; exact unpruned,
    and after pruning at the tokens left (random: no matching work the counter cannot see)."""
    model = timm.create_model(
        "vit_tiny_patch16_224", global_pool=pool, num_classes=10, img_size=32, patch_size=8
    ).eval()
    _eager_attention(model)
    images = torch.randn(1, 3, 32, 32)
    assert model_macs(find_adapter(model).spec()) == _counted_macs(model, images)
    tokcomp.apply(model, "random", keep_ratio=0.5)
    assert tokcomp.config_of(model).macs == _counted_macs(model, images)


def test_deit_small_is_4_6_gmacs():
    spec = find_adapter(timm.create_model("deit_small_patch16_224")).spec()
    assert model_macs(spec) / 1e9 == pytest.approx(4.6, abs=0.05)


def test_schedule_macs_decrease_with_fewer_tokens():
    model = tiny_vit("vit")
    ratios = []
    for r in (0, 4, 8, 16):
        ratios.append(tokcomp.config_of(tokcomp.apply(model, "tome", r=r)).macs_ratio)
    assert ratios[0] == 1.0
    assert ratios == sorted(ratios, reverse=True)


def _open_clip_attention_pool() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(
        image_size=32,
        patch_size=4,
        width=48,
        layers=4,
        heads=3,
        mlp_ratio=2.0,
        output_dim=16,
        attentional_pool=True,
        attn_pooler_queries=4,
        attn_pooler_heads=2,
    ).eval()


@pytest.mark.parametrize("build", [tiny_siglip_with_head, _open_clip_attention_pool])
def test_attention_pooling_heads_are_priced_at_the_tokens_that_reach_them(build, monkeypatch):
    """The head's keys and values are the last block's tokens (priced at the unpruned count,
    the MACs were 2% to 12% high here). ToMe's matching counted in its PyTorch reference."""
    monkeypatch.setenv("TOKCOMP_BACKEND", "reference")
    model = build()
    for method, options in [("random", {"keep_ratio": 0.5}), ("tome", {"r": 12})]:
        config = tokcomp.config_of(tokcomp.apply(model, method, **options))
        assert config.macs == pytest.approx(
            _counted_macs(model, torch.randn(1, 3, 32, 32)), rel=1e-3
        )


def test_block_method_target_macs_on_a_vlm_is_a_fraction_of_the_vlms_macs():
    """Inside LLaVA's tower: the r whose whole-model MACs ratio is nearest the target, as
    config_of reports it (not the tower's own ratio)."""
    model = tiny_vlm("llava")
    ratios = {}
    for r in range(9):
        ratios[r] = tokcomp.config_of(tokcomp.apply(model, "tome", r=r)).macs_ratio
    for target in (0.95, 0.9, 0.8):
        nearest = min(ratios, key=lambda r: abs(ratios[r] - target))
        config = tokcomp.config_of(tokcomp.apply(model, "tome", target_macs=target))
        assert config.options["r"] == nearest
        assert config.macs_ratio == ratios[nearest]


def test_tower_method_target_macs_is_refused_naming_its_budget():
    with pytest.raises(
        ValueError,
        match=r"tome: target_macs cannot be given in tower_options; give its budget \(r=",
    ):
        tokcomp.apply(
            tiny_vlm("llava"), "fastv", keep=0.5, tower="tome", tower_options={"target_macs": 0.9}
        )


def test_tome_target_macs_refuses_an_inflection_it_would_drop():
    with pytest.raises(ValueError, match="tome: target_macs chooses a constant r"):
        tokcomp.apply(tiny_vit(), "tome", target_macs=0.6, inflection=-1)

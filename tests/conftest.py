"""Shared fixtures: tiny randomly initialised timm ViTs of every supported variant."""

from __future__ import annotations

import pytest
import torch
import transformers
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

#: Methods whose result for an image depends on its row in the batch, by design: `random`
#: draws one subset per row (its own tests check that the draw is seeded and per row).
BATCH_POSITION_DEPENDENT = frozenset({"random"})

_COMMON = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=10)

#: name -> (class, extra kwargs): one entry per ViT variant the timm adapter supports.
TIMM_VARIANTS: dict[str, tuple[type, dict]] = {
    "vit": (VisionTransformer, {}),
    "deit_distilled": (VisionTransformerDistilled, {}),
    "deit3_layerscale": (VisionTransformer, {"init_values": 0.1, "no_embed_class": True}),
    "registers": (VisionTransformer, {"reg_tokens": 4}),
    "gap": (VisionTransformer, {"class_token": False, "global_pool": "avg"}),
    "registers_gap": (
        VisionTransformer,
        {"class_token": False, "reg_tokens": 4, "no_embed_class": True, "global_pool": "avg"},
    ),
    "qk_norm": (VisionTransformer, {"qk_norm": True}),
}


def tiny_vit(variant: str = "vit", seed: int = 0, **overrides) -> nn.Module:
    """A small (4 blocks, width 48, 8x8 patches) randomly initialised timm ViT in eval mode."""
    cls, extra = TIMM_VARIANTS[variant]
    torch.manual_seed(seed)
    model = cls(**{**_COMMON, **extra, **overrides}).eval()
    spread_weights(model)
    return model


def tiny_siglip_with_head() -> nn.Module:
    """A tiny HF SigLIP tower with its attention-pooling head (no class token)."""
    config = transformers.SiglipVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=3,
        image_size=32,
        patch_size=4,
    )
    torch.manual_seed(0)
    return transformers.SiglipVisionModel._from_config(config, attn_implementation="sdpa").eval()


def spread_weights(model: nn.Module) -> None:
    """timm's init makes all tokens nearly alike; larger weights make attention and
    similarity informative, so merge decisions are not decided by ties."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 and "patch_embed" not in name:
                param.normal_(0, 0.15)
            elif "pos_embed" in name or "token" in name:
                param.normal_(0, 0.5)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: they run fastest on one thread, above all on a shared
    machine (tests assert behaviour, never speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=sorted(TIMM_VARIANTS))
def timm_variant(request) -> str:
    return request.param


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


@pytest.fixture
def measured(monkeypatch) -> list[str]:
    """The descriptions of the sweep points the harness measures from now on, in order."""
    from tokcomp.harness import sweep

    descriptions, real_measure = [], sweep.measure

    def recording(model, task, device, desc, *rest):
        descriptions.append(desc)
        return real_measure(model, task, device, desc, *rest)

    monkeypatch.setattr(sweep, "measure", recording)
    return descriptions

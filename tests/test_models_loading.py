"""create_model's refusals for checkpoints and hub weights it cannot load as given."""

from __future__ import annotations

import json

import pytest
import timm
from safetensors.torch import save_file

from tokcomp.errors import UsageError
from tokcomp.models import create_model

KWARGS = {"num_classes": 3, "img_size": 32, "patch_size": 16, "depth": 1}


def _checkpoint(path):
    model = timm.create_model("vit_tiny_patch16_224", **KWARGS)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"timm_model": "vit_tiny_patch16_224", "model_kwargs": json.dumps(KWARGS)}
    save_file(state, str(path), metadata)
    return model


def test_pretrained_offline_and_uncached_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        UsageError,
        match=r"--pretrained deit_tiny_patch16_224 needs the model "
        r"timm/deit_tiny_patch16_224\.fb_in1k .* HF_HUB_OFFLINE is set.*--checkpoint",
    ):
        create_model("deit_tiny_patch16_224", pretrained=True)


def test_upper_case_suffix_reads_as_safetensors(tmp_path):
    model = _checkpoint(tmp_path / "weights.SAFETENSORS")
    loaded = create_model(checkpoint=tmp_path / "weights.SAFETENSORS")
    assert loaded.pretrained_cfg["architecture"] == "vit_tiny_patch16_224"
    for name, tensor in model.state_dict().items():
        assert loaded.state_dict()[name].equal(tensor)


def test_folder_named_like_a_checkpoint_says_folder(tmp_path):
    (tmp_path / "run.safetensors").mkdir()
    with pytest.raises(UsageError, match="is a folder; give the weights file in it"):
        create_model(checkpoint=tmp_path / "run.safetensors")

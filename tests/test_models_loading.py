"""create_model's refusals for checkpoints and hub weights it cannot load as given."""

from __future__ import annotations

import json
import socket

import pytest
import timm
from safetensors.torch import save_file

from tokcomp.errors import UsageError
from tokcomp.harness import vqa
from tokcomp.models import create_model

KWARGS = {"num_classes": 3, "img_size": 32, "patch_size": 16, "depth": 1}


def _checkpoint(path):
    model = timm.create_model("vit_tiny_patch16_224", **KWARGS)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"timm_model": "vit_tiny_patch16_224", "model_kwargs": json.dumps(KWARGS)}
    save_file(state, str(path), metadata)
    return model


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache, offline by environment and in huggingface_hub's own
    settings (read at import), and no socket may connect: these tests never reach a network,
    also when the code under test fails to stop first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))

    def connect(*args):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", connect)


def test_pretrained_offline_and_uncached_is_one_line(offline_hub):
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


def test_a_missing_two_part_model_folder_is_named_as_read_as_a_hub_id(
    offline_hub, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"--model results/vlm \(no folder results/vlm here, so"):
        vqa.model_location("results/vlm")


def test_a_relative_path_to_a_trainable_model_names_its_training_script(monkeypatch, tmp_path):
    monkeypatch.setattr(vqa, "TRAINED_BY", {(tmp_path / "vlm").resolve(): "eval/train.py"})
    (tmp_path / "vlm").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\); train it: python eval/train.py; or"):
        vqa.model_location("vlm")

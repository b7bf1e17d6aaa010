"""create_model's refusals for checkpoints and hub weights it cannot load as given."""

from __future__ import annotations

import json
import shutil
import socket
import sys
from pathlib import Path

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


def test_pretrained_and_a_checkpoint_are_refused_together(offline_hub, tmp_path):
    """The checkpoint's weights replaced timm's pretrained ones, unsaid."""
    _checkpoint(tmp_path / "weights.safetensors")
    with pytest.raises(UsageError, match="give --checkpoint or --pretrained, not both"):
        create_model(checkpoint=tmp_path / "weights.safetensors", pretrained=True)


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


def test_a_hub_folders_config_gives_its_weights_their_preprocessing(tmp_path):
    """timm's default tag of an architecture may preprocess otherwise (crop_pct 0.9 for
    deit3_small_patch16_224, 1.0 for its fb_in22k_ft_in1k weights): the folder's config.json
    was ignored."""
    model = timm.create_model("test_vit")
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))  # no tokcomp metadata
    default = timm.create_model("test_vit").pretrained_cfg
    own = {"crop_pct": 0.5, "mean": [0.1, 0.2, 0.3], "interpolation": "bilinear"}
    assert all(default.get(key) != value for key, value in own.items())
    config = {"architecture": "test_vit", "pretrained_cfg": {**own, "license": "x"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = create_model("test_vit", tmp_path / "model.safetensors").pretrained_cfg
    assert {key: loaded[key] for key in own} == own
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"config\.json \(beside checkpoint model\.safetensors"):
        create_model("test_vit", tmp_path / "model.safetensors")


def test_a_checkpoints_data_config_is_not_overridden_by_the_default_tags_test_size(tmp_path):
    """resnet10t's default tag evaluates at 224 px, crop 0.95 (test_input_size): those won
    over the checkpoint's own 160 px, crop 0.9 under timm's use_test_size."""
    from fixtures.imagenet import save_safetensors
    from timm.data import resolve_data_config

    model = timm.create_model("resnet10t")
    own = {"input_size": [3, 160, 160], "crop_pct": 0.9}
    path = save_safetensors(
        model, tmp_path / "r.safetensors", timm_model="resnet10t", data_config=own
    )
    resolved = resolve_data_config(model=create_model(checkpoint=path), use_test_size=True)
    assert (tuple(resolved["input_size"]), resolved["crop_pct"]) == ((3, 160, 160), 0.9)


def test_a_hub_folders_config_names_its_architecture_and_class_count(tmp_path):
    """Its architecture was not compared with --model (clip_224 and clip_quickgelu_224 share
    every tensor name and shape, not the activation) and its num_classes was not used."""
    model = timm.create_model("test_vit", num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    config = {"architecture": "test_vit.r160_in1k", "num_classes": 10, "pretrained_cfg": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = create_model(checkpoint=tmp_path / "model.safetensors")
    assert loaded.num_classes == 10 and loaded.pretrained_cfg["architecture"] == "test_vit"
    assert create_model("test_vit", tmp_path / "model.safetensors").num_classes == 10
    with pytest.raises(UsageError, match=r"holds timm model test_vit\.r160_in1k, not test_vit2: "):
        create_model("test_vit2", tmp_path / "model.safetensors")


def test_a_checkpoint_without_a_data_config_is_preprocessed_at_its_own_image_size(tmp_path):
    """timm keeps the default tag's 224 px when img_size is overridden: 224-px images were fed
    to a model built for 32."""
    from timm.data import resolve_data_config

    _checkpoint(tmp_path / "small.safetensors")
    model = create_model(checkpoint=tmp_path / "small.safetensors")
    assert tuple(resolve_data_config(model=model)["input_size"]) == (3, 32, 32)
    assert tuple(resolve_data_config(model=model, use_test_size=True)["input_size"]) == (3, 32, 32)


def test_converting_the_onnx_weights_without_onnx_says_what_to_install(monkeypatch, tmp_path):
    from tokcomp.pretrained import onnx_weights

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UsageError, match="needs the onnx package: pip install onnx"):
        onnx_weights(tmp_path / "model.onnx")


def test_a_vlm_folder_missing_weights_is_refused_not_run_with_random_ones(tmp_path):
    """transformers initialises missing weights at random and only prints a report."""
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(vqa.DEFAULT_MODEL, tmp_path / "vlm"))
    weights = load_file(str(folder / "model.safetensors"))
    dropped = sorted(name for name in weights if "multi_modal_projector" in name)[0]
    del weights[dropped]
    save_file(weights, str(folder / "model.safetensors"), {"format": "pt"})
    with pytest.raises(UsageError, match=rf"model {folder} lacks weights .*\(.*{dropped}"):
        vqa.load_vlm(folder)

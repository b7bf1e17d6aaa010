"""Tests for the Fashion-MNIST reader and the shipped default model (eval/models/vit-fmnist)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tokcomp.harness.fashion_mnist import (
    CLASSES,
    FashionMNIST,
    fixed_offsets,
    load_arrays,
    place_on_canvas,
    read_idx,
)

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "eval" / "models" / "vit-fmnist" / "model.safetensors"
FIRST_TRAIN_LABELS = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 0x08, 3, 2, 3, 4) + arr.tobytes())
    out = read_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_read_idx_rejects_truncated(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(struct.pack(">HBB1I", 0, 0x08, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="payload"):
        read_idx(path)


def test_missing_root_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        FashionMNIST(root=tmp_path / "nowhere", split="test")
    msg = str(info.value)
    assert "t10k-images-idx3-ubyte.gz" in msg
    assert "apt-get install -y dataset-fashion-mnist" in msg


def test_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        load_arrays(split="validation")


@pytest.mark.parametrize(("split", "count"), [("train", 60000), ("test", 10000)])
def test_arrays_shapes_and_labels(split: str, count: int) -> None:
    images, labels = load_arrays(split=split)
    assert images.shape == (count, 28, 28)
    assert labels.shape == (count,)
    assert images.dtype == np.uint8 and labels.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == [count // 10] * 10  # balanced classes


def test_dataset_items() -> None:
    ds = FashionMNIST(split="train")
    assert len(ds) == 60000
    assert len(ds.classes) == 10 and ds.classes == CLASSES
    img, label = ds[0]
    assert img.mode == "L" and img.size == (28, 28)
    assert isinstance(label, int)
    assert [ds[i][1] for i in range(10)] == FIRST_TRAIN_LABELS
    ds_t = FashionMNIST(split="test", transform=lambda im: np.asarray(im, dtype=np.float32))
    x, y = ds_t[0]
    assert x.shape == (28, 28) and x.dtype == np.float32 and 0 <= y < 10


def test_place_on_canvas_pastes_each_image_at_its_offset_on_black() -> None:
    images = torch.randint(1, 256, (3, 28, 28), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [14, 3], [7, 14]])
    placed = place_on_canvas(images, offsets, 42)
    assert placed.shape == (3, 42, 42) and placed.dtype == torch.uint8
    for image, (row, col), out in zip(images, offsets.tolist(), placed, strict=True):
        expected = torch.zeros(42, 42, dtype=torch.uint8)
        expected[row : row + 28, col : col + 28] = image
        assert torch.equal(out, expected)


def test_fixed_offsets_keep_the_image_inside_and_cover_the_range() -> None:
    offsets = fixed_offsets(5000, 42)
    assert offsets.min() == 0 and offsets.max() == 14
    assert torch.equal(fixed_offsets(3, 28), torch.zeros(3, 2).long())
    with pytest.raises(ValueError, match="at least 28"):
        fixed_offsets(1, 20)


def test_a_canvas_dataset_serves_each_image_at_its_fixed_place() -> None:
    raw = FashionMNIST(split="test")
    placed = FashionMNIST(split="test", canvas=42)
    offsets = fixed_offsets(len(raw), 42)
    assert torch.equal(offsets, fixed_offsets(len(raw), 42))  # the same every time
    for index in (0, 1, 9999):
        image, label = placed[index]
        assert image.size == (42, 42) and label == raw[index][1]
        row, col = offsets[index].tolist()
        pixels = np.asarray(image)
        np.testing.assert_array_equal(pixels[row : row + 28, col : col + 28], raw.images[index])
        assert pixels.sum() == raw.images[index].sum(dtype=np.int64)  # black elsewhere


def test_shipped_checkpoint_accuracy() -> None:
    """Load the committed model with the documented recipe; check it on 1000 test images."""
    import safetensors
    import safetensors.torch
    import timm

    assert CHECKPOINT.is_file(), f"missing {CHECKPOINT}"
    assert CHECKPOINT.stat().st_size <= 25 * 2**20
    with safetensors.safe_open(str(CHECKPOINT), "pt") as f:
        meta = f.metadata()
    model = timm.create_model(
        meta["timm_model"], pretrained=False, **json.loads(meta["model_kwargs"])
    )
    model.load_state_dict(safetensors.torch.load_file(str(CHECKPOINT)))
    model.eval()
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert float(meta["test_top1"]) >= 0.88
    cfg = json.loads(meta["data_config"])
    assert cfg["input_size"] == [1, 28, 28]
    assert model.patch_embed.num_patches + model.num_prefix_tokens == 197

    images, labels = load_arrays(split="test")
    x = torch.from_numpy(images[:1000].astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - torch.tensor(cfg["mean"]).view(1, -1, 1, 1)) / torch.tensor(cfg["std"]).view(
        1, -1, 1, 1
    )
    y = torch.from_numpy(labels[:1000].astype(np.int64))
    correct = 0
    with torch.inference_mode():
        for i in range(0, 1000, 250):
            correct += (model(x[i : i + 250]).argmax(-1) == y[i : i + 250]).sum().item()
    assert correct / 1000 > 0.85

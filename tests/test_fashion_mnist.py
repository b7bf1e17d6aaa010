"""Tests for the Fashion-MNIST reader and the shipped default model (eval/models/vit-fmnist)."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tokcomp.harness.data import limited
from tokcomp.harness.fashion_mnist import (
    CLASSES,
    FashionMNIST,
    fixed_offsets,
    load_arrays,
    place_on_canvas,
    read_idx,
)
from tokcomp.harness.imagenet import ClassificationTask, model_dataset
from tokcomp.harness.sweep import measure
from tokcomp.models import create_model

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


def test_the_shipped_checkpoint_scores_what_it_claims_when_evaluated_by_the_harness() -> None:
    """The committed model, loaded and fed as `tokcomp eval imagenet` does, on 500 test
    images spread over the set: far above chance, and its top-1 within three standard errors
    of the whole-set accuracy the training script recorded (a claim checked, not trusted)."""
    assert CHECKPOINT.stat().st_size <= 25 * 2**20
    model = create_model(checkpoint=CHECKPOINT)
    with safe_open(str(CHECKPOINT), "pt") as handle:
        metadata = handle.metadata()
    assert json.loads(metadata["classes"]) == list(CLASSES)
    assert model.patch_embed.num_patches + model.num_prefix_tokens == 197
    dataset = limited(model_dataset("fashion-mnist", model), 500)
    cpu = torch.device("cpu")
    top1 = measure(model, ClassificationTask(dataset, 100, 0, cpu), cpu, "shipped")["top1"] / 100
    claimed = float(metadata["test_top1"])
    assert top1 > 0.85
    assert abs(top1 - claimed) < 3 * math.sqrt(claimed * (1 - claimed) / len(dataset))

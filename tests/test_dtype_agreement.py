"""eval/dtype_agreement.py: the paired accuracy difference of two runs and its standard error,
and each setting run in float32 and bfloat16 on the same images."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_vit
from fixtures import eval_script
from torch.utils.data import DataLoader, TensorDataset

import tokcomp
from tokcomp.harness.sweep import Point


def script():
    return eval_script("dtype_agreement")


def test_the_paired_difference_counts_the_images_that_change():
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    first = torch.tensor([0, 1, 2, 3, 0, 1])
    second = torch.tensor([0, 1, 0, 0, 1, 2])
    result = script().Agreement.of(first, second, labels)
    assert (result.first, result.second) == pytest.approx((400 / 6, 400 / 6))
    assert (result.gained, result.lost) == (2, 2)
    change = (second == labels).float() - (first == labels).float()  # per image: -1, 0 or 1
    expected = 100 * float(change.std(unbiased=False)) / math.sqrt(len(labels))
    assert result.se == pytest.approx(expected)


def test_a_setting_runs_in_both_dtypes_and_is_removed_after():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    images, labels = torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=5)
    tokcomp.apply(model, "tome", r=2)
    with torch.inference_mode():
        exact = model(images).argmax(dim=1)
        with torch.autocast("cpu", torch.bfloat16):
            lowered = model(images).float().argmax(dim=1)
    tokcomp.remove(model)
    result = script().compare(model, Point("r=2", "tome", {"r": 2}), loader)
    assert not tokcomp.is_patched(model)
    assert result == script().Agreement.of(exact, lowered, labels)

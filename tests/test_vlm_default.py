"""The offline default VLM (eval/models/vlm-easyvqa, trained by eval/train_vlm_easyvqa.py):
it loads from its local folder with from_pretrained and answers easy-VQA."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import tokcomp
from tokcomp.harness.sweep import measure
from tokcomp.harness.vqa import DEFAULT_MODEL, VQATask
from tokcomp.harness.vqa_data import VQADataset, read_easy_vqa

WEIGHTS = DEFAULT_MODEL / "model.safetensors"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def default_vlm():
    """The default VLM and a VQA task on the first 200 easy-VQA test questions."""
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    model = LlavaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    questions = read_easy_vqa("test")[:200]
    return model, VQATask(VQADataset(questions), processor, 50, 0, CPU, ("other", "yes/no"))


@pytest.fixture(scope="module")
def unpruned(default_vlm):
    """The unpruned default VLM's figures on those questions."""
    model, task = default_vlm
    return measure(model, task, CPU, "default VLM, first 200 easy-VQA test questions")


def test_the_default_vlm_answers_easy_vqa(unpruned):
    assert WEIGHTS.stat().st_size <= 25 * 2**20
    assert unpruned["visual_tokens"] == 64  # 8x8 patches; LLaVA drops the class token
    assert unpruned["vqa"] > 85


def test_zoo_chooses_better_visual_tokens_than_random_on_the_default_vlm(default_vlm, unpruned):
    """The demo's floors, on 200 questions: ZOO at 8 of 64 visual tokens well above random
    at 8, and within 3 points of the unpruned model at 16 (the model card says why this model
    lets a selection method matter)."""
    model, task = default_vlm

    def accuracy(method: str, **options) -> float:
        tokcomp.apply(model, method, **options)
        try:
            return measure(model, task, CPU, f"default VLM, {method} {options}")["vqa"]
        finally:
            tokcomp.remove(model)

    assert accuracy("zoo", keep=0.125) > accuracy("random", keep_ratio=0.125) + 5
    assert accuracy("zoo", keep=0.25) > unpruned["vqa"] - 3

"""The offline default VLM (eval/models/vlm-easyvqa, trained by eval/train_vlm_easyvqa.py):
it loads from its local folder with from_pretrained and answers easy-VQA."""

from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

import tokcomp
from tokcomp.harness.sweep import measure
from tokcomp.harness.vqa import DEFAULT_MODEL, VQADataset, VQATask, read_easy_vqa

WEIGHTS = DEFAULT_MODEL / "model.safetensors"
CPU = torch.device("cpu")


def test_the_default_vlm_answers_easy_vqa():
    assert WEIGHTS.stat().st_size <= 25 * 2**20
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    model = LlavaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    questions = read_easy_vqa("test")[:200]
    task = VQATask(VQADataset(questions), processor, 50, 0, CPU, ("other", "yes/no"))
    figures = measure(model, task, CPU, "default VLM, first 200 easy-VQA test questions")
    assert figures["visual_tokens"] == 64  # 8x8 patches; LLaVA drops the class token
    assert figures["vqa"] > 85


def test_zoo_chooses_better_visual_tokens_than_random_on_the_default_vlm():
    """The demo's floors, on 200 questions: ZOO at 8 of 64 visual tokens well above random
    at 8, and within 3 points of the unpruned model at 16 (the model card says why this model
    lets a selection method matter)."""
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL)
    model = LlavaForConditionalGeneration.from_pretrained(DEFAULT_MODEL).eval()
    task = VQATask(VQADataset(read_easy_vqa("test")[:200]), processor, 50, 0, CPU)

    def accuracy(method: str, **options) -> float:
        tokcomp.apply(model, method, **options)
        try:
            return measure(model, task, CPU, f"default VLM, {method} {options}")["vqa"]
        finally:
            tokcomp.remove(model)

    unpruned = measure(model, task, CPU, "default VLM, unpruned")["vqa"]
    assert accuracy("zoo", keep=0.125) > accuracy("random", keep_ratio=0.125) + 5
    assert accuracy("zoo", keep=0.25) > unpruned - 3

"""The offline default VLM (eval/models/vlm-easyvqa, trained by eval/train_vlm_easyvqa.py):
it loads from its local folder with from_pretrained and answers easy-VQA."""

from __future__ import annotations

import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

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

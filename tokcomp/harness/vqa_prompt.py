"""A VQA question as a VLM's input: one user turn (the image, then the question and
lmms-eval's short-answer prompt) through the model's processor and chat template."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tokcomp.harness.data import read_image
from tokcomp.harness.vqa_data import Question

#: lmms-eval's VQAv2 post-prompt for short answers.
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def messages(question: str, post_prompt: str = POST_PROMPT) -> list[dict[str, Any]]:
    """The chat of one question: a user turn with the image, then the question and the
    post-prompt."""
    content = [{"type": "image"}, {"type": "text", "text": question + post_prompt}]
    return [{"role": "user", "content": content}]


@dataclass(frozen=True)
class Prompts:
    """Collates questions into the model's inputs through its processor and chat template."""

    processor: Any
    post_prompt: str = POST_PROMPT

    def __call__(self, questions: list[Question]) -> tuple[Mapping[str, torch.Tensor], list]:
        """(processor outputs, the questions) of one batch."""
        images = [read_image(str(q.image)).convert("RGB") for q in questions]
        texts = [
            self.processor.apply_chat_template(
                messages(q.question, self.post_prompt), add_generation_prompt=True
            )
            for q in questions
        ]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        return inputs, questions

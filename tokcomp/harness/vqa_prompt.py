"""A VQA question as a VLM's input: one user turn (the images or the video, then the question
and lmms-eval's short-answer prompt) through the model's processor and chat template. The
lmms-eval model (tokcomp.harness.lmms_model) builds its prompts here too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from tokcomp.harness.data import read_image, read_video
from tokcomp.harness.vqa_data import Question

#: lmms-eval's VQAv2 post-prompt for short answers.
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def messages(
    question: str, post_prompt: str = POST_PROMPT, images: int = 1, videos: int = 0
) -> list[dict]:
    """The chat of one question: a user turn with `images` images and `videos` videos, then the
    question and the post-prompt."""
    visual = [{"type": "image"}] * images + [{"type": "video"}] * videos
    content = [*visual, {"type": "text", "text": question + post_prompt}]
    return [{"role": "user", "content": content}]


def encode(
    processor: Any,
    texts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    answers: Sequence[str] | None = None,
    videos: Sequence[Sequence[np.ndarray]] | None = None,
) -> Mapping[str, torch.Tensor]:
    """The processor's batch (left padding as the processor's tokenizer pads) of one user turn
    per sample: its images, its videos ((frames, height, width, 3) RGB arrays), then its text
    (already followed by any post-prompt); `answers`: each sample's reply text after the
    generation prompt (to score it)."""
    videos = videos or [()] * len(texts)
    prompts = [
        processor.apply_chat_template(
            messages(text, "", len(own), len(clips)), add_generation_prompt=True
        )
        for text, own, clips in zip(texts, images, videos, strict=True)
    ]
    if answers is not None:
        prompts = [prompt + answer for prompt, answer in zip(prompts, answers, strict=True)]
    flat = [image for own in images for image in own]
    clips = [clip for own in videos for clip in own]
    # the frames are the video as given: no sampling by the video processor
    video_inputs = {"videos": clips, "do_sample_frames": False} if clips else {}
    return processor(
        images=flat or None, **video_inputs, text=prompts, padding=True, return_tensors="pt"
    )


@dataclass(frozen=True)
class Prompts:
    """Collates questions into the model's inputs through its processor and chat template."""

    processor: Any
    post_prompt: str = POST_PROMPT

    def __call__(self, questions: list[Question]) -> tuple[Mapping[str, torch.Tensor], list]:
        """(processor outputs, the questions) of one batch: each question's image, or its
        video's frames."""
        images = [
            [read_image(str(q.image)).convert("RGB")] if q.video is None else [] for q in questions
        ]
        videos = [[] if q.video is None else [read_video(q.video)] for q in questions]
        texts = [q.question + self.post_prompt for q in questions]
        return encode(self.processor, texts, images, videos=videos), questions

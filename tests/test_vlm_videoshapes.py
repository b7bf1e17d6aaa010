"""The offline default video VLM (eval/models/vlm-videoshapes, trained by
eval/train_vlm_videoshapes.py): it loads from its folder with from_pretrained and answers
video-shapes test clips in a left-padded batch, as it answers them one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

import tokcomp
from tokcomp.harness.data import read_image
from tokcomp.harness.video_shapes import write_video_shapes
from tokcomp.harness.vqa_prompt import POST_PROMPT

MODEL = Path(__file__).resolve().parents[1] / "eval" / "models" / "vlm-videoshapes"
#: 8 frames of 4 x 4 pooled tokens, then the image_newline token.
VIDEO_TOKENS = 8 * 16 + 1


@pytest.fixture(scope="module")
def video_vlm():
    processor = AutoProcessor.from_pretrained(MODEL)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(MODEL).eval()
    return model, processor


def inputs(processor, rows: list[dict]) -> dict[str, torch.Tensor]:
    """The processor's batch of `rows`: the chat template on each question (a video part, the
    question and lmms-eval's post-prompt) and each clip's frames as PIL images."""
    prompts = [
        processor.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "video"},
                        {"type": "text", "text": row["question"] + POST_PROMPT},
                    ],
                }
            ],
            add_generation_prompt=True,
        )
        for row in rows
    ]
    videos = [[read_image(path).convert("RGB") for path in row["video"]] for row in rows]
    return processor(text=prompts, videos=videos, padding=True, return_tensors="pt")


def answers(model, processor, batch: dict[str, torch.Tensor]) -> list[str]:
    return generated(model, processor, batch)[0]


def generated(model, processor, batch: dict[str, torch.Tensor]) -> tuple[list[str], list[int]]:
    """The replies to `batch`, and the visual tokens tokcomp dropped from each prompt."""
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
        )
    new = out.sequences[:, batch["input_ids"].shape[1] :]
    dropped = tokcomp.visual_tokens_dropped(out.past_key_values)
    replies = [reply.strip() for reply in processor.batch_decode(new, skip_special_tokens=True)]
    return replies, [] if dropped is None else dropped.tolist()


def test_the_video_vlm_answers_test_clips_in_a_left_padded_batch(video_vlm, tmp_path):
    model, processor = video_vlm
    assert (MODEL / "model.safetensors").stat().st_size <= 25 * 2**20
    path = write_video_shapes("test", tmp_path, clips=3, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    batch = inputs(processor, rows)
    video_tokens = (batch["input_ids"] == model.config.video_token_id).sum(dim=1)
    assert video_tokens.tolist() == [VIDEO_TOKENS] * len(rows)
    assert not batch["attention_mask"][:, 0].all()  # shorter questions are left-padded
    replies = answers(model, processor, batch)
    correct = [reply in row["answers"] for reply, row in zip(replies, rows, strict=True)]
    assert sum(correct) >= 0.85 * len(rows), list(zip(replies, rows, strict=True))
    padded = [i for i in range(len(rows)) if batch["attention_mask"][i, 0] == 0][:2]
    for i in padded:
        assert answers(model, processor, inputs(processor, [rows[i]])) == [replies[i]]


@pytest.mark.parametrize(
    "method, options",
    [("fastvid", {}), ("dycoke", {"positions": "keep"})],
    ids=["fastvid", "dycoke_keep_positions"],
)
def test_the_video_methods_prune_the_video_vlm_and_it_still_answers(
    video_vlm, tmp_path, method, options
):
    """FastVID at its default 10% and DyCoke with the kept tokens' own positions on the
    committed model (the model card shows why DyCoke's renumbering costs accuracy here)."""
    model, processor = video_vlm
    path = write_video_shapes("test", tmp_path, clips=3, seed=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokcomp.apply(model, method, **options)
    try:
        replies, dropped = generated(model, processor, inputs(processor, rows))
    finally:
        tokcomp.remove(model)
    assert len(dropped) == len(rows) and min(dropped) > 0, dropped
    correct = [reply in row["answers"] for reply, row in zip(replies, rows, strict=True)]
    assert sum(correct) >= 0.85 * len(rows), list(zip(replies, rows, strict=True))

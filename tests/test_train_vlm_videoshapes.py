"""eval/train_vlm_videoshapes.py: its packed batches (all questions of a clip in one sequence)
train each question exactly as its own single-question prompt through the processor."""

from __future__ import annotations

from argparse import Namespace

import torch
from fixtures import eval_script

from tokcomp.harness.data import read_video
from tokcomp.harness.video_shapes import make_clips

TINY = Namespace(
    image_size=64,
    patch_size=8,
    vision_width=32,
    vision_depth=2,
    text_width=48,
    text_depth=2,
    heads=2,
)


def test_the_block_mask_lets_each_question_see_the_prefix_and_itself_only():
    script = eval_script("train_vlm_videoshapes")
    blocks = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0],
            [1, 1, 0, 0, 1, 1, 0],
            [1, 0, 0, 0, 0, 0, 0],  # padding sees the first token only (no empty row)
        ],
        dtype=torch.bool,
    )
    assert torch.equal(script.block_mask(blocks), expected[None, None])


def test_a_packed_clip_gives_every_question_the_logits_of_its_own_prompt():
    """Two clips of six questions packed, padded to one length: each question's last prompt
    logits equal those of the model on that question alone (processor, pixel_values_videos)."""
    script = eval_script("train_vlm_videoshapes")
    clips = make_clips("test", 2, seed=0)
    words = script.vocabulary(script.clip_questions(make_clips("train", 50, 0)), script.SPECIAL)
    processor = script.build_processor(words, TINY.image_size, TINY.patch_size)
    torch.manual_seed(0)
    model = script.build_model(TINY, processor.tokenizer).eval()
    split = script.encode(processor, clips)
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        batch, _ = script.make_batch(split, split.by_clip, eos)
        packed = script.forward(model, batch, labels=False)[0].logits[batch.last]
        alone = []
        for clip in clips:
            video = read_video([frame.path for frame in clip.frames])
            for _, question, _ in clip.questions:
                inputs = processor(
                    text=[script.prompt(processor, question)], videos=[video], return_tensors="pt"
                )
                alone.append(model(**inputs).logits[0, -1])
    assert batch.ids.shape[1] > split.prefix + 6 * 20  # six question blocks after the video
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-5, rtol=1e-5)
    assert batch.kinds == [kind for clip in clips for kind, _, _ in clip.questions]

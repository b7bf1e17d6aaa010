"""Train tokcomp's offline default video VLM: a small LLaVA-OneVision on video-shapes (CPU).

The model is a Hugging Face LlavaOnevisionForConditionalGeneration: a SigLIP-style vision
tower (64 px frames, 8 px patches: 8 x 8 patch tokens, no class token, no pooling head),
OneVision's two-layer MLP projector, its video path (each frame's 8 x 8 tokens bilinearly
pooled to 4 x 4, the frames in order, one image_newline token after the video: 8 frames give
8 * 16 + 1 = 129 visual tokens) and a small Qwen2 decoder. The tokenizer is word-level
(eval/train_vlm_easyvqa.py's, with a <video> placeholder), the chat template LLaVA-1.5's
with "<video>\\n" for a video; with OneVision's image and video processors at 64 px it forms
a LlavaOnevisionProcessor, so

    processor = AutoProcessor.from_pretrained("eval/models/vlm-videoshapes")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained("eval/models/vlm-videoshapes")
    inputs = processor(text=prompts, videos=[frames, ...], return_tensors="pt")

Data: tokcomp.harness.video_shapes (clips of 8 easy-VQA frames, 2-4 distinct images held for
runs; six questions per clip). Training follows eval/train_vlm_easyvqa.py and reuses its
functions: each step takes --clips-per-step training clips and their questions (all, or
--questions-per-clip drawn at random), packed one sequence per clip: the prompt up to the
video once, then one block per question that sees that prefix and itself only, with the
position ids it has alone (`Batch`); the vision tower runs once per distinct source image
of the step (a random dihedral turn/flip each, which changes no answer; frames that repeat an
image get the same tokens, as in the unaugmented video); the same training-only probe on the
tower (TowerProbe; not saved); loss on the answer word and end-of-sequence token; AdamW,
warm-up then cosine, bf16 autocast, seeded. After every epoch: first-token accuracy per
question kind on --monitor test clips and a checkpoint (<out>/.train_state/last.pt) from which
the same command resumes. At the end: the model and processor (save_pretrained, safetensors;
an --out that already holds a model.safetensors is refused before any work unless --force)
and the greedy accuracy of the saved model on the test clips through the processor and
model.generate (left padding, batches), per answer type and question kind.

    OMP_WAIT_POLICY=PASSIVE nohup .venv/bin/python eval/train_vlm_videoshapes.py --force \\
        > train-videoshapes.log 2>&1 &
"""

from __future__ import annotations

import os

# Sleeping OpenMP workers on a shared machine (see eval/train_vit_fmnist.py); before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling train_vlm_easyvqa
from script_args import REPO, check_heads_divide, check_model_output, script_parser
from train_vlm_easyvqa import (
    BOS,
    EOS,
    IMAGE,
    PAD,
    UNK,
    TowerProbe,
    add_architecture_options,
    add_optimizer_options,
    add_run_options,
    augment,
    decoder_sizes,
    fit,
    seed_everything,
    tower_sizes,
    vocabulary,
    word_tokenizer,
)

from tokcomp.harness.arguments import non_negative_int, positive_int
from tokcomp.harness.data import read_video
from tokcomp.harness.video_shapes import (
    COLOURS,
    FRAMES,
    SHAPES,
    Clip,
    make_clips,
    write_video_shapes,
)
from tokcomp.harness.vqa_data import Question
from tokcomp.harness.vqa_prompt import POST_PROMPT

VIDEO = "<video>"
SPECIAL = (PAD, BOS, EOS, UNK, IMAGE, VIDEO)
#: LLaVA-1.5's conversation format, "<video>\n" for a video: "USER: <video>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] in ('image', 'video') %}"
    "{{ '<' + part['type'] + '>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the ones used for the shipped model."""
    p = script_parser(__doc__)
    p.add_argument("--out", type=Path, default=REPO / "eval" / "models" / "vlm-videoshapes")
    p.add_argument("--train-clips", type=positive_int, default=4000)
    p.add_argument(
        "--test-clips", type=positive_int, default=250, help="clips of the final evaluation"
    )
    p.add_argument("--epochs", type=positive_int, default=6)
    p.add_argument("--clips-per-step", type=positive_int, default=32)
    p.add_argument(
        "--questions-per-clip",
        type=non_negative_int,
        default=0,
        help="questions drawn per clip (0: all)",
    )
    add_optimizer_options(p)
    add_architecture_options(p)
    p.add_argument("--monitor", type=positive_int, default=150, help="test clips checked per epoch")
    add_run_options(p)
    args = p.parse_args(argv)
    check_heads_divide(p, args, "--heads", "--vision-width", "--text-width")
    check_model_output(p, args)
    return args


# -- processor, model --------------------------------------------------------------------------
def clip_questions(clips: list[Clip]) -> list[Question]:
    """The clips' questions as Question rows (for the vocabulary)."""
    return [
        Question(image=Path(), question=text, answers=(answer,))
        for clip in clips
        for _, text, answer in clip.questions
    ]


def build_processor(words: list[str], image_size: int, patch_size: int) -> LlavaOnevisionProcessor:
    """A LlavaOnevisionProcessor: the word-level tokenizer over `words` with the chat template
    above, OneVision's image processor (one `image_size` crop) and video processor at
    `image_size` px; (image_size / patch_size)^2 tokens per frame before pooling."""
    tokenizer = word_tokenizer(words, CHAT_TEMPLATE, {"image_token": IMAGE, "video_token": VIDEO})
    size = {"height": image_size, "width": image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=[[image_size, image_size]]
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast
) -> LlavaOnevisionForConditionalGeneration:
    """A fresh LLaVA-OneVision (random init from the current torch RNG state) for `tokenizer`."""
    vision = SiglipVisionConfig(**tower_sizes(args), vision_use_head=False)
    text = Qwen2Config(**decoder_sizes(args, tokenizer), max_position_embeddings=512)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1",
        image_grid_pinpoints=[[args.image_size, args.image_size]],
        tie_word_embeddings=False,
    )
    model = LlavaOnevisionForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


def prompt(processor: LlavaOnevisionProcessor, question: str) -> str:
    """The chat-template prompt of one question about one video, with lmms-eval's
    short-answer post-prompt (as the VQA harness asks it)."""
    content = [{"type": "video"}, {"type": "text", "text": question + POST_PROMPT}]
    chat = [{"role": "user", "content": content}]
    return processor.apply_chat_template(chat, add_generation_prompt=True)


# -- data --------------------------------------------------------------------------------------
@dataclass
class Split:
    """Clips encoded once: the pixels of every distinct frame image, each clip's frame rows,
    per question its prompt ids, answer id, clip and kind, each clip's questions, and each
    image's shape and colour class (for the tower probe)."""

    pixels: torch.Tensor  # (images, 3, H, W) float32, normalised
    frames: torch.Tensor  # (clips, FRAMES) rows of `pixels`
    prompts: list[list[int]]
    answers: list[int]
    owner: list[int]
    kinds: list[str]
    by_clip: list[list[int]]
    facts: torch.Tensor  # (images, 2)
    prefix: int  # prompt tokens up to the video's last placeholder, the same in every prompt


def encode(processor: LlavaOnevisionProcessor, clips: list[Clip]) -> Split:
    """Pixels of every distinct frame through the video processor, and every prompt's ids
    through the processor, as the evaluation computes them."""
    images = list(dict.fromkeys(frame for clip in clips for frame in clip.frames))
    index = {frame: i for i, frame in enumerate(images)}
    pixels = torch.cat(
        [
            processor.video_processor(
                videos=[read_video([f.path for f in images[start : start + 500]])],
                return_tensors="pt",
            )["pixel_values_videos"][0]
            for start in range(0, len(images), 500)
        ]
    )
    texts = sorted({text for clip in clips for _, text, _ in clip.questions})
    blank = read_video([clips[0].frames[0].path] * FRAMES)
    ids = processor(text=[prompt(processor, t) for t in texts], videos=[blank] * len(texts))[
        "input_ids"
    ]
    prompt_ids = dict(zip(texts, ids, strict=True))
    tokenizer = processor.tokenizer
    rows = [
        (c, kind, text, answer)
        for c, clip in enumerate(clips)
        for kind, text, answer in clip.questions
    ]
    by_clip: list[list[int]] = [[] for _ in clips]
    for number, (c, *_) in enumerate(rows):
        by_clip[c].append(number)
    facts = torch.tensor([[SHAPES.index(f.shape), COLOURS.index(f.colour)] for f in images])
    return Split(
        pixels,
        torch.tensor([[index[f] for f in clip.frames] for clip in clips]),
        [prompt_ids[text] for _, _, text, _ in rows],
        [tokenizer.convert_tokens_to_ids(answer) for *_, answer in rows],
        [c for c, *_ in rows],
        [kind for _, kind, _, _ in rows],
        by_clip,
        facts,
        max(i for i, token in enumerate(ids[0]) if token == processor.video_token_id) + 1,
    )


@dataclass
class Batch:
    """One packed sequence per clip: the shared prompt up to the video, then one block per
    question (its text, answer, eos), each block seeing the prefix and itself only and
    numbered as if it followed the video alone, so that every question is trained exactly as
    its single-question prompt at a fraction of the cost. Right-padded ids, the 4-D boolean
    attention mask, position ids, labels (answers and eos), the rows of `pixels` (the step's
    distinct images) each clip's frames use, and each question's (row, last prompt token)."""

    pixels: torch.Tensor
    frames: torch.Tensor  # (clips, FRAMES)
    ids: torch.Tensor
    mask: torch.Tensor  # (clips, 1, length, length) bool
    positions: torch.Tensor
    labels: torch.Tensor
    last: tuple[torch.Tensor, torch.Tensor]
    answers: torch.Tensor
    kinds: list[str]


def pack(split: Split, numbers: list[list[int]], eos: int) -> tuple[torch.Tensor, ...]:
    """(ids, block of each token: 0 prefix, i + 1 question i, -1 padding, positions, labels,
    (row, last prompt token) of each question) of one packed sequence per clip."""
    prefix = split.prompts[numbers[0][0]][: split.prefix]
    rows = []
    for questions in numbers:
        ids, blocks, last = list(prefix), [0] * len(prefix), []
        positions, labels = list(range(len(prefix))), [-100] * len(prefix)
        for block, n in enumerate(questions, 1):
            text = split.prompts[n][split.prefix :]
            last.append(len(ids) + len(text) - 1)
            full = [*text, split.answers[n], eos]
            ids += full
            blocks += [block] * len(full)
            positions += range(len(prefix), len(prefix) + len(full))
            labels += [-100] * len(text) + full[len(text) :]
        rows.append((ids, blocks, positions, labels, last))
    length = max(len(row[0]) for row in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    blocks = torch.full_like(ids, -1)
    positions = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, (row_ids, row_blocks, row_positions, row_labels, _) in enumerate(rows):
        for tensor, values in (
            (ids, row_ids),
            (blocks, row_blocks),
            (positions, row_positions),
            (labels, row_labels),
        ):
            tensor[r, : len(values)] = torch.tensor(values)
    last_rows = torch.tensor([r for r, row in enumerate(rows) for _ in row[4]])
    last_columns = torch.tensor([column for row in rows for column in row[4]])
    return ids, blocks, positions, labels, (last_rows, last_columns)


def block_mask(blocks: torch.Tensor) -> torch.Tensor:
    """(clips, 1, length, length) bool: each token sees the earlier tokens of the prefix and
    of its own block (a padding token sees the first token only)."""
    query, key = blocks[:, :, None], blocks[:, None, :]
    length = blocks.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = causal & ((key == 0) | (key == query)) & (query >= 0)
    mask[:, :, 0] |= query[..., 0] < 0
    return mask[:, None]


def make_batch(
    split: Split, numbers: list[list[int]], eos: int, augment_with: torch.Generator | None = None
) -> tuple[Batch, torch.Tensor]:
    """The packed batch of per-clip question numbers `numbers` (each clip's questions from
    one clip), each clip's images once (augmented with a random dihedral element per image
    when a generator is given); also the images' rows of `split`."""
    clip_frames = split.frames[[split.owner[questions[0]] for questions in numbers]]
    images, frames = clip_frames.unique(return_inverse=True)
    pixels = split.pixels[images]
    if augment_with is not None:
        pixels = augment(pixels, augment_with)
    ids, blocks, positions, labels, last = pack(split, numbers, eos)
    flat = [n for questions in numbers for n in questions]
    answers = torch.tensor([split.answers[n] for n in flat])
    kinds = [split.kinds[n] for n in flat]
    batch = Batch(pixels, frames, ids, block_mask(blocks), positions, labels, last, answers, kinds)
    return batch, images


def forward(
    model: LlavaOnevisionForConditionalGeneration, batch: Batch, labels: bool = True
) -> tuple[object, torch.Tensor]:
    """The model on a batch, its vision tower run once per distinct image: OneVision's video
    features (projected, 2 x 2 pooled) of each clip's frames, then image_newline, fill its
    video placeholders, as LlavaOnevisionModel does. Also returns the tower's last hidden
    states (images, patches, width)."""
    encoded = model.model.get_video_features(pixel_values_videos=batch.pixels[None])
    features = encoded.pooler_output[0, :-1].unflatten(0, (len(batch.pixels), -1))
    video = features[batch.frames].flatten(1, 2)  # (clips, FRAMES * pooled, width)
    newline = model.model.image_newline.expand(len(video), 1, -1)
    video = torch.cat([video, newline.to(video.dtype)], dim=1)
    embeds = model.get_input_embeddings()(batch.ids)
    placeholder = (batch.ids == model.config.video_token_id)[..., None]
    embeds = embeds.masked_scatter(placeholder, video.to(embeds.dtype))
    output = model(
        inputs_embeds=embeds,
        attention_mask=batch.mask,
        position_ids=batch.positions,
        labels=batch.labels if labels else None,
    )
    return output, encoded.hidden_states[-1]


@torch.no_grad()
def first_token_accuracy(
    model: torch.nn.Module, split: Split, eos: int, clips: int
) -> dict[str, float]:
    """Per question kind (and "all"), the share of the first `clips` clips' questions whose
    greedy first answer token is right."""
    model.eval()
    right, seen = Counter(), Counter()
    numbers = split.by_clip[: min(clips, len(split.by_clip))]
    for start in range(0, len(numbers), 16):
        batch, _ = make_batch(split, numbers[start : start + 16], eos)
        guess = forward(model, batch, labels=False)[0].logits[batch.last].argmax(-1)
        for kind, correct in zip(batch.kinds, (guess == batch.answers).tolist(), strict=True):
            for key in (kind, "all"):
                right[key] += correct
                seen[key] += 1
    model.train()
    return {key: round(right[key] / seen[key], 4) for key in seen}


@torch.no_grad()
def greedy_accuracy(
    model: LlavaOnevisionForConditionalGeneration,
    processor: LlavaOnevisionProcessor,
    rows: list[dict],
    batch_size: int = 16,
) -> dict[str, float]:
    """Per answer type, question kind and "all", the share of JSON-lines `rows` whose greedy
    answer (processor, left padding, model.generate, up to 3 new tokens) is the reference."""
    model.eval()
    right, seen = Counter(), Counter()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        inputs = processor(
            text=[prompt(processor, row["question"]) for row in chunk],
            videos=[read_video(row["video"]) for row in chunk],
            padding=True,
            return_tensors="pt",
        )
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        replies = processor.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for row, reply in zip(chunk, replies, strict=True):
            correct = reply.strip() in row["answers"]
            for key in (row["answer_type"], row["question_type"], "all"):
                right[key] += correct
                seen[key] += 1
    return {key: round(right[key] / seen[key], 4) for key in sorted(seen)}


# -- training ----------------------------------------------------------------------------------
def sample_questions(
    split: Split, clips: list[int], count: int, generator: torch.Generator
) -> list[list[int]]:
    """Per clip, `count` of its questions (0: all) in a random order."""
    chosen = []
    for clip in clips:
        numbers = split.by_clip[clip]
        picks = torch.randperm(len(numbers), generator=generator)[: count or len(numbers)]
        chosen.append([numbers[i] for i in picks.tolist()])
    return chosen


def batch_loss(
    model: torch.nn.Module,
    probe: TowerProbe,
    train: Split,
    eos: int,
    args: argparse.Namespace,
    clips: list[int],
    generator: torch.Generator,
) -> torch.Tensor:
    """The training loss on training clips `clips`: their sampled questions packed, the
    images augmented from `generator`, plus the weighted tower probe."""
    numbers = sample_questions(train, clips, args.questions_per_clip, generator)
    batch, images = make_batch(train, numbers, eos, generator)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
        output, tower_states = forward(model, batch)
        loss = output.loss
        if args.probe_weight:
            probe_loss = probe.loss(tower_states, batch.pixels, train.facts[images])
            loss = loss + args.probe_weight * probe_loss
    return loss


def main(argv: list[str] | None = None) -> None:
    """Train (or resume), write the model and processor to --out, then evaluate it greedily
    on --test-clips test clips."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    state_dir = args.out / ".train_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    train_clips = make_clips("train", args.train_clips, args.seed)
    test_clips = make_clips("test", args.test_clips, args.seed)
    words = vocabulary(clip_questions(train_clips), SPECIAL)
    processor = build_processor(words, args.image_size, args.patch_size)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    train, test = encode(processor, train_clips), encode(processor, test_clips)
    seed_everything(args.seed)
    model = build_model(args, tokenizer)
    probe = TowerProbe(args.vision_width, args.patch_size, prefix=0)
    fit(
        args,
        state_dir,
        model,
        probe,
        processor,
        len(train.by_clip),
        args.clips_per_step,
        partial(batch_loss, model, probe, train, eos, args),
        lambda: {"test_first_token": first_token_accuracy(model, test, eos, args.monitor)},
    )
    data = write_video_shapes("test", state_dir, args.test_clips, args.seed)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    began = time.perf_counter()
    accuracy = greedy_accuracy(model, processor, rows)
    print(
        json.dumps(
            {
                "greedy_test": accuracy,
                "questions": len(rows),
                "eval_s": round(time.perf_counter() - began, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

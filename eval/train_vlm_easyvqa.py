"""Train tokcomp's offline default VLM: a small LLaVA on easy-VQA (CPU).

The model is a Hugging Face LlavaForConditionalGeneration: a CLIP-style ViT vision tower
(64 px images, 8 px patches: 64 patch tokens + a class token, which LLaVA's "default" feature
strategy drops, so 64 visual tokens per image reach the language model), LLaVA's two-layer MLP
projector and a small Llama decoder. Its tokenizer is word-level, built offline from the
easy-VQA training questions and answers, the lmms-eval short-answer prompt and the chat
template's words; with a CLIP image processor at 64 px it forms a LlavaProcessor, so

    processor = AutoProcessor.from_pretrained("eval/models/vlm-easyvqa")
    model = LlavaForConditionalGeneration.from_pretrained("eval/models/vlm-easyvqa")

load it, and `tokcomp eval vqa` evaluates it exactly as it was trained: the processor's chat
template on the question plus lmms-eval's prompt (tokcomp.harness.vqa_prompt.messages).

Training: the easy-VQA train split (38,575 questions on 4,000 images). Each step takes
--images-per-step images (a random dihedral flip/rotation each, which changes no answer) and
--questions-per-image of their questions drawn at random; the vision tower runs once per image.
A training-only probe (TowerProbe) gives the tower's patch tokens a direct loss (does this
patch show the shape; if so, which shape and colour); it is not saved. (With all ~10
questions of 16 images per step the tower saw too few images: after 3 epochs the model
answered colours but never a shape. Many images with few questions each helped at the same
language-model cost; the probe made the difference: see the model card.) --drop-visual
trains on random subsets of the visual tokens (off by default: see the model card).
The loss is on the answer word and the end-of-sequence token only (the prompt is masked).
AdamW, linear warm-up then cosine decay, bf16 autocast, seeded (random, numpy, torch). After
every epoch: the first-token accuracy on --monitor test questions (monitoring only: the saved
model is the last epoch's) and a checkpoint in <out>/.train_state/last.pt, from which the same
command resumes (deleted once the model is written). The final model is written with
save_pretrained (safetensors, float32) with its processor; an --out that already holds a
model.safetensors (the shipped model's) is refused before any work unless --force.

    OMP_WAIT_POLICY=PASSIVE nohup .venv/bin/python eval/train_vlm_easyvqa.py --force \\
        > eval/models/vlm-easyvqa/.train_state/train.log 2>&1 &
"""

from __future__ import annotations

import os

# Sleeping OpenMP workers on a shared machine (see eval/train_vit_fmnist.py); before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    get_cosine_schedule_with_warmup,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import (
    MODEL_FILE,
    REPO,
    add_force_argument,
    check_heads_divide,
    check_model_output,
    finite_loss,
    non_negative_float,
    positive_float,
    refuse_ignored,
    script_parser,
    share,
)

from tokcomp.files import torch_save_whole, write_text_whole
from tokcomp.harness.arguments import non_negative_int, positive_int
from tokcomp.harness.data import read_image
from tokcomp.harness.vqa_data import Question, read_easy_vqa
from tokcomp.harness.vqa_prompt import POST_PROMPT, messages

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL = (PAD, BOS, EOS, UNK, IMAGE)
#: LLaVA-1.5's conversation format: "USER: <image>\n{text} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for part in message['content'] if part['type'] == 'image' %}{{ '<image>\\n' }}{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TEMPLATE_WORDS = ("user", "assistant", ":")
SHAPES = ("circle", "rectangle", "triangle")
#: Summed per-channel difference from the background, in normalised units, of a shape pixel.
SHAPE_THRESHOLD = 0.5
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults are the ones used for the shipped model."""
    p = script_parser(__doc__)
    p.add_argument("--out", type=Path, default=REPO / "eval" / "models" / "vlm-easyvqa")
    p.add_argument("--epochs", type=positive_int, default=20)
    p.add_argument("--images-per-step", type=positive_int, default=64)
    p.add_argument(
        "--questions-per-image",
        type=non_negative_int,
        default=2,
        help="questions drawn per image (0: all)",
    )
    add_optimizer_options(p)
    p.add_argument(
        "--drop-visual",
        type=share,
        default=0.0,
        help="share of training images whose visual tokens are cut to a random subset (0: off)",
    )
    p.add_argument(
        "--min-visual", type=positive_int, default=4, help="fewest visual tokens a cut keeps"
    )
    add_architecture_options(p)
    p.add_argument(
        "--monitor", type=positive_int, default=1000, help="test questions checked per epoch"
    )
    add_run_options(p)
    args = p.parse_args(argv)
    check_heads_divide(p, args, "--heads", "--vision-width", "--text-width")
    refuse_ignored(p, args, "--min-visual", "--drop-visual", bool(args.drop_visual))
    check_model_output(p, args)
    return args


def add_optimizer_options(p: argparse.ArgumentParser) -> None:
    """The optimiser's options (both training scripts)."""
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=share, default=0.05, help="warm-up, fraction of all steps")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.05)
    p.add_argument(
        "--probe-weight",
        type=non_negative_float,
        default=1.0,
        help="tower shape/colour loss weight (0: off)",
    )
    p.add_argument("--clip-grad", type=positive_float, default=1.0)


def add_architecture_options(p: argparse.ArgumentParser) -> None:
    """The model's size options (both training scripts)."""
    p.add_argument("--image-size", type=positive_int, default=64)
    p.add_argument("--patch-size", type=positive_int, default=8)
    p.add_argument("--vision-width", type=positive_int, default=128)
    p.add_argument("--vision-depth", type=positive_int, default=4)
    p.add_argument("--text-width", type=positive_int, default=192)
    p.add_argument("--text-depth", type=positive_int, default=4)
    p.add_argument("--heads", type=positive_int, default=4)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """Seed, threads, precision, smoke-test and restart options (both training scripts)."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--no-bf16", action="store_true", help="train in float32")
    p.add_argument(
        "--limit-steps", type=non_negative_int, default=0, help="smoke test: steps per epoch"
    )
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    add_force_argument(p)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- tokenizer, processor, model ---------------------------------------------------------------
def vocabulary(questions: list[Question], special: tuple[str, ...] = SPECIAL) -> list[str]:
    """`special` tokens first (pad 0, bos 1, eos 2, unk 3, image 4, ...), then every word of
    the questions, answers, the post-prompt and the chat template, sorted."""
    pre = pre_tokenizers.Whitespace()
    texts = [POST_PROMPT, *TEMPLATE_WORDS]
    texts += [q.question for q in questions] + [a for q in questions for a in q.answers]
    words = {word.lower() for text in texts for word, _ in pre.pre_tokenize_str(text)}
    return [*special, *sorted(words)]


def word_tokenizer(
    words: list[str], chat_template: str, placeholders: dict[str, str]
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` (lowercased, split on spaces and punctuation, <s>
    prepended, left padding, `chat_template`); `placeholders` names its visual placeholder
    tokens ({"image_token": "<image>", ...})."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, words.index(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=placeholders,
        padding_side="left",
        chat_template=chat_template,
    )


def build_processor(words: list[str], image_size: int, patch_size: int) -> LlavaProcessor:
    """A LlavaProcessor: the word-level tokenizer over `words` with LLaVA-1.5's chat template
    and a CLIP image processor at `image_size` px; one <image> placeholder per visual token."""
    fast = word_tokenizer(words, CHAT_TEMPLATE, {"image_token": IMAGE})
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=fast,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tower_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The vision tower's config sizes from the architecture options."""
    return dict(
        image_size=args.image_size,
        patch_size=args.patch_size,
        hidden_size=args.vision_width,
        intermediate_size=4 * args.vision_width,
        num_hidden_layers=args.vision_depth,
        num_attention_heads=args.heads,
    )


def decoder_sizes(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> dict:
    """The language model's config sizes (from the architecture options) and special tokens
    (`tokenizer`'s), untied embeddings."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=args.text_width,
        intermediate_size=8 * args.text_width // 3,
        num_hidden_layers=args.text_depth,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A fresh LLaVA (random init from the current torch RNG state) for `tokenizer`."""
    vision = CLIPVisionConfig(**tower_sizes(args))
    text = LlamaConfig(**decoder_sizes(args, tokenizer), max_position_embeddings=256)
    patches = (args.image_size // args.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=patches,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


# -- data --------------------------------------------------------------------------------------
@dataclass
class Split:
    """A split encoded once: per image its pixels, per question its prompt ids, answer id and
    image index, and each image's questions."""

    pixels: torch.Tensor  # (I, 3, H, W) float32, normalised
    prompts: list[list[int]]
    answers: list[int]
    owner: list[int]
    by_image: list[list[int]]
    facts: torch.Tensor  # (I, 2) shape and colour index per image, -100 where not asked
    image_token: int
    visual_tokens: int  # placeholders per prompt


def encode(processor: LlavaProcessor, questions: list[Question]) -> Split:
    """Pixels of every image and token ids of every prompt, as the evaluation computes them."""
    images = list(dict.fromkeys(q.image for q in questions))
    index = {path: i for i, path in enumerate(images)}
    pixels = torch.cat(
        [
            processor.image_processor(
                [read_image(str(p)).convert("RGB") for p in images[start : start + 500]],
                return_tensors="pt",
            )["pixel_values"]
            for start in range(0, len(images), 500)
        ]
    )
    texts = sorted({q.question for q in questions})
    template = [
        processor.apply_chat_template(messages(t), add_generation_prompt=True) for t in texts
    ]
    blank = read_image(str(images[0])).convert("RGB")
    ids = processor(images=[blank] * len(texts), text=template)["input_ids"]
    prompt = dict(zip(texts, ids, strict=True))
    tokenizer = processor.tokenizer
    answers = [tokenizer.convert_tokens_to_ids(q.answers[0]) for q in questions]
    image_token = tokenizer.convert_tokens_to_ids(IMAGE)
    by_image = defaultdict(list)
    for number, q in enumerate(questions):
        by_image[index[q.image]].append(number)
    return Split(
        pixels,
        [prompt[q.question] for q in questions],
        answers,
        [index[q.image] for q in questions],
        [by_image[i] for i in range(len(images))],
        image_facts(questions, index),
        image_token,
        ids[0].count(image_token),
    )


def image_facts(questions: list[Question], index: dict[Path, int]) -> torch.Tensor:
    """(images, 2): each image's shape and colour class as its "what ..." questions answer
    them (-100 where no question does)."""
    facts = torch.full((len(index), 2), -100, dtype=torch.long)
    for q in questions:
        answer = q.answers[0]
        if q.question.startswith("what") and answer in SHAPES + COLOURS:
            kind, classes = (0, SHAPES) if answer in SHAPES else (1, COLOURS)
            facts[index[q.image], kind] = classes.index(answer)
    return facts


class TowerProbe(torch.nn.Module):
    """Training-only head on the vision tower's patch tokens: whether each patch shows the
    shape and, for those that do, the shape and colour of the image (so each token describes
    its own patch, as a CLIP patch token mostly does, rather than the whole image). Its loss
    gives the tower a direct signal; it is not part of the saved model. See the model card."""

    def __init__(self, width: int, patch_size: int, prefix: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.prefix = prefix  # tokens before the patch tokens (CLIP's class token)
        self.linear = torch.nn.Linear(width, 1 + len(SHAPES) + len(COLOURS))

    def loss(
        self, tower_states: torch.Tensor, pixels: torch.Tensor, facts: torch.Tensor
    ) -> torch.Tensor:
        """Objectness (binary) of every patch, plus the cross-entropy of the shape and of the
        colour over the patches on the shape of the images that have them."""
        logits = self.linear(tower_states[:, self.prefix :].float())
        objectness, shape, colour = logits.split([1, len(SHAPES), len(COLOURS)], dim=-1)
        on_shape = shape_patches(pixels, self.patch_size)
        loss = F.binary_cross_entropy_with_logits(objectness[..., 0], on_shape.float())
        owner = on_shape.nonzero()[:, 0]
        for part, target in ((shape, facts[owner, 0]), (colour, facts[owner, 1])):
            loss = loss + _known_cross_entropy(part[on_shape], target)
        return loss


def shape_patches(pixels: torch.Tensor, patch_size: int, share: float = 0.25) -> torch.Tensor:
    """(images, patches) bool: patches of which at least `share` of the pixels differ from
    the background (the median colour of the image border) of (images, 3, H, W) pixels."""
    border = torch.cat([pixels[..., 0, :], pixels[..., -1, :], pixels[..., 0], pixels[..., -1]], -1)
    background = border.median(dim=-1).values[..., None, None]
    differs = ((pixels - background).abs().sum(dim=1) > SHAPE_THRESHOLD).float()
    pooled = F.avg_pool2d(differs[:, None], patch_size).flatten(1)
    return pooled >= share


def _known_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not -100 (0 when there are none)."""
    known = target != -100
    if not known.any():
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[known], target[known])


def sample_questions(
    split: Split, images: list[int], count: int, generator: torch.Generator
) -> list[list[int]]:
    """Per image, `count` of its questions drawn at random (0: all of them). Fewer questions
    per image and more images per step train the vision tower on more images for the same
    language-model cost."""
    chosen = []
    for image in images:
        numbers = split.by_image[image]
        if 0 < count < len(numbers):
            picks = torch.randperm(len(numbers), generator=generator)[:count].tolist()
            numbers = [numbers[i] for i in sorted(picks)]
        chosen.append(numbers)
    return chosen


def augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random element of the dihedral group per image: 0-3 quarter turns, then an optional
    horizontal flip (shapes and colours, hence the answers, do not change)."""
    out = []
    for image in pixels:
        turns, flip = torch.randint(0, 4, (2,), generator=generator).tolist()
        image = torch.rot90(image, turns, dims=(1, 2))
        out.append(image.flip(2) if flip % 2 else image)
    return torch.stack(out)


def visual_subsets(
    images: int, tokens: int, args: argparse.Namespace, generator: torch.Generator
) -> list[torch.Tensor]:
    """Per image the visual tokens it keeps this step, in order: all `tokens`, or for a
    share --drop-visual of the images a random subset of --min-visual to tokens - 1 of them
    (a model robust to fewer, renumbered visual tokens, and to random ones above all)."""
    kept = []
    for _ in range(images):
        keep = tokens
        if torch.rand((), generator=generator) < args.drop_visual:
            keep = int(torch.randint(args.min_visual, tokens, (), generator=generator))
        kept.append(torch.randperm(tokens, generator=generator)[:keep].sort().values)
    return kept


@dataclass
class Batch:
    """Questions of some images: right-padded ids, mask, labels (answer and eos), the row of
    each question's image in `pixels`, the position of each question's last prompt token and
    the visual tokens of its image that fill its placeholders."""

    pixels: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    owner: torch.Tensor
    last: torch.Tensor
    answers: torch.Tensor
    visual: list[torch.Tensor]


def make_batch(
    split: Split,
    images: list[int],
    eos: int,
    pixels: torch.Tensor,
    questions: list[list[int]] | None = None,
    kept: list[torch.Tensor] | None = None,
) -> Batch:
    """The batch of the questions of `images` (`pixels`: their, possibly augmented, pixels):
    all of them, or per image the question numbers in `questions`; with `kept`, each image's
    prompts hold placeholders for those of its visual tokens only (numbered consecutively,
    as a pruned prompt is)."""
    chosen = questions if questions is not None else [split.by_image[i] for i in images]
    rows = [(n, slot) for slot, numbers in enumerate(chosen) for n in numbers]
    prompts = [split.prompts[n] for n, _ in rows]
    visual = [torch.arange(split.visual_tokens)] * len(rows)
    if kept is not None:
        visual = [kept[slot] for _, slot in rows]
        pairs = zip(prompts, visual, strict=True)
        prompts = [keep_placeholders(p, split.image_token, v) for p, v in pairs]
    length = max(map(len, prompts)) + 2
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    last = torch.zeros(len(rows), dtype=torch.long)
    for row, ((n, _), prompt) in enumerate(zip(rows, prompts, strict=True)):
        full = [*prompt, split.answers[n], eos]
        ids[row, : len(full)] = torch.tensor(full)
        mask[row, : len(full)] = 1
        labels[row, len(prompt) : len(full)] = torch.tensor(full[len(prompt) :])
        last[row] = len(prompt) - 1
    answers = torch.tensor([split.answers[n] for n, _ in rows])
    owner = torch.tensor([slot for _, slot in rows])
    return Batch(pixels, ids, mask, labels, owner, last, answers, visual)


def keep_placeholders(prompt: list[int], image_token: int, kept: torch.Tensor) -> list[int]:
    """`prompt` with only the image placeholders of the `kept` visual tokens."""
    first = prompt.index(image_token)
    count = prompt.count(image_token)
    return [*prompt[:first], *[image_token] * len(kept), *prompt[first + count :]]


def forward(
    model: LlavaForConditionalGeneration, batch: Batch, labels: bool = True
) -> tuple[object, torch.Tensor]:
    """The model on a batch, its vision tower run once per image: the projected visual tokens
    of each question's image fill its placeholders, as LlavaModel does. Also returns the
    tower's last hidden states (images, tokens, width)."""
    images = model.model.get_image_features(pixel_values=batch.pixels)
    features = torch.stack(images.pooler_output)
    embeds = model.get_input_embeddings()(batch.ids)
    placeholder = (batch.ids == model.config.image_token_id)[..., None]
    tokens = torch.cat([features[o, k] for o, k in zip(batch.owner, batch.visual, strict=True)])
    tokens = tokens.to(embeds.dtype)
    embeds = embeds.masked_scatter(placeholder, tokens)
    output = model(
        inputs_embeds=embeds, attention_mask=batch.mask, labels=batch.labels if labels else None
    )
    return output, images.last_hidden_state


@torch.no_grad()
def first_token_accuracy(model: torch.nn.Module, split: Split, eos: int, limit: int) -> float:
    """Share of the first `limit` questions whose greedy first answer token is right."""
    model.eval()
    right, seen = 0, 0
    images = sorted({split.owner[n] for n in range(min(limit, len(split.owner)))})
    for start in range(0, len(images), 32):
        chunk = images[start : start + 32]
        batch = make_batch(split, chunk, eos, split.pixels[chunk])
        logits = forward(model, batch, labels=False)[0].logits
        guess = logits[torch.arange(len(batch.last)), batch.last].argmax(-1)
        right += int((guess == batch.answers).sum())
        seen += len(guess)
    model.train()
    return right / seen


# -- training ----------------------------------------------------------------------------------
def optimizer_for(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and embeddings."""
    decay, plain = [], []
    for name, param in model.named_parameters():
        (plain if param.ndim <= 1 or "embed" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))


def resume(path: Path, args: argparse.Namespace, parts: tuple) -> dict:
    """Load the checkpoint into (model, optimizer, schedule) when it was written with the
    same settings; the progress so far (epoch, elapsed, history)."""
    if not path.exists() or args.fresh:
        return {"epoch": 0, "elapsed_s": 0.0, "history": []}
    state = torch.load(path, map_location="cpu", weights_only=False)
    ignored = ("fresh", "threads", "force")
    saved = {k: v for k, v in state["args"].items() if k not in ignored}
    now = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    changed = sorted(k for k in saved if saved[k] != now.get(k))
    if changed:
        raise SystemExit(
            f"{path} was written with other settings ({', '.join(changed)}); rerun the same "
            "command or pass --fresh"
        )
    for part, name in zip(parts, ("model", "optimizer", "schedule"), strict=True):
        part.load_state_dict(state[name])
    print(f"resumed from {path} after epoch {state['epoch']}", flush=True)
    return state


def main(argv: list[str] | None = None) -> None:
    """Train (or resume), then write the model and processor to --out."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    state_dir = args.out / ".train_state"
    state_dir.mkdir(parents=True, exist_ok=True)
    train_questions, test_questions = read_easy_vqa("train"), read_easy_vqa("test")
    processor = build_processor(vocabulary(train_questions), args.image_size, args.patch_size)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    train, test = encode(processor, train_questions), encode(processor, test_questions)
    seed_everything(args.seed)
    model = build_model(args, tokenizer)
    probe = TowerProbe(args.vision_width, args.patch_size)
    fit(
        args,
        state_dir,
        model,
        probe,
        processor,
        len(train.by_image),
        args.images_per_step,
        partial(batch_loss, model, probe, train, eos, args),
        lambda: {
            f"test{args.monitor}_first_token": round(
                first_token_accuracy(model, test, eos, args.monitor), 4
            )
        },
    )


def fit(
    args: argparse.Namespace,
    state_dir: Path,
    model: torch.nn.Module,
    probe: torch.nn.Module,
    processor: ProcessorMixin,
    units: int,
    per_step: int,
    step_loss: Callable[[list[int], torch.Generator], torch.Tensor],
    monitor: Callable[[], dict[str, object]],
) -> None:
    """Train `model` and its tower `probe` together on `units` training items, `per_step` a
    step (or resume from `state_dir`/last.pt); after each epoch print and keep a record (epoch,
    mean loss, `monitor`'s entries, elapsed time) and a checkpoint; at the end write the model
    (not the probe) and `processor` to --out and the records to `state_dir`/history.json."""
    steps_per_epoch = -(-units // per_step)
    if args.limit_steps:
        steps_per_epoch = min(steps_per_epoch, args.limit_steps)
    total = args.epochs * steps_per_epoch
    # Trained together, saved and resumed together; only `model` is written at the end.
    trained = torch.nn.ModuleDict({"model": model, "probe": probe})
    optimizer = optimizer_for(trained, args)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(args.warmup * total), total)
    progress = resume(state_dir / "last.pt", args, (trained, optimizer, schedule))
    params = sum(p.numel() for p in model.parameters())
    print(
        f"vocabulary {len(processor.tokenizer)}, {params / 1e6:.2f}M parameters, "
        f"{steps_per_epoch} steps/epoch, {args.threads} threads, bf16 {not args.no_bf16}",
        flush=True,
    )
    model.train()
    for epoch in range(progress["epoch"], args.epochs):
        began = time.perf_counter()
        loss = train_epoch(
            trained, optimizer, schedule, epoch, steps_per_epoch, units, per_step, step_loss, args
        )
        monitored = monitor()
        progress["elapsed_s"] += time.perf_counter() - began
        record = {
            "epoch": epoch + 1,
            "train_loss": round(loss, 5),
            **monitored,
            "elapsed_s": round(progress["elapsed_s"], 1),
        }
        progress["history"].append(record)
        print(json.dumps(record), flush=True)
        progress["epoch"] = epoch + 1
        save_checkpoint(state_dir / "last.pt", progress, (trained, optimizer, schedule), args)
    write_model(args, state_dir, model, processor, progress)


def save_checkpoint(path: Path, progress: dict, parts: tuple, args: argparse.Namespace) -> None:
    """The run after `progress["epoch"]` epochs: what `resume` reads back."""
    state = {name: progress[name] for name in ("epoch", "elapsed_s", "history")}
    for part, name in zip(parts, ("model", "optimizer", "schedule"), strict=True):
        state[name] = part.state_dict()
    state["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    torch_save_whole(state, path)


def save_whole(out: Path, model: torch.nn.Module, processor: ProcessorMixin) -> None:
    """`model` and `processor` saved (save_pretrained) into a folder beside their files in
    `out`, then moved in one file at a time, model.safetensors last: an interrupted write
    leaves no half model in `out`, and no model file beside another run's processor."""
    staging = Path(out) / f".saving.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for file in sorted(staging.iterdir(), key=lambda file: file.name == MODEL_FILE):
            os.replace(file, Path(out) / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_model(
    args: argparse.Namespace,
    state_dir: Path,
    model: torch.nn.Module,
    processor: ProcessorMixin,
    progress: dict,
) -> None:
    """Write the trained model and `processor` to --out and the history beside the checkpoint,
    which goes: a rerun with --force trains again."""
    model.eval()
    save_whole(args.out, model, processor)
    write_text_whole(state_dir / "history.json", json.dumps(progress["history"], indent=1))
    (state_dir / "last.pt").unlink(missing_ok=True)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}; training wall time {progress['elapsed_s'] / 60:.1f} min "
        f"({params / 1e6:.2f}M parameters)",
        flush=True,
    )


def train_epoch(
    trained: torch.nn.ModuleDict,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    steps: int,
    units: int,
    per_step: int,
    step_loss: Callable[[list[int], torch.Generator], torch.Tensor],
    args: argparse.Namespace,
) -> float:
    """One pass over `units` training items, `per_step` a step, in an order seeded by the epoch
    (a resumed run repeats it exactly): `step_loss` of each step's items (drawing from the same
    generator); the mean loss."""
    generator = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
    order = torch.randperm(units, generator=generator).tolist()
    bar = tqdm(
        range(steps), desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=30, file=sys.stdout
    )
    total = 0.0
    for step in bar:
        loss = step_loss(order[step * per_step : (step + 1) * per_step], generator)
        value = finite_loss(loss.item(), f"epoch {epoch + 1}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), args.clip_grad)
        optimizer.step()
        schedule.step()
        total += value
        bar.set_postfix(loss=f"{total / (step + 1):.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
    return total / steps


def batch_loss(
    model: torch.nn.Module,
    probe: TowerProbe,
    train: Split,
    eos: int,
    args: argparse.Namespace,
    images: list[int],
    generator: torch.Generator,
) -> torch.Tensor:
    """The training loss on training images `images`: their sampled questions, augmented
    pixels and visual-token subsets drawn from `generator`, plus the weighted tower probe."""
    questions = sample_questions(train, images, args.questions_per_image, generator)
    pixels = augment(train.pixels[images], generator)
    kept = visual_subsets(len(images), train.visual_tokens, args, generator)
    batch = make_batch(train, images, eos, pixels, questions, kept)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.no_bf16):
        output, tower_states = forward(model, batch)
        loss = output.loss
        if args.probe_weight:
            loss = loss + args.probe_weight * probe.loss(tower_states, pixels, train.facts[images])
    return loss


if __name__ == "__main__":
    main()

"""The visual-token selection step: each image's budget shared over its segments (crops), the
method's choice per segment (segments of equal size, budget and projector batched in one call),
and the choices spread over the prompt's placeholders."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields, replace

import torch

from tokcomp.adapters.hf_vlm.families import Images, Segment
from tokcomp.adapters.hf_vlm.sequence import Prompt
from tokcomp.methods import VisualMethod, VisualTokens
from tokcomp.methods.visual import Selection, budget_shares


@dataclass(frozen=True)
class Choice:
    """What one image sends to the language model: ascending kept slots and their tokens."""

    slots: torch.Tensor
    embeds: torch.Tensor


def keep_all(images: Images) -> list[Choice]:
    """Every token of every image (block methods already acted inside the tower)."""
    return [Choice(torch.arange(e.shape[0], device=e.device), e) for e in images.embeds]


def choose(method: VisualMethod, images: Images, budgets: list[int] | None = None) -> list[Choice]:
    """Each image's kept slots: the method's choice in every segment with a share of the
    budget, plus the always-kept slots (those in no segment). `budgets`: tokens kept per image
    (default: the method's budget of the image's selectable tokens)."""
    shares = _budget_shares(method, images, budgets)
    groups: dict[tuple[int, int, int, tuple], list[int]] = defaultdict(list)
    for index, segment in enumerate(images.segments):
        key = (segment.visual.tokens, shares[index], segment.frames, segment.visual.projector)
        groups[key].append(index)
    chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for (_, share, frames, _), members in groups.items():
        batch = _stack([images.segments[i].visual for i in members], frames)
        selection = method.selection(batch, share) if share else _nothing(batch)
        for row, index in enumerate(members):
            chosen[index] = _row(selection, row)
    return [_image_choice(images, image, chosen) for image in range(len(images.embeds))]


def _nothing(visual: VisualTokens) -> Selection:
    """No token of any row: the choice of segments whose share of the budget is 0 (an image
    keeping fewer tokens than it has crops), which methods are not asked for."""
    return Selection(visual.outputs.new_zeros(visual.batch, 0, dtype=torch.long))


def _budget_shares(
    method: VisualMethod, images: Images, budgets: list[int] | None = None
) -> list[int]:
    """Per segment, its share of its image's budget (methods/visual.py budget_shares)."""
    by_image: dict[int, list[int]] = defaultdict(list)
    for index, segment in enumerate(images.segments):
        by_image[segment.image].append(index)
    shares = [0] * len(images.segments)
    for image, members in by_image.items():
        sizes = [images.segments[i].visual.tokens for i in members]
        frames = images.segments[members[0]].frames  # a video is one segment
        budget = (
            method.kept_of(sum(sizes), frames)
            if budgets is None
            else min(budgets[image], sum(sizes))
        )
        image_shares = budget_shares(sizes, budget)
        for index, share in zip(members, image_shares, strict=True):
            shares[index] = share
    return shares


def _stack(visuals: list[VisualTokens], frames: int) -> VisualTokens:
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(v, name) for v in visuals]
        return None if parts[0] is None else torch.cat(parts)

    def join(name: str) -> tuple[torch.Tensor, ...] | None:
        parts = [getattr(v, name) for v in visuals]
        return None if parts[0] is None else tuple(t for part in parts for t in part)

    per_image = ("text", "prompt")
    stacked = ("projector", "frames", *per_image)
    signals = {f.name: cat(f.name) for f in fields(VisualTokens) if f.name not in stacked}
    texts = {name: join(name) for name in per_image}
    return VisualTokens(projector=visuals[0].projector, frames=frames, **texts, **signals)


def with_text(images: Images, prompt: Prompt) -> Images:
    """The images with each segment given its sample's text tokens (VisualSignal.TEXT): the
    prompt's real tokens that are not image placeholders, as the language model embeds them."""
    texts = [embeds[keep] for embeds, keep in zip(prompt.embeds, prompt.text, strict=True)]
    return _per_sample(images, prompt, "text", texts)


def with_prompt(images: Images, prompt: Prompt, input_ids: torch.Tensor) -> Images:
    """The images with each segment given the token ids of its sample's text after the
    sample's last image placeholder (VisualSignal.PROMPT)."""
    columns = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = torch.where(prompt.placeholder, columns, -1).amax(dim=1, keepdim=True)
    after = prompt.text & (columns > last)
    return _per_sample(
        images, prompt, "prompt", list(input_ids[after].split(after.sum(1).tolist()))
    )


def _per_sample(images: Images, prompt: Prompt, name: str, values: list[torch.Tensor]) -> Images:
    """The images with each segment's `name` signal its sample's entry of `values`. Images fill
    the placeholders in row-major order, so an image's sample is the row of its first
    placeholder."""
    rows = prompt.placeholder.nonzero()[:, 0].tolist()
    starts = [0, *torch.tensor(images.counts()).cumsum(0).tolist()[:-1]]
    segments = [
        replace(s, visual=replace(s.visual, **{name: (values[rows[starts[s.image]]],)}))
        for s in images.segments
    ]
    return replace(images, segments=segments)


def _row(selection: Selection, row: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    outputs = None if selection.outputs is None else selection.outputs[row]
    return selection.index[row], outputs


def _image_choice(
    images: Images, image: int, chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]]
) -> Choice:
    embeds = images.embeds[image].clone()
    kept = torch.ones(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    for index, segment in enumerate(images.segments):
        if segment.image == image:
            local, outputs = chosen[index]
            kept[segment.slots] = False
            kept[segment.slots[local]] = True
            if outputs is not None:
                embeds[segment.slots[local]] = outputs.to(embeds.dtype)
    slots = kept.nonzero().squeeze(1)
    return Choice(slots, embeds[slots])


def surviving(images: Images, choices: list[Choice]) -> Images:
    """The images as their kept tokens: each image's tokens are its choice's, in order, and
    each segment holds those of its tokens that were kept (the always-kept ones stay in no
    segment)."""
    segments = []
    for segment in images.segments:
        choice = choices[segment.image]
        kept = segment.slots[torch.isin(segment.slots, choice.slots)]
        slots = torch.searchsorted(choice.slots, kept)
        visual = VisualTokens(choice.embeds[slots][None], segment.visual.projector)
        segments.append(Segment(segment.image, slots, visual))
    return Images([choice.embeds for choice in choices], segments)


def check_counts(placeholder: torch.Tensor, counts: list[int]) -> int:
    """The number of the prompts' image placeholders; ValueError unless the images' visual
    token `counts` fill them exactly."""
    total = int(placeholder.sum())
    if total != sum(counts):
        raise ValueError(
            f"Image features and image tokens do not match: the prompts hold {total} image "
            f"tokens, the images give {sum(counts)}"
        )
    return total


def place(
    placeholder: torch.Tensor, counts: list[int], choices: list[Choice]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread per-image choices over the prompt's placeholders (row-major, as the models
    scatter image features): (B, L) kept-placeholder mask and (T, D) tokens for all T
    placeholders (zeros where pruned)."""
    total = check_counts(placeholder, counts)
    tokens = choices[0].embeds.new_zeros(total, choices[0].embeds.shape[-1])
    kept = torch.zeros(total, dtype=torch.bool, device=placeholder.device)
    offset = 0
    for count, choice in zip(counts, choices, strict=True):
        tokens[offset + choice.slots] = choice.embeds
        kept[offset + choice.slots] = True
        offset += count
    mask = torch.zeros_like(placeholder)
    mask[placeholder] = kept
    return mask, tokens

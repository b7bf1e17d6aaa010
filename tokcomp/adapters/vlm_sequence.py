"""Sequence surgery for VLM visual-token pruning, independent of the model family: choose the
kept visual tokens per image, drop the others from the prompt and re-pack every sample
left-padded, number the positions, and carry what decoding needs on the generation's Cache so
later calls in the original numbering are translated to the pruned cache. Also the decoder
loop FastV needs (the pruned layers see another mask and other positions than the first K).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.methods import Method
from tokcomp.methods.visual import (
    Selection,
    VisualTokens,
    selection_of,
    selects_visual_tokens,
    visual_budget,
)
from tokcomp.ops import gather_rows

#: Attribute of the Cache object that holds a generation's Pruned bookkeeping.
_ON_CACHE = "_tokcomp_pruned"


# -- images and the choice of visual tokens -------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Visual tokens of one image chosen together with one budget share (an image, or one
    crop of an anyres image): their slots in the image's token list and what methods see."""

    image: int
    slots: torch.Tensor
    visual: VisualTokens


@dataclass(frozen=True)
class Images:
    """The visual tokens of every image of a forward, in placeholder order.

    embeds: per image, the (n_i, D) tokens that fill its placeholders. segments: the groups a
    method chooses from; slots in no segment (LLaVA-NeXT image-newline tokens) are always kept.
    placeholders: per image placeholder count when the vision tower already compressed the
    image to fewer tokens (its tokens then take the first places); None otherwise.
    """

    embeds: list[torch.Tensor]
    segments: list[Segment]
    placeholders: list[int] | None = None

    def counts(self) -> list[int]:
        """Placeholder tokens per image."""
        return self.placeholders or [e.shape[0] for e in self.embeds]


@dataclass(frozen=True)
class Choice:
    """What one image sends to the language model: ascending kept slots and their tokens."""

    slots: torch.Tensor
    embeds: torch.Tensor


def choose(method: Method, images: Images, keep: int | float | None) -> list[Choice]:
    """Each image's kept slots: the method's choice in every segment (segments of equal size and
    budget are batched in one call), plus the always-kept slots. Vision-transformer methods
    (which acted inside the tower) keep every token the tower gave."""
    if images.placeholders is not None or not selects_visual_tokens(method):
        return [Choice(torch.arange(e.shape[0], device=e.device), e) for e in images.embeds]
    shares = _budget_shares(method, images, keep)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, segment in enumerate(images.segments):
        groups[(segment.visual.tokens, shares[index])].append(index)
    chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for (_, share), members in groups.items():
        batch = _stack([images.segments[i].visual for i in members])
        selection = selection_of(method, batch, share)
        for row, index in enumerate(members):
            chosen[index] = _row(selection, row)
    return [_image_choice(images, image, chosen) for image in range(len(images.embeds))]


def _budget_shares(method: Method, images: Images, keep: int | float) -> list[int]:
    """Per segment, its share of its image's budget: split evenly over the image's segments,
    capped by each segment's size (water-filling from the smallest segment up, so what a full
    segment cannot take goes to the larger ones)."""
    by_image: dict[int, list[int]] = defaultdict(list)
    for index, segment in enumerate(images.segments):
        by_image[segment.image].append(index)
    shares = [0] * len(images.segments)
    for members in by_image.values():
        size = {i: images.segments[i].visual.tokens for i in members}
        left = visual_budget(method.name, keep, sum(size.values()))
        for position, index in enumerate(sorted(members, key=lambda i: (size[i], i))):
            shares[index] = min(size[index], -(-left // (len(members) - position)))
            left -= shares[index]
    return shares


def _stack(visuals: list[VisualTokens]) -> VisualTokens:
    def cat(name: str) -> torch.Tensor | None:
        parts = [getattr(v, name) for v in visuals]
        return None if parts[0] is None else torch.cat(parts)

    return VisualTokens(
        outputs=cat("outputs"), projector=visuals[0].projector, features=cat("features"),
        attention=cat("attention"), keys=cat("keys"),
    )  # fmt: skip


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


def place(
    placeholder: torch.Tensor, counts: list[int], choices: list[Choice]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spread per-image choices over the prompt's placeholders (row-major, as the models
    scatter image features): (B, L) kept-placeholder mask and (T, D) tokens for all T
    placeholders (zeros where pruned)."""
    total = int(placeholder.sum())
    if total != sum(counts):
        raise ValueError(
            f"Image features and image tokens do not match: the prompts hold {total} image "
            f"tokens, the images give {sum(counts)}"
        )
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


# -- re-packing and positions ---------------------------------------------------------------


@dataclass(frozen=True)
class Packing:
    """Where each sample's kept tokens go: `index` (B, Lp) original positions in order, left
    padded (pads point at 0); `mask` (B, Lp) 1 for real tokens."""

    index: torch.Tensor
    mask: torch.Tensor

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (B, Lp, ...) along the sequence."""
        return gather_rows(x, self.index)

    def gather_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(R, B, L) position rows -> (R, B, Lp)."""
        return torch.stack([self.gather(row[..., None])[..., 0] for row in positions])


def pack(keep: torch.Tensor) -> Packing:
    """Left-padded packing of the (B, L) `keep` tokens of every sample."""
    counts = keep.sum(dim=1)
    length = int(counts.max()) if keep.numel() else 0
    slot = length - counts[:, None] + keep.long().cumsum(dim=1) - 1
    rows, cols = keep.nonzero(as_tuple=True)
    index = torch.zeros(keep.shape[0], length, dtype=torch.long, device=keep.device)
    mask = torch.zeros_like(index)
    index[rows, slot[rows, cols]] = cols
    mask[rows, slot[rows, cols]] = 1
    return Packing(index, mask)


def renumber_1d(positions: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous numbering: each token moves down by the pruned tokens before it. Returns the
    (R, B, L) positions and the (B,) shift of the tokens after the prompt."""
    before = pruned.long().cumsum(dim=1) - pruned.long()
    return positions - before, pruned.long().sum(dim=1)


def renumber_mrope(
    positions: torch.Tensor, placeholder: torch.Tensor, pruned: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal-RoPE renumbering: kept image tokens keep their (t, h, w) coordinates relative
    to the image's start; the gap an image leaves (its original extent minus its kept extent)
    is closed for everything after it. The last three rows are the (t, h, w) rows."""
    shifts = torch.zeros_like(placeholder, dtype=torch.long)
    total = torch.zeros(placeholder.shape[0], dtype=torch.long, device=placeholder.device)
    spatial = positions[-3:]
    for row in range(placeholder.shape[0]):
        gap = 0
        for start, end in _runs(placeholder[row]):
            shifts[row, start:end] = gap
            run = spatial[:, row, start:end]
            kept = ~pruned[row, start:end]
            gap += int(run.max() - run[:, kept].max())
            shifts[row, end:] = gap
        total[row] = gap
    return positions - shifts, total


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D bool tensor."""
    edges = torch.diff(F.pad(flags.long(), (1, 1))).nonzero().squeeze(1).tolist()
    return list(zip(edges[::2], edges[1::2], strict=True))


# -- bookkeeping carried through generation --------------------------------------------------


@dataclass(frozen=True)
class Pruned:
    """A pruned prompt, as later calls of the same generation need it.

    length: the prompt's original length (generate keeps counting in it). mask: (B, Lp) mask
    of the pruned, left-padded prompt. shift: (B,) what positions after the prompt lose
    ("renumber"; zeros for "keep"). rope_delta: (B,) Qwen's multimodal-RoPE offset of text
    positions for calls without position ids (None for 1-D RoPE). split: the first decoder
    layer that holds the pruned prompt (FastV's K; 0 when every layer does).
    """

    length: int
    mask: torch.Tensor
    shift: torch.Tensor
    rope_delta: torch.Tensor | None
    split: int

    @property
    def pruned_length(self) -> int:
        return self.mask.shape[1]

    def attach(self, cache: object | None) -> None:
        """Keep this on the generation's cache (one per generate call, never shared)."""
        if cache is not None:
            setattr(cache, _ON_CACHE, self)

    def mask_for(self, attention_mask: torch.Tensor | None, new: int) -> torch.Tensor:
        """The 2-D mask of the pruned cache plus `new` tokens (from the original-length one)."""
        if attention_mask is None:
            tail = self.mask.new_ones(self.mask.shape[0], new)
        elif attention_mask.dim() != 2:
            raise ValueError(
                "a pruned VLM generation needs 2-D attention masks (a DynamicCache, the default); "
                "static and other compiled caches are not supported"
            )
        else:
            tail = attention_mask[:, self.length :].to(self.mask.dtype)
            if tail.shape[1] != new:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns; this generation's "
                    f"prompt had {self.length} tokens and {new} followed (pass the mask of the "
                    "whole sequence, as generate does)"
                )
        return torch.cat([self.mask, tail], dim=1)


def pruned_of(cache: object | None) -> Pruned | None:
    """The bookkeeping a pruned prefill left on `cache`, if any."""
    return getattr(cache, _ON_CACHE, None)


# -- the decoder layers (FastV) --------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Decoder layers [start, stop) and what they attend with: a 2-D mask (or None), RoPE
    position rows for the rotary embedding, and the text position row some models take."""

    start: int
    stop: int
    mask: torch.Tensor | None
    rope_positions: torch.Tensor
    text_positions: torch.Tensor | None


def check_maskable(language_model: nn.Module) -> None:
    """FastV builds masks for the pruned layers itself: refuse attention implementations
    transformers cannot build masks for, and models with sliding-window layers."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = language_model.config
    implementation = config._attn_implementation
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"fastv needs attention masks for the layers after pruning, which transformers "
            f"cannot build for attn_implementation={implementation!r}; load the model with "
            "attn_implementation='sdpa' (or 'eager') or call model.set_attn_implementation('sdpa')"
        )
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        raise ValueError("fastv supports language models with full attention in every layer")


def run_stage(
    language_model: nn.Module,
    hidden: torch.Tensor,
    stage: Stage,
    cache: object | None,
    use_cache: bool | None,
) -> torch.Tensor:
    """Run decoder layers [stage.start, stage.stop) of `language_model` on `hidden`."""
    from transformers.masking_utils import create_causal_mask

    prefill = (
        cache is None or len(cache.layers) <= stage.start or cache.get_seq_length(stage.start) == 0
    )
    mask = create_causal_mask(
        config=language_model.config,
        inputs_embeds=hidden,
        attention_mask=stage.mask,
        cache=None if prefill else cache,
        layer_idx=None if prefill else stage.start,
    )
    rope = language_model.rotary_emb(hidden, stage.rope_positions)
    for layer in language_model.layers[stage.start : stage.stop]:
        hidden = layer(
            hidden, attention_mask=mask, position_embeddings=rope,
            position_ids=stage.text_positions, cache=cache, use_cache=use_cache,
        )  # fmt: skip
    return hidden


def attention_received(
    layer: nn.Module,
    hidden: torch.Tensor,
    stage: Stage,
    language_model: nn.Module,
    queries: torch.Tensor,
) -> torch.Tensor:
    """(B, L) float32: the attention each token receives in decoder `layer` on the input
    `hidden`, averaged over heads and over the (B, L) `queries` rows; computed from the layer's
    own q/k projections with its RoPE, causal and padding masks (no eager attention needed)."""
    attn = layer.self_attn
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise ValueError(
            f"fastv computes layer attention from q_proj/k_proj; {type(attn).__name__} has no "
            "such projections"
        )
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    x = layer.input_layernorm(hidden)
    batch, length, _ = x.shape
    rows = queries.any(dim=0).nonzero().squeeze(1)
    cos, sin = language_model.rotary_emb(x, stage.rope_positions)
    q = attn.q_proj(x[:, rows]).view(batch, len(rows), -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = rotate(q, q, cos[:, rows], sin[:, rows])[0]
    k = rotate(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scaling
    valid = torch.ones(batch, length, dtype=torch.bool, device=x.device)
    if stage.mask is not None:
        valid = stage.mask.bool()
    causal = torch.arange(length, device=x.device)[None, :] <= rows[:, None]
    allowed = causal[None] & valid[:, None, :]
    probs = logits.masked_fill(~allowed[:, None], -torch.inf).softmax(dim=-1).nan_to_num(0.0)
    weights = (queries & valid)[:, rows].float()
    received = (weights[..., None] * probs.mean(dim=1)).sum(dim=1)
    return received / weights.sum(dim=1, keepdim=True)

"""Generation through a pruned prompt: the prefill packs the kept tokens and leaves a Pruned
record on the generation's Cache object (never on the model); later calls arrive in the
original numbering (generate's attention mask and position ids count the unpruned prompt) and
are translated to the pruned cache. Two generations never share a cache, so they never
interfere."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from tokcomp.adapters.hf_vlm.families import VLMFamily
from tokcomp.adapters.hf_vlm.sequence import Prompt, pack

#: Attribute of the Cache object that holds a generation's Pruned bookkeeping.
_ON_CACHE = "_tokcomp_pruned"


@dataclass(frozen=True)
class Call:
    """The inner forward's arguments that tokcomp handles itself, and the rest (kwargs)."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    cache: Any
    inputs_embeds: torch.Tensor | None
    use_cache: bool | None
    kwargs: dict[str, Any]

    def as_kwargs(self) -> dict[str, Any]:
        """Everything, as keyword arguments of the unpatched forward."""
        named = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "kwargs"}
        return {**named, **self.kwargs}

    def with_cache(self, config: Any) -> Call:
        """use_cache settled from `config`, and a fresh DynamicCache when caching without one."""
        from transformers.cache_utils import DynamicCache

        use_cache = config.use_cache if self.use_cache is None else self.use_cache
        cache = DynamicCache(config=config) if use_cache and self.cache is None else self.cache
        return replace(self, cache=cache, use_cache=use_cache)


@dataclass(frozen=True)
class Pruned:
    """A pruned prompt, as later calls of the same generation need it.

    length: the prompt's original length (generate keeps counting in it). mask: (B, Lp) mask
    of the pruned, left-padded prompt. shift: (B,) what positions after the prompt lose
    ("renumber"; zeros for "keep"). rope_delta: (B,) Qwen's multimodal-RoPE offset of text
    positions for calls without position ids (None for 1-D RoPE). split: the first decoder
    layer that holds the pruned prompt (an LLM-stage method's K; 0 when every layer does).
    dropped: (B,) visual tokens dropped from each prompt.
    """

    length: int
    mask: torch.Tensor
    shift: torch.Tensor
    rope_delta: torch.Tensor | None
    split: int
    dropped: torch.Tensor

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


def visual_tokens_dropped(cache: object | None) -> torch.Tensor | None:
    """(B,) visual tokens tokcomp dropped from each prompt in the prefill that filled `cache`
    (generate's past_key_values; an LLM-stage method: in the layers after its K); None for a
    cache no pruned prefill filled."""
    pruned = pruned_of(cache)
    return None if pruned is None else pruned.dropped


@dataclass(frozen=True)
class Packed:
    """A pruned prompt: embeddings (B, Lp, D), the mask for the language model (None when the
    caller gave none and nothing was dropped), positions (R, B, Lp) and the bookkeeping."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor
    pruned: Pruned


def prune_prompt(
    family: VLMFamily, prompt: Prompt, kept: torch.Tensor, positions: str, split: int
) -> Packed:
    """Drop the placeholders not `kept` (and padding), re-pack left-padded, number positions
    ("keep" or "renumber") and record what decoding needs."""
    keep = prompt.text | kept
    packing = pack(keep)
    numbered, shift = prompt.positions, keep.new_zeros(keep.shape[0], dtype=torch.long)
    dropped = prompt.placeholder & ~kept
    if positions == "renumber":
        numbered, shift = family.renumber(numbered, prompt.placeholder, dropped)
    pruned = Pruned(
        length=keep.shape[1],
        mask=packing.mask,
        shift=shift,
        rope_delta=family.rope_delta(prompt.positions, prompt.valid),
        split=split,
        dropped=(dropped & prompt.valid).sum(dim=1),
    )
    untouched = prompt.mask is None and bool(keep.all())
    return Packed(
        packing.gather(prompt.embeds),
        None if untouched else packing.mask,
        packing.gather_positions(numbered),
        pruned,
    )


def decode_positions(
    family: VLMFamily, pruned: Pruned, call: Call, count: int, new: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(original, shifted) (R, B, count) positions of the `count` tokens of a later call, `new`
    tokens after the prompt: given by the caller, or counted on from the prompt's length."""
    batch = pruned.mask.shape[0]
    if call.position_ids is None:
        past = pruned.length + new
        steps = torch.arange(past, past + count, device=pruned.mask.device).expand(batch, -1)
        original = family.decode_positions(call.attention_mask, steps, pruned.rope_delta)
    else:
        original = family.given_positions(call.position_ids, batch)
    return original, original - pruned.shift[:, None]


def inner_output(output: Any) -> Any:
    """The language model's output as the VLM's inner model returns it."""
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast

    return MultimodalBaseModelOutputWithPast(
        last_hidden_state=output.last_hidden_state,
        cache=output.cache,
        hidden_states=output.hidden_states,
        attentions=output.attentions,
    )

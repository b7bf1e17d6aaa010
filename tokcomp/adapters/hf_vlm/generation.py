"""Generation through a pruned prompt: the prefill packs the kept tokens and leaves a Pruned
record on the generation's Cache object (never on the model); later calls arrive in the
original numbering (generate's attention mask and position ids count the unpruned prompt) and
are translated to the pruned cache. Two generations never share a cache, so they never
interfere. generate's copies of a prompt (beams, several sequences) are made after the prefill,
which runs once per prompt."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from tokcomp.adapters.hf_vlm.families import VLMFamily
from tokcomp.adapters.hf_vlm.sequence import Packing, Prompt, pack, right_padded

#: How a later call on a pruned cache is made (said where one is not).
FOLLOW_THE_CACHE = (
    "pass only the tokens after those the cache holds (its prompt's kept tokens, fewer than the "
    "prompt: to continue a generation, its last token, not the whole sequence) with the mask "
    "of the whole sequence, as generate does"
)
#: Attribute of the Cache object that holds a generation's Pruned bookkeeping.
_ON_CACHE = "_tokcomp_pruned"
#: generate's keyword (set when it copies prompts with images or videos) telling the prefill how
#: many copies of each prompt follow one another in the batch.
COPIES = "tokcomp_copies"


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

    def once_per(self, copies: int) -> Call:
        """This call on the first of each `copies` consecutive copies of a prompt (the rows
        `copied_rows` made)."""
        rows = self.input_ids.shape

        def first(value: Any, name: str = "") -> Any:
            return first_copies(value, rows, copies, name)

        return replace(
            self,
            input_ids=first(self.input_ids),
            attention_mask=first(self.attention_mask),
            position_ids=first(self.position_ids, "position_ids"),
            inputs_embeds=first(self.inputs_embeds),
            kwargs={name: first(value, name) for name, value in self.kwargs.items()},
        )

    def uses_cache(self, config: Any) -> bool:
        """Whether this call keeps a cache (its use_cache, else the language model's `config`)."""
        return config.use_cache if self.use_cache is None else self.use_cache

    def with_cache(self, config: Any) -> Call:
        """use_cache settled from `config`, and a fresh DynamicCache when caching without one."""
        from transformers.cache_utils import DynamicCache

        use_cache = self.uses_cache(config)
        cache = DynamicCache(config=config) if use_cache and self.cache is None else self.cache
        return replace(self, cache=cache, use_cache=use_cache)


@dataclass(frozen=True)
class Span:
    """Decoder layers from `start` up to the next span's start (or the last layer) and the
    prompt they hold in the cache: `mask` (B, Lp) of that prompt, padded on the side the
    caller's prompt was (left, or right for a right-padded prompt), and `shift`
    (B,), what positions after the prompt lose there ("renumber"; zeros for "keep")."""

    start: int
    mask: torch.Tensor
    shift: torch.Tensor

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def mask_for(self, attention_mask: torch.Tensor | None, prompt: int, new: int) -> torch.Tensor:
        """The 2-D mask of this span's cache plus `new` tokens, from the mask of the whole
        original-length sequence (`prompt` tokens, then the new ones)."""
        if attention_mask is None:
            tail = self.mask.new_ones(self.mask.shape[0], new)
        elif attention_mask.dim() != 2:
            raise ValueError(
                "a pruned VLM generation needs 2-D attention masks (a DynamicCache, the default); "
                "static and other compiled caches are not supported"
            )
        else:
            tail = attention_mask[:, prompt:].to(self.mask.dtype)
            if tail.shape[1] != new:
                raise ValueError(
                    f"attention_mask has {attention_mask.shape[1]} columns, but this "
                    f"generation's prompt had {prompt} tokens and {new} follow, this call's "
                    f"included: {FOLLOW_THE_CACHE}"
                )
        return torch.cat([self.mask, tail], dim=1)


@dataclass
class Decoding:
    """The per-sample state of decode-time pruning of one generation (made by its prefill, so
    reset with every prompt): the cached prompt's video tokens `video` (B, P), and, once a
    decoding step ran, its new token's attention over the prompt (B, P) and the prompt
    positions the later layers attended to (B, P)."""

    video: torch.Tensor
    attention: torch.Tensor | None = None
    kept: torch.Tensor | None = None

    def selected(self, rows: torch.Tensor) -> Decoding:
        """The state of the sequences that the (B',) index `rows` picks, row by row."""

        def pick(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.index_select(0, rows.to(value.device))

        return Decoding(pick(self.video), pick(self.attention), pick(self.kept))


@dataclass(frozen=True)
class Pruned:
    """A pruned prompt, as later calls of the same generation need it.

    length: the prompt's original length (generate keeps counting in it). spans: the decoder
    layers grouped by the prompt their cache holds, in order (one span from layer 0 when the
    choice came before the language model). rope_delta: (B,) Qwen's multimodal-RoPE offset of
    text positions for calls without position ids (None for 1-D RoPE). dropped: (B,) visual
    tokens dropped from each prompt by the last span. decoding: the state of a method that
    prunes the cache while decoding (DyCoke), None for the others.
    """

    length: int
    spans: tuple[Span, ...]
    rope_delta: torch.Tensor | None
    dropped: torch.Tensor
    decoding: Decoding | None = None

    def attach(self, cache: object | None) -> None:
        """Keep this on the generation's cache (one per generate call, never shared)."""
        if cache is not None:
            setattr(cache, _ON_CACHE, self)

    def copied(self, copies: int) -> Pruned:
        """The record of a batch holding each of these prompts `copies` times in a row."""

        def rows(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value.repeat_interleave(copies, dim=0)

        spans = tuple(replace(s, mask=rows(s.mask), shift=rows(s.shift)) for s in self.spans)
        decoding = self.decoding
        if decoding is not None:  # each copy starts from its prompt's state
            prompts = torch.arange(self.dropped.shape[0], device=self.dropped.device)
            decoding = decoding.selected(rows(prompts))
        return replace(
            self,
            spans=spans,
            rope_delta=rows(self.rope_delta),
            dropped=rows(self.dropped),
            decoding=decoding,
        )

    def reordered(self, rows: torch.Tensor) -> Pruned:
        """The record after generate reorders its beams (row i goes on from row rows[i]): the
        state of decode-time pruning follows its sequence; the rest is per prompt, the same for
        all of a prompt's beams."""
        if self.decoding is None:
            return self
        return replace(self, decoding=self.decoding.selected(rows))

    def new_tokens(self, cache: Any) -> int:
        """Tokens the generation added after the prompt, as `cache` holds them."""
        last = self.spans[-1]
        return cache.get_seq_length(last.start) - last.length


def pruned_of(cache: object | None) -> Pruned | None:
    """The bookkeeping a pruned prefill left on `cache`, if any."""
    return getattr(cache, _ON_CACHE, None)


def visual_tokens_dropped(cache: object | None) -> torch.Tensor | None:
    """(B,) visual tokens tokcomp dropped from each prompt in the prefill that filled `cache`
    (generate's past_key_values, a row per beam or sequence; an LLM-stage method: in the layers
    after its K); None for a cache no pruned prefill filled."""
    pruned = pruned_of(cache)
    return None if pruned is None else pruned.dropped


def copied_rows(value: Any, rows: torch.Size, copies: int, name: str = "") -> Any:
    """generate's copies of a keyword for `copies` sequences per prompt: a tensor aligned with
    the (B, L) `rows` of input_ids (masks, token types, embeddings; position_ids, whose batch
    is dim 1 where it has 3 dims) repeated row by row, anything else (images, videos, their
    sizes and grids) left per prompt, for the prefill to use once."""
    dim = _row_dim(value, rows, name)
    return value if dim is None else value.repeat_interleave(copies, dim=dim)


def first_copies(value: Any, rows: torch.Size, copies: int, name: str = "") -> Any:
    """What `copied_rows` copied, back to one row per prompt (`rows` counts the copies)."""
    dim = _row_dim(value, rows, name)
    if dim is None:
        return value
    return value.unflatten(dim, (-1, copies)).select(dim + 1, 0)


def _row_dim(value: Any, rows: torch.Size, name: str) -> int | None:
    """The batch dimension of a keyword aligned with input_ids' (B, L) `rows`, else None."""
    if not isinstance(value, torch.Tensor):
        return None
    if name == "position_ids" and value.dim() == 3:
        return 1 if value.shape[1:] == rows else None
    return 0 if value.dim() >= 2 and value.shape[:2] == rows else None


@dataclass(frozen=True)
class Cut:
    """A prompt after dropping visual tokens: the pruned prompt (its embeddings, placeholders,
    real tokens, positions and the language model's mask), what its positions lost against
    the input prompt's (`shift`, (B,)), the visual tokens dropped (`dropped`, (B,)) and where
    the kept tokens went (`packing`)."""

    prompt: Prompt
    shift: torch.Tensor
    dropped: torch.Tensor
    packing: Packing

    def carried(self, flags: torch.Tensor) -> torch.Tensor:
        """(B, Lp) the (B, L) bool `flags` of the input prompt's tokens at their places in the
        pruned prompt (False on padding)."""
        return self.packing.gather(flags[..., None])[..., 0] & self.prompt.valid


def cut_prompt(family: VLMFamily, prompt: Prompt, kept: torch.Tensor, positions: str) -> Cut:
    """Drop the placeholders not `kept` (and padding), re-pack on the side the prompt is padded
    (left; right for a right-padded prompt, so that a forward's outputs keep the caller's
    layout) and number positions ("keep" or "renumber")."""
    keep = prompt.text | kept
    packing = pack(keep, right=right_padded(prompt.valid))
    numbered, shift = prompt.positions, keep.new_zeros(keep.shape[0], dtype=torch.long)
    dropped = prompt.placeholder & ~kept
    if positions == "renumber":
        numbered, shift = family.renumber(numbered, prompt.placeholder, dropped)
    untouched = prompt.mask is None and bool(keep.all())
    pruned = Prompt(
        embeds=packing.gather(prompt.embeds),
        placeholder=packing.gather(prompt.placeholder[..., None])[..., 0] & packing.mask.bool(),
        valid=packing.mask.bool(),
        positions=packing.gather_positions(numbered),
        mask=None if untouched else packing.mask,
        bidirectional=prompt.bidirectional,
        injected=None if prompt.injected is None else packing.gather(prompt.injected),
    )
    return Cut(pruned, shift, (dropped & prompt.valid).sum(dim=1), packing)


def pruned_record(
    family: VLMFamily, prompt: Prompt, spans: list[Span], dropped: torch.Tensor
) -> Pruned:
    """What decoding needs of a prefill of the original `prompt` whose decoder layers hold
    the prompts of `spans`."""
    return Pruned(
        length=prompt.positions.shape[-1],
        spans=tuple(spans),
        rope_delta=family.rope_delta(prompt.positions, prompt.valid),
        dropped=dropped,
    )


def decode_positions(
    family: VLMFamily, pruned: Pruned, call: Call, count: int, new: int
) -> torch.Tensor:
    """(R, B, count) positions, in the original numbering, of the `count` tokens of a later
    call `new` tokens after the prompt: given by the caller, or counted on from the prompt."""
    device, batch = pruned.dropped.device, pruned.dropped.shape[0]
    past = pruned.length + new
    steps = torch.arange(past, past + count, device=device).expand(batch, -1)
    if call.position_ids is None:
        return family.decode_positions(call.attention_mask, steps, pruned.rope_delta)
    given = family.given_positions(call.position_ids, batch)
    # without a mask (no padding: generate drops an all-ones one) the positions are the count
    # of the tokens before; a 1-D position behind it repeats tokens the cache already holds
    if call.attention_mask is None and given.shape[0] == 1 and bool((given[0, :, 0] < past).any()):
        raise ValueError(
            f"this call's tokens start at position {int(given[0, :, 0].min())}, but the pruned "
            f"cache holds the generation's first {past}: {FOLLOW_THE_CACHE}"
        )
    return given


def inner_output(output: Any) -> Any:
    """The language model's output as the VLM's inner model returns it."""
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast

    return MultimodalBaseModelOutputWithPast(
        last_hidden_state=output.last_hidden_state,
        cache=output.cache,
        hidden_states=output.hidden_states,
        attentions=output.attentions,
    )

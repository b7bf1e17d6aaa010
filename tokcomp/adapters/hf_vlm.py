"""Hugging Face (transformers v5) vision-language models: LLaVA-1.5, LLaVA-NeXT (anyres), Qwen2-VL
and Qwen2.5-VL (multimodal RoPE), Idefics3 and SmolVLM.

Visual-token methods (zoo, divprune, visionzip, random: before the language model; fastv:
inside it) choose per image which visual tokens the language model sees; the prompt is then
re-packed without the others, for any batch (left padding, prompts of different lengths,
different numbers of images) and through generate's KV cache. Vision-transformer methods
(tome, pitome, ...) act inside the vision tower of LLaVA-1.5 through the hf_vision adapter;
the image's tokens then take its first placeholders.

Positions. 1-D RoPE (LLaVA, LLaVA-NeXT, Idefics3, SmolVLM): the prompt's position ids (given,
as generate gives them, or the model's default) are gathered for the kept tokens
(positions="keep") or each token moves down by the pruned tokens before it ("renumber").
Multimodal RoPE (Qwen2-VL, Qwen2.5-VL): the (t, h, w) ids of the whole prompt come first
(given, or the model's get_rope_index), then the kept columns are gathered ("keep"), or the gap
each image's pruned extent leaves is closed for what follows ("renumber"; kept image tokens keep
their grid coordinates).

Cache. The prefill leaves a Pruned record on the generation's Cache object (never on the
model): later calls arrive in the original numbering (generate's attention mask and position
ids count the unpruned prompt) and are translated: the mask becomes the pruned prompt's mask
plus the new columns, positions lose the sample's shift ("renumber"), and calls without
position ids get them from the cache length (Qwen: plus the prompt's RoPE delta). FastV's first
K layers cache the whole prompt and attend with the original mask and positions; the other
layers cache the pruned prompt. Two generations never share a cache, so they never interfere.

Logits and hidden states of a prefill cover the pruned prompt. Models are recognised by class
name, so `import tokcomp` does not import transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from tokcomp.adapters.base import Adapter, Compression
from tokcomp.adapters.hf_vision import HFVisionAdapter, _lookup
from tokcomp.adapters.vlm_families import FAMILIES, FAMILY, Family, VLMSpec
from tokcomp.adapters.vlm_sequence import (
    Images,
    Pruned,
    Segment,
    Stage,
    attention_received,
    check_maskable,
    choose,
    pack,
    place,
    pruned_of,
    run_stage,
)
from tokcomp.methods import Method, TokenState
from tokcomp.methods.visual import (
    VisualSignal,
    selects_visual_tokens,
    visual_keep,
    visual_positions,
)

# -- the adapter -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TowerPatch:
    """The vision-tower patch of a vision-transformer method (what api.Patch is to a model)."""

    adapter: HFVisionAdapter
    compression: Compression


class HFVLMAdapter(Adapter):
    """Patches the VLM's inner model: its forward (visual-token selection, sequence surgery,
    cache translation) and get_image_features (the vision hidden states a method needs)."""

    family = FAMILY
    supported = (
        "Hugging Face VLMs LlavaForConditionalGeneration (LLaVA-1.5), "
        "LlavaNextForConditionalGeneration, Qwen2VLForConditionalGeneration, "
        "Qwen2_5_VLForConditionalGeneration, Idefics3ForConditionalGeneration and "
        "SmolVLMForConditionalGeneration"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.vlm = _lookup(model, FAMILIES)(model)
        self.tower_patch: _TowerPatch | None = None

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return _lookup(model, FAMILIES) is not None

    def spec(self) -> VLMSpec:
        return self.vlm.spec()

    def overrides(self) -> list[tuple[nn.Module, str, str]]:
        inner = self.vlm.inner
        return [(inner, "forward", "forward"), (inner, "get_image_features", "get_image_features")]

    def install(self, patch: Any) -> None:
        """Patch the inner model; a vision-transformer method also patches the vision tower."""
        super().install(patch)
        compression = patch.compression
        if not selects_visual_tokens(compression.method):
            tower = self.vlm.tower
            spec = compression.spec.tower()
            tower_compression = Compression(compression.method, compression.schedule, spec)
            self.tower_patch = _TowerPatch(HFVisionAdapter(tower), tower_compression)
            self.tower_patch.adapter.install(self.tower_patch)

    def uninstall(self) -> None:
        super().uninstall()
        if self.tower_patch is not None:
            self.tower_patch.adapter.uninstall()
            self.tower_patch = None

    def forward_tokens(self, compression: Compression, *args: Any, **kwargs: Any) -> TokenState:
        raise ValueError(
            "forward_tokens runs a vision encoder's trunk; a VLM returns its language model's "
            "outputs: call the model (or generate) instead"
        )

    # -- the patched methods -------------------------------------------------------------------
    def get_image_features(self, compression: Compression, *args: Any, **kwargs: Any) -> Any:
        """The model's own get_image_features, with the vision hidden states the method needs."""
        return self.vlm.encode(args, kwargs, _needs(compression.method))

    def forward(
        self,
        compression: Compression,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        mm_encoder_outputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """The inner model's forward on the pruned sequence: a prefill with images chooses and
        packs; a later call on a cache it filled is translated to the pruned cache."""
        images = {name: kwargs.pop(name) for name in self.vlm.image_inputs if name in kwargs}
        if images.get("pixel_values_videos") is not None:
            raise ValueError("tokcomp prunes image tokens; video inputs are not supported")
        encoded = (mm_encoder_outputs or {}).get("image")
        with_images = images.get("pixel_values") is not None or encoded is not None
        call = _Call(
            input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache, kwargs
        )
        pruned = pruned_of(cache)
        if pruned is not None and not with_images:
            return self._decode(compression, pruned, call)
        if not with_images:
            return type(self.vlm.inner).forward(self.vlm.inner, **call.as_kwargs(), **images)
        if encoded is None:
            inputs = {name: images.get(name) for name in self.vlm.encoder_inputs}
            encoded = self.get_image_features(compression, **_present(inputs))
        return self._prefill(compression, call, images, encoded)

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(
        self, compression: Compression, call: _Call, images: dict[str, Any], encoded: Any
    ) -> Any:
        vlm, method = self.vlm, compression.method
        if call.input_ids is None:
            raise ValueError(
                "tokcomp finds the image placeholders by their token id: pass input_ids, not "
                "inputs_embeds, with the images"
            )
        if call.cache is not None and call.cache.get_seq_length() > 0:
            raise ValueError("images can be given only with an empty cache (in the prefill)")
        call = call.with_cache(vlm.language_model.config)
        found = vlm.images(encoded, images, _needs(method), compression.spec.visual_tokens)
        sequence = _Sequence.start(vlm, call, images)
        if getattr(method, "stage", "projector") == "llm":  # FastV
            return self._fastv_prefill(method, call, sequence, found)
        keep = visual_keep(method) if selects_visual_tokens(method) else None
        kept, tokens = place(sequence.placeholder, found.counts(), choose(method, found, keep))
        packed = self._pack(method, sequence.filled(tokens), kept, split=0)
        output = vlm.language_model(
            inputs_embeds=packed.embeds, attention_mask=packed.mask,
            position_ids=vlm.llm_positions(packed.positions), cache=call.cache,
            use_cache=call.use_cache, **call.kwargs,
        )  # fmt: skip
        packed.pruned.attach(call.cache)
        return _wrap(output)

    def _fastv_prefill(
        self, method: Method, call: _Call, sequence: _Sequence, found: Images
    ) -> Any:
        """Layers 0..K-1 on the whole prompt, FastV's choice from layer K-1's attention, the
        other layers on the pruned prompt."""
        vlm, language = self.vlm, self.vlm.language_model
        _check_fastv_call(language, call.kwargs)
        sequence = sequence.filled(torch.cat(found.embeds))
        rope, text = vlm.split_positions(sequence.positions)
        layer = method.layer
        before = Stage(0, layer - 1, sequence.mask, rope, text)
        hidden = run_stage(language, sequence.embeds, before, call.cache, call.use_cache)
        queries = _queries(method.query, sequence)
        scores = attention_received(language.layers[layer - 1], hidden, before, language, queries)
        last = Stage(layer - 1, layer, sequence.mask, rope, text)
        hidden = run_stage(language, hidden, last, call.cache, call.use_cache)
        scored = _scored(found, scores[sequence.placeholder])
        kept, _ = place(sequence.placeholder, found.counts(), choose(method, scored, method.keep))
        packed = self._pack(method, sequence.with_embeds(hidden), kept, split=layer)
        rope, text = vlm.split_positions(packed.positions)
        after = Stage(layer, len(language.layers), packed.mask, rope, text)
        hidden = run_stage(language, packed.embeds, after, call.cache, call.use_cache)
        packed.pruned.attach(call.cache)
        return _wrap(_output(language.norm(hidden), call))

    def _pack(self, method: Method, sequence: _Sequence, kept: torch.Tensor, split: int) -> _Packed:
        """Drop the pruned visual tokens (and padding), re-pack left-padded, number positions."""
        vlm = self.vlm
        keep = (sequence.valid & ~sequence.placeholder) | kept
        packing = pack(keep)
        positions, shift = sequence.positions, keep.new_zeros(keep.shape[0], dtype=torch.long)
        if visual_positions(method) == "renumber":
            pruned = sequence.placeholder & ~kept
            positions, shift = vlm.renumber(positions, sequence.placeholder, pruned)
        bookkeeping = Pruned(
            length=keep.shape[1], mask=packing.mask, shift=shift,
            rope_delta=vlm.rope_delta(sequence.positions, sequence.valid), split=split,
        )  # fmt: skip
        untouched = sequence.mask is None and bool(keep.all())
        return _Packed(
            packing.gather(sequence.embeds), None if untouched else packing.mask,
            packing.gather_positions(positions), bookkeeping,
        )  # fmt: skip

    # -- later calls of a generation -------------------------------------------------------------
    def _decode(self, compression: Compression, pruned: Pruned, call: _Call) -> Any:
        """New tokens on a cache a pruned prefill filled: mask, positions and (FastV) the two
        groups of layers translated from the original numbering."""
        vlm, language = self.vlm, self.vlm.language_model
        call = call.with_cache(language.config)
        embeds = call.inputs_embeds
        if embeds is None:
            embeds = language.get_input_embeddings()(call.input_ids)
        batch, count = embeds.shape[:2]
        new = call.cache.get_seq_length(pruned.split) - pruned.pruned_length
        if call.position_ids is None:
            original = vlm.decode_positions(call.attention_mask, pruned.length + new, count, pruned)
        else:
            original = vlm.given_positions(call.position_ids, batch)
        shifted = original - pruned.shift[:, None]
        mask = pruned.mask_for(call.attention_mask, new + count)
        if pruned.split == 0:
            output = language(
                inputs_embeds=embeds, attention_mask=mask, position_ids=vlm.llm_positions(shifted),
                cache=call.cache, use_cache=call.use_cache, **call.kwargs,
            )  # fmt: skip
            return _wrap(output)
        _check_fastv_call(language, call.kwargs)
        rope, text = vlm.split_positions(original)
        full = Stage(0, pruned.split, call.attention_mask, rope, text)
        hidden = run_stage(language, embeds, full, call.cache, call.use_cache)
        rope, text = vlm.split_positions(shifted)
        rest = Stage(pruned.split, len(language.layers), mask, rope, text)
        hidden = run_stage(language, hidden, rest, call.cache, call.use_cache)
        return _wrap(_output(language.norm(hidden), call))


@dataclass(frozen=True)
class _Call:
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

    def with_cache(self, config: Any) -> _Call:
        """use_cache settled from `config`, and a fresh DynamicCache when caching without one."""
        from transformers.cache_utils import DynamicCache

        use_cache = config.use_cache if self.use_cache is None else self.use_cache
        cache = DynamicCache(config=config) if use_cache and self.cache is None else self.cache
        return replace(self, cache=cache, use_cache=use_cache)


@dataclass(frozen=True)
class _Sequence:
    """The whole prompt of a prefill: embeddings (B, L, D), image placeholders and real tokens
    (B, L), original positions (R, B, L) and the caller's 2-D mask (or None)."""

    embeds: torch.Tensor
    placeholder: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None

    @classmethod
    def start(cls, vlm: Family, call: _Call, images: dict[str, Any]) -> _Sequence:
        """The prompt of a prefill call, placeholders still holding the image token's embedding."""
        input_ids, mask = call.input_ids, call.attention_mask
        placeholder = input_ids == vlm.image_token_id
        valid = torch.ones_like(placeholder) if mask is None else mask.bool()
        positions = vlm.positions(input_ids, mask, call.position_ids, {**images, **call.kwargs})
        embeds = vlm.language_model.get_input_embeddings()(input_ids)
        return cls(embeds, placeholder, valid, positions, mask)

    def filled(self, tokens: torch.Tensor) -> _Sequence:
        """The placeholders filled with (T, D) visual tokens, in row-major order."""
        embeds = self.embeds.masked_scatter(
            self.placeholder[..., None], tokens.to(self.embeds.dtype)
        )
        return replace(self, embeds=embeds)

    def with_embeds(self, embeds: torch.Tensor) -> _Sequence:
        """The same prompt with other hidden states (FastV, after layer K)."""
        return replace(self, embeds=embeds)


@dataclass(frozen=True)
class _Packed:
    """A pruned prompt: embeddings (B, Lp, D), the mask for the language model (None when the
    caller gave none and nothing was dropped), positions (R, B, Lp) and the bookkeeping."""

    embeds: torch.Tensor
    mask: torch.Tensor | None
    positions: torch.Tensor
    pruned: Pruned


def _needs(method: Method) -> frozenset[VisualSignal]:
    """The visual signals `method` declared (none for random and vision-transformer methods)."""
    return getattr(method, "visual_needs", frozenset())


def _present(values: dict[str, Any]) -> dict[str, Any]:
    """The entries that are not None."""
    return {name: value for name, value in values.items() if value is not None}


def _queries(query: str, sequence: _Sequence) -> torch.Tensor:
    """(B, L) rows whose attention FastV averages: the last token, or every text token."""
    if query == "text":
        return sequence.valid & ~sequence.placeholder
    rows = torch.zeros_like(sequence.valid)
    rows[:, -1] = True
    return rows


def _scored(images: Images, scores: torch.Tensor) -> Images:
    """`images` whose segments carry the (T,) attention scores of their placeholders."""
    starts = torch.tensor([0, *images.counts()]).cumsum(0).tolist()
    segments = [
        Segment(
            s.image, s.slots, replace(s.visual, attention=scores[starts[s.image] + s.slots][None])
        )
        for s in images.segments
    ]
    return replace(images, segments=segments)


def _check_fastv_call(language: nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse what FastV's own decoder loop cannot honour."""
    check_maskable(language)
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        raise ValueError(
            "fastv runs the decoder layers itself: output_attentions and output_hidden_states "
            "are not available; call tokcomp.remove(model) for them"
        )


def _output(hidden: torch.Tensor, call: _Call) -> Any:
    """FastV's decoder output, as the language model would return it."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(
        last_hidden_state=hidden, cache=call.cache if call.use_cache else None
    )


def _wrap(output: Any) -> Any:
    """The language model's output as the VLM's inner model returns it."""
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast

    return MultimodalBaseModelOutputWithPast(
        last_hidden_state=output.last_hidden_state, cache=output.cache,
        hidden_states=output.hidden_states, attentions=output.attentions,
    )  # fmt: skip

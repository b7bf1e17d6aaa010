"""The language model run layer span by layer span, for LLM-stage methods (FastV): the first
`layer` decoder layers see the whole prompt, the method chooses from the attention the visual
tokens receive in the last of them, and the other layers see the kept tokens, with their own
mask and positions, in the prefill and in every later call of the generation."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from tokcomp.adapters.base import attention_probs, split_heads
from tokcomp.adapters.hf_vlm.families import Images, Segment, VLMFamily
from tokcomp.adapters.hf_vlm.generation import (
    Call,
    Pruned,
    decode_positions,
    prune_prompt,
)
from tokcomp.adapters.hf_vlm.selection import choose, place
from tokcomp.adapters.hf_vlm.sequence import Prompt
from tokcomp.methods import LLMStageMethod


@dataclass(frozen=True)
class LayerSpan:
    """Decoder layers [start, stop) and what they attend with: a 2-D mask (or None), RoPE
    position rows for the rotary embedding, and the text position row some models take."""

    start: int
    stop: int
    mask: torch.Tensor | None
    rope_positions: torch.Tensor
    text_positions: torch.Tensor | None


def llm_stage_prefill(
    family: VLMFamily, method: LLMStageMethod, call: Call, prompt: Prompt, images: Images
) -> tuple[torch.Tensor, Pruned]:
    """The prefill of an LLM-stage method: layers 0..K-1 on the whole prompt, the method's
    choice from layer K-1's attention, the other layers on the pruned prompt. Returns the
    final hidden states (normed) and the record decoding needs."""
    language = family.language_model
    check_callable(language, call.kwargs)
    prompt = prompt.filled(torch.cat(images.embeds))
    rope, text = family.split_positions(prompt.positions)
    layer = method.layer
    before = LayerSpan(0, layer - 1, prompt.mask, rope, text)
    hidden = run_layers(language, prompt.embeds, before, call.cache, call.use_cache)
    queries = method.queries(prompt.text)
    scores = attention_received(language, layer - 1, hidden, before, queries)
    last = LayerSpan(layer - 1, layer, prompt.mask, rope, text)
    hidden = run_layers(language, hidden, last, call.cache, call.use_cache)
    scored = _scored(images, scores[prompt.placeholder])
    kept, _ = place(prompt.placeholder, images.counts(), choose(method, scored))
    packed = prune_prompt(family, prompt.with_embeds(hidden), kept, method.positions, layer)
    rope, text = family.split_positions(packed.positions)
    after = LayerSpan(layer, len(language.layers), packed.mask, rope, text)
    hidden = run_layers(language, packed.embeds, after, call.cache, call.use_cache)
    return language.norm(hidden), packed.pruned


def llm_stage_decode(
    family: VLMFamily, pruned: Pruned, call: Call, embeds: torch.Tensor, new: int
) -> torch.Tensor:
    """A later call on a cache an LLM-stage prefill filled: the first K layers with the
    original mask and positions, the others with the pruned ones. Returns normed hidden
    states."""
    language = family.language_model
    check_callable(language, call.kwargs)
    original, shifted = decode_positions(family, pruned, call, embeds.shape[1], new)
    rope, text = family.split_positions(original)
    full = LayerSpan(0, pruned.split, call.attention_mask, rope, text)
    hidden = run_layers(language, embeds, full, call.cache, call.use_cache)
    rope, text = family.split_positions(shifted)
    mask = pruned.mask_for(call.attention_mask, new + embeds.shape[1])
    rest = LayerSpan(pruned.split, len(language.layers), mask, rope, text)
    hidden = run_layers(language, hidden, rest, call.cache, call.use_cache)
    return language.norm(hidden)


def check_callable(language_model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse what a span-by-span decoder run cannot honour: attention implementations
    transformers cannot build masks for, sliding-window layers, per-layer outputs."""
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
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        raise ValueError(
            "fastv runs the decoder layers itself: output_attentions and output_hidden_states "
            "are not available; call tokcomp.remove(model) for them"
        )


def run_layers(
    language_model: nn.Module,
    hidden: torch.Tensor,
    span: LayerSpan,
    cache: object | None,
    use_cache: bool | None,
) -> torch.Tensor:
    """Run decoder layers [span.start, span.stop) of `language_model` on `hidden`."""
    from transformers.masking_utils import create_causal_mask

    prefill = cache is None or len(cache.layers) <= span.start
    prefill = prefill or cache.get_seq_length(span.start) == 0
    mask = create_causal_mask(
        config=language_model.config,
        inputs_embeds=hidden,
        attention_mask=span.mask,
        cache=None if prefill else cache,
        layer_idx=None if prefill else span.start,
    )
    rope = language_model.rotary_emb(hidden, span.rope_positions)
    for layer in language_model.layers[span.start : span.stop]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=rope,
            position_ids=span.text_positions,
            cache=cache,
            use_cache=use_cache,
        )
    return hidden


def attention_received(
    language_model: nn.Module,
    index: int,
    hidden: torch.Tensor,
    span: LayerSpan,
    queries: torch.Tensor,
) -> torch.Tensor:
    """(B, L) float32: the attention each token receives in decoder layer `index` on the input
    `hidden`, averaged over heads and over the (B, L) `queries` rows; computed from the layer's
    own q/k projections with its RoPE, causal and padding masks (no eager attention needed)."""
    layer = language_model.layers[index]
    attn = layer.self_attn
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise ValueError(
            f"fastv computes layer attention from q_proj/k_proj; {type(attn).__name__} has no "
            "such projections"
        )
    rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    x = layer.input_layernorm(hidden)
    length = x.shape[1]
    rows = queries.any(dim=0).nonzero().squeeze(1)
    cos, sin = language_model.rotary_emb(x, span.rope_positions)
    q = split_heads(attn.q_proj(x[:, rows]), attn.head_dim)
    k = split_heads(attn.k_proj(x), attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = rotate(q, q, cos[:, rows], sin[:, rows])[0]
    k = rotate(k, k, cos, sin)[0]
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    valid = torch.ones_like(queries) if span.mask is None else span.mask.bool()
    causal = torch.arange(length, device=x.device)[None, :] <= rows[:, None]
    allowed = causal[None] & valid[:, None, :]
    bias = torch.zeros(allowed.shape, device=x.device).masked_fill(~allowed, -torch.inf)
    probs = attention_probs(q.float(), k.float(), attn.scaling, bias[:, None]).nan_to_num(0.0)
    weights = (queries & valid)[:, rows].float()
    received = (weights[..., None] * probs.mean(dim=1)).sum(dim=1)
    return received / weights.sum(dim=1, keepdim=True)


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

"""The language model run layer span by layer span, for LLM-stage methods (FastV, PyramidDrop,
DART): the layers before a boundary see the whole prompt, the method chooses from the signal it
declared (the attention the visual tokens receive in its scoring layer, or that layer's keys and
the hidden states entering the boundary), and the later layers see the kept tokens, with their
own mask and positions, in the prefill and in every later call of the generation."""

from __future__ import annotations

import inspect
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
    Span,
    cut_prompt,
    decode_positions,
    pruned_record,
)
from tokcomp.adapters.hf_vlm.selection import check_counts, choose, place, surviving
from tokcomp.adapters.hf_vlm.sequence import Prompt, pack
from tokcomp.methods import LLMStageMethod, VisualMethod
from tokcomp.methods.visual import LLMSignal


@dataclass(frozen=True)
class LayerSpan:
    """Decoder layers [start, stop) and what they attend with: a 2-D mask (or None), RoPE
    position rows for the rotary embedding, the text position row some models take, the
    image blocks that attend in both directions (Prompt.image_blocks; None: causal), and the
    (B, L, k, D) features added to the outputs of layers 0..k-1 (Prompt.injected)."""

    start: int
    stop: int
    mask: torch.Tensor | None
    rope_positions: torch.Tensor
    text_positions: torch.Tensor | None
    blocks: torch.Tensor | None = None
    injected: torch.Tensor | None = None


@dataclass(frozen=True)
class _Progress:
    """An LLM-stage prefill between boundaries: the current prompt and its images, the first
    layer not yet run on it, the hidden states entering that layer, and what the cuts so far
    took from the positions (`shift`) and the visual tokens (`dropped`), (B,) each; the
    method's query rows (`queries`, bool) and their weights (`weights`), (B, L), chosen once on
    the original prompt and carried through the cuts."""

    prompt: Prompt
    images: Images
    start: int
    hidden: torch.Tensor
    shift: torch.Tensor
    dropped: torch.Tensor
    queries: torch.Tensor
    weights: torch.Tensor

    def span(self) -> Span:
        """The cache record of the layers from `start` on."""
        return Span(self.start, self.prompt.valid.long(), self.shift)


def llm_stage_prefill(
    family: VLMFamily, method: LLMStageMethod, call: Call, prompt: Prompt, images: Images
) -> tuple[torch.Tensor, Pruned]:
    """The prefill of an LLM-stage method: at each boundary the layers before it run on the
    current prompt, the method keeps visual tokens by the signal of its scoring layer, and the
    prompt is cut to them. Returns the final hidden states (normed) and the record decoding
    needs."""
    language = family.language_model
    check_callable(language, call.kwargs)
    check_counts(prompt.placeholder, images.counts())  # filled() would drop extra tokens
    original = prompt.filled(torch.cat(images.embeds), images.injected_rows())
    none = torch.zeros_like(original.valid[:, 0], dtype=torch.long)
    queries = torch.zeros_like(original.text)
    if method.llm_signal is LLMSignal.ATTENTION:
        queries = method.queries(original.text)
    weights = method.query_weights(queries, original.placeholder, original.embeds)
    progress = _Progress(original, images, 0, original.embeds, none, none, queries, weights)
    spans, depth = [], len(language.layers)
    for stage, boundary in enumerate(method.checked_boundaries(depth)):
        spans.append(progress.span())
        budgets = [method.kept_at(stage, tokens, depth) for tokens in images.selectable()]
        progress = _cut_at(family, method, call, progress, boundary, budgets)
    spans.append(progress.span())
    hidden = _run(family, call, progress, len(language.layers))
    return language.norm(hidden), pruned_record(family, original, spans, progress.dropped)


def _cut_at(
    family: VLMFamily,
    method: LLMStageMethod,
    call: Call,
    progress: _Progress,
    boundary: int,
    budgets: list[int],
) -> _Progress:
    """Run the layers up to `boundary`, give the method its signal from its scoring layer,
    keep `budgets` of each image (with the tokens the method gives in their places) and cut
    the prompt to them."""
    current, images = progress.prompt, progress.images
    scorer = method.scoring_layer(boundary)
    before = _run(family, call, progress, scorer)
    hidden = _run(family, call, replace(progress, start=scorer, hidden=before), boundary)
    span = _span(family, current, scorer, scorer)
    language = family.language_model
    signals = {"outputs": hidden}
    if method.llm_signal is LLMSignal.ATTENTION:
        queries, weights = progress.queries, progress.weights
        signals["attention"] = attention_received(language, scorer, before, span, queries, weights)
    else:
        signals["keys"] = layer_keys(language, scorer, before, span)
        signals["states"] = language.norm(hidden)
    signalled = _signalled(images, current, signals)
    choices = choose(method, signalled, budgets)
    kept, tokens = place(current.placeholder, images.counts(), choices)
    placed = hidden.masked_scatter(current.placeholder[..., None], tokens.to(hidden.dtype))
    cut = cut_prompt(family, current.with_embeds(placed), kept, method.positions)
    return _Progress(
        cut.prompt,
        surviving(signalled, choices),
        boundary,
        cut.prompt.embeds,
        progress.shift + cut.shift,
        progress.dropped + cut.dropped,
        _carried(progress.queries, current, cut.prompt),
        _carried(progress.weights, current, cut.prompt),
    )


def _carried(values: torch.Tensor, before: Prompt, after: Prompt) -> torch.Tensor:
    """(B, L') the (B, L) per-token `values` of `before`'s text tokens at their places in
    `after` (a cut keeps every text token, in order); zero elsewhere."""
    carried = values.new_zeros(after.text.shape)
    carried[after.text] = values[before.text]
    return carried


def llm_stage_decode(
    family: VLMFamily, pruned: Pruned, call: Call, embeds: torch.Tensor, new: int
) -> torch.Tensor:
    """A later call on a cache an LLM-stage prefill filled: each span of layers with the mask
    and positions of the prompt it holds. Returns normed hidden states."""
    language = family.language_model
    check_callable(language, call.kwargs)
    original = decode_positions(family, pruned, call, embeds.shape[1], new)
    stops = [span.start for span in pruned.spans[1:]] + [len(language.layers)]
    hidden = embeds
    for span, stop in zip(pruned.spans, stops, strict=True):
        rope, text = family.split_positions(original - span.shift[:, None])
        mask = span.mask_for(call.attention_mask, pruned.length, new + embeds.shape[1])
        layers = LayerSpan(span.start, stop, mask, rope, text)
        hidden = run_layers(language, hidden, layers, call.cache, call.use_cache)
    return language.norm(hidden)


def decode_pruned(
    family: VLMFamily,
    method: VisualMethod,
    pruned: Pruned,
    call: Call,
    embeds: torch.Tensor,
    new: int,
) -> torch.Tensor:
    """A decoding step of one token with decode-time pruning (DyCoke): the layers before the
    method's boundary attend to the whole cache; from the new token's attention over the cached
    prompt in the layer before it, the method keeps prompt positions, and the later layers
    attend to those only in this step (the cache stays whole). Returns normed hidden states."""
    language, decoding = family.language_model, pruned.decoding
    check_callable(language, call.kwargs)
    (span,) = pruned.spans
    original = decode_positions(family, pruned, call, embeds.shape[1], new)
    rope, text = family.split_positions(original - span.shift[:, None])
    mask = span.mask_for(call.attention_mask, pruned.length, new + embeds.shape[1])
    depth = len(language.layers)
    boundary = method.checked_decode_boundary(depth)
    if layer_types(language.config)[boundary - 1] != "full_attention":
        raise ValueError(
            f"{method.name}: layer decode_layer - 1 = {boundary - 1} has sliding-window "
            "attention; its attention over the whole cache is not kept: choose a decode_layer "
            "after a full-attention layer"
        )
    scorer = LayerSpan(boundary - 1, boundary, mask, rope, text)
    first = replace(scorer, start=0, stop=boundary - 1)
    before = run_layers(language, embeds, first, call.cache, call.use_cache)
    hidden = run_layers(language, before, scorer, call.cache, call.use_cache)
    attention = new_token_attention(language, boundary - 1, before, scorer, call.cache)
    attention = attention[:, : span.length]
    kept = method.decode_kept(attention, decoding.video, decoding.attention, decoding.kept)
    decoding.attention, decoding.kept = attention, kept
    skipping = torch.cat([mask[:, : span.length] * kept, mask[:, span.length :]], dim=1)
    later = LayerSpan(boundary, depth, skipping, rope, text)
    return language.norm(run_layers(language, hidden, later, call.cache, call.use_cache))


def new_token_attention(
    language_model: nn.Module, index: int, hidden: torch.Tensor, span: LayerSpan, cache: Any
) -> torch.Tensor:
    """(B, S) float32: decoder layer `index`'s attention of the last token of its input `hidden`
    over the S keys the layer has cached (that token's own last), averaged over heads, padding
    masked by span.mask: one query row against the cached post-RoPE keys."""
    layer, attn, rotate = _attention_of(language_model, index)
    x = layer.input_layernorm(hidden[:, -1:])
    kind = layer_types(language_model.config)[index]
    cos, sin = _rope(language_model, x, span.rope_positions[..., -1:], kind)
    q = split_heads(attn.q_proj(x), attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = rotate(q, q, cos, sin)[0]
    keys = cache.layers[index].keys
    k = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    valid = span.mask.bool()[:, None, None, :]
    bias = torch.zeros(valid.shape, device=x.device).masked_fill(~valid, -torch.inf)
    return attention_probs(q.float(), k.float(), attn.scaling, bias).mean(dim=1)[:, 0]


def _span(family: VLMFamily, prompt: Prompt, start: int, stop: int) -> LayerSpan:
    """Layers [start, stop) attending over `prompt` (its mask and positions)."""
    rope, text = family.split_positions(prompt.positions)
    return LayerSpan(start, stop, prompt.mask, rope, text, prompt.image_blocks(), prompt.injected)


def _run(family: VLMFamily, call: Call, progress: _Progress, stop: int) -> torch.Tensor:
    """Decoder layers [progress.start, stop) on the progress's hidden states."""
    span = _span(family, progress.prompt, progress.start, stop)
    language = family.language_model
    return run_layers(language, progress.hidden, span, call.cache, call.use_cache)


def check_callable(language_model: nn.Module, kwargs: dict[str, Any]) -> None:
    """Refuse what a span-by-span decoder run cannot honour: attention implementations
    transformers cannot build masks for, sliding-window layers, per-layer outputs."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = language_model.config
    implementation = config._attn_implementation
    if implementation not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ValueError(
            "in-LLM pruning needs attention masks for the layers after the cut, which "
            f"transformers cannot build for attn_implementation={implementation!r}; load the "
            "model with attn_implementation='sdpa' (or 'eager') or call "
            "model.set_attn_implementation('sdpa')"
        )
    if set(layer_types(config)) - {"full_attention", "sliding_attention"}:
        raise ValueError(
            "in-LLM pruning supports language models with full or sliding-window attention"
        )
    if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
        raise ValueError(
            "in-LLM pruning runs the decoder layers itself: output_attentions and "
            "output_hidden_states are not available; call tokcomp.remove(model) for them"
        )


def run_layers(
    language_model: nn.Module,
    hidden: torch.Tensor,
    span: LayerSpan,
    cache: object | None,
    use_cache: bool | None,
) -> torch.Tensor:
    """Run decoder layers [span.start, span.stop) of `language_model` on `hidden`."""
    prefill = cache is None or len(cache.layers) <= span.start
    prefill = prefill or cache.get_seq_length(span.start) == 0
    masks = _layer_masks(language_model, hidden, span, None if prefill else cache)
    kinds = layer_types(language_model.config)
    ropes = {kind: _rope(language_model, hidden, span.rope_positions, kind) for kind in masks}
    for index in range(span.start, span.stop):
        hidden = language_model.layers[index](
            hidden,
            attention_mask=masks[kinds[index]],
            position_embeddings=ropes[kinds[index]],
            position_ids=span.text_positions,
            cache=cache,
            use_cache=use_cache,
        )
        if span.injected is not None and index < span.injected.shape[2]:
            # zeros off the visual tokens: exactly the model's masked addition
            hidden = hidden + span.injected[:, :, index].to(hidden.dtype)
    return hidden


def layer_types(config: Any) -> list[str]:
    """Each decoder layer's attention kind ("full_attention" where the config names none)."""
    return list(
        getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    )


def _layer_masks(
    language_model: nn.Module, hidden: torch.Tensor, span: LayerSpan, cache: object | None
) -> dict[str, Any]:
    """The mask of each attention kind among layers [span.start, span.stop), as the model
    builds them (Gemma 3's image blocks: OR-ed into the causal mask, then the sliding window)."""
    from transformers.masking_utils import (
        blockwise_overlay,
        create_causal_mask,
        create_sliding_window_causal_mask,
        sliding_window_overlay,
    )

    config = language_model.config
    kinds = layer_types(config)[span.start : span.stop]
    masks = {}
    for kind in set(kinds):
        common = dict(
            config=config,
            inputs_embeds=hidden,
            attention_mask=span.mask,
            cache=cache,
            layer_idx=None if cache is None else span.start + kinds.index(kind),
        )
        if kind == "full_attention":
            masks[kind] = create_causal_mask(**common, block_sequence_ids=span.blocks)
        elif span.blocks is None:
            masks[kind] = create_sliding_window_causal_mask(**common)
        else:
            masks[kind] = create_causal_mask(
                **common,
                or_mask_function=blockwise_overlay(span.blocks),
                and_mask_function=sliding_window_overlay(config.sliding_window),
            )
    return masks


def _rope(
    language_model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary (cos, sin) of `positions` for layers of attention `kind` (Gemma 3 rotates
    sliding and full layers differently)."""
    rotary = language_model.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(hidden, positions, kind)
    return rotary(hidden, positions)


def attention_received(
    language_model: nn.Module,
    index: int,
    hidden: torch.Tensor,
    span: LayerSpan,
    queries: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """(B, L) float32: the attention each token receives in decoder layer `index` on the input
    `hidden`, averaged over heads and over the (B, L) `queries` rows with their (B, L)
    `weights`; computed from the layer's own q/k projections with its RoPE, causal and padding
    masks (no eager attention needed)."""
    layer, attn, rotate = _attention_of(language_model, index)
    x = layer.input_layernorm(hidden)
    length = x.shape[1]
    rows = queries.any(dim=0).nonzero().squeeze(1)
    kind = layer_types(language_model.config)[index]
    cos, sin = _rope(language_model, x, span.rope_positions, kind)
    q = split_heads(attn.q_proj(x[:, rows]), attn.head_dim)
    if hasattr(attn, "q_norm"):
        q = attn.q_norm(q)
    q = rotate(q, q, cos[:, rows], sin[:, rows])[0]
    k = _repeated_keys(attn, rotate, x, cos, sin)
    valid = torch.ones_like(queries) if span.mask is None else span.mask.bool()
    allowed = _allowed(language_model.config, kind, rows, length, span.blocks) & valid[:, None, :]
    bias = torch.zeros(allowed.shape, device=x.device).masked_fill(~allowed, -torch.inf)
    probs = attention_probs(q.float(), k.float(), attn.scaling, bias[:, None]).nan_to_num(0.0)
    weights = (weights * (queries & valid))[:, rows].float()
    received = (weights[..., None] * probs.mean(dim=1)).sum(dim=1)
    return received / weights.sum(dim=1, keepdim=True)


def _allowed(
    config: Any, kind: str, rows: torch.Tensor, length: int, blocks: torch.Tensor | None
) -> torch.Tensor:
    """(B or 1, Q, L) what query `rows` may attend to before padding: causal, OR the same image
    block, AND (sliding layers) within the window, as transformers composes the masks."""
    keys = torch.arange(length, device=rows.device)[None, :]
    allowed = (keys <= rows[:, None])[None]
    if blocks is not None:
        query_blocks = blocks[:, rows, None]
        allowed = allowed | ((query_blocks == blocks[:, None, :]) & (query_blocks >= 0))
    if kind == "sliding_attention":
        allowed = allowed & (rows[:, None] - keys < config.sliding_window)[None]
    return allowed


def layer_keys(
    language_model: nn.Module, index: int, hidden: torch.Tensor, span: LayerSpan
) -> torch.Tensor:
    """(B, L, heads * head_dim): decoder layer `index`'s post-RoPE keys of the input `hidden`,
    each key head repeated for the query heads it serves (repeat_kv), heads concatenated."""
    layer, attn, rotate = _attention_of(language_model, index)
    x = layer.input_layernorm(hidden)
    kind = layer_types(language_model.config)[index]
    cos, sin = _rope(language_model, x, span.rope_positions, kind)
    return _repeated_keys(attn, rotate, x, cos, sin).transpose(1, 2).flatten(2)


def _attention_of(language_model: nn.Module, index: int) -> tuple[nn.Module, nn.Module, Any]:
    """Decoder layer `index`, its attention module and its model's apply_rotary_pos_emb."""
    layer = language_model.layers[index]
    attn = layer.self_attn
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise ValueError(
            "tokcomp's in-LLM pruning computes layer attention from q_proj/k_proj; "
            f"{type(attn).__name__} has no such projections"
        )
    return layer, attn, sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _repeated_keys(
    attn: nn.Module, rotate: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """(B, heads, L, head_dim): the rotated keys of the normed input `x`, one per query head."""
    k = split_heads(attn.k_proj(x), attn.head_dim)
    if hasattr(attn, "k_norm"):
        k = attn.k_norm(k)
    k = rotate(k, k, cos, sin)[0]
    heads = attn.q_proj.out_features // attn.head_dim
    return k.repeat_interleave(heads // k.shape[1], dim=1)


def _signalled(images: Images, prompt: Prompt, signals: dict[str, torch.Tensor]) -> Images:
    """`images` whose segments carry the (B, L, ...) per-token `signals` of their placeholders
    in `prompt` (field names of VisualTokens), and, with "keys" and "states", those of the
    text tokens after each image; its tokens are the "outputs" signal's."""
    counts = images.counts()
    starts = torch.tensor([0, *counts]).cumsum(0).tolist()
    visual = {name: signal[prompt.placeholder] for name, signal in signals.items()}
    text = _text_after(prompt, starts, signals) if "states" in signals else {}
    segments = []
    for s in images.segments:
        own = {name: value[starts[s.image] + s.slots][None] for name, value in visual.items()}
        after = {name: value[s.image][None] for name, value in text.items()}
        segments.append(Segment(s.image, s.slots, replace(s.visual, **own, **after)))
    return replace(images, embeds=list(visual["outputs"].split(counts)), segments=segments)


def _text_after(
    prompt: Prompt, starts: list[int], signals: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per image, the keys and states of its sample's text tokens after its last placeholder,
    left-padded to the longest (I, M, ...), and which are real (I, M)."""
    rows, cols = prompt.placeholder.nonzero(as_tuple=True)
    last = torch.tensor(starts[1:], device=rows.device) - 1
    row, col = rows[last], cols[last]
    columns = torch.arange(prompt.text.shape[1], device=rows.device)
    packing = pack(prompt.text[row] & (columns[None] > col[:, None]))
    return {
        "text_keys": packing.gather(signals["keys"][row]),
        "text_states": packing.gather(signals["states"][row]),
        "text_valid": packing.mask.bool(),
    }

"""The analytic MACs model (multiply-adds per image): attention 4NC^2 + 2N^2C and MLP 2NCH
per block, the stem and head outside the blocks; for a VLM, the prefill of one reference
prompt (tower, projector, language model). Apart, the method's own work: its matmuls (each
method's hook) and the signals the adapter computes for it. docs/methods.md section 9."""

from __future__ import annotations

import torch

from tokcomp.methods import BlockMethod, LLMStageMethod, Method, Signal, Stage, VisualMethod
from tokcomp.methods.visual import LLMSignal, VisualSignal, budget_shares
from tokcomp.schedule.spec import ModelSpec, VLMSpec


def block_macs(spec: ModelSpec, tokens_in: int, tokens_out: int) -> int:
    """MACs of one block: attention at the incoming token count, MLP at the reduced one."""
    projections = 4 * tokens_in * spec.width * spec.attn_dim
    attention = 2 * tokens_in * tokens_in * spec.attn_dim
    mlp = 2 * tokens_out * spec.width * spec.mlp_hidden
    return projections + attention + mlp


def head_macs_at(spec: ModelSpec, pooled: int | torch.Tensor) -> int | torch.Tensor:
    """MACs of the encoder's head pooling over `pooled` tokens (an int, or a tensor for the
    DiffRate search's differentiable count): an attention pool pays per token that reaches it."""
    return spec.head_macs - spec.head_token_macs * (spec.tokens - pooled)


def encoder_macs(
    spec: ModelSpec, schedule: list[int] | None = None, pooled: int | None = None
) -> int:
    """MACs of one image through a vision encoder under `schedule` (None: unpruned), its head
    pooling over the tokens the last block leaves (`pooled`: over that many instead)."""
    schedule = schedule if schedule is not None else [spec.tokens] * spec.depth
    pooled = schedule[-1] if pooled is None else pooled
    total, tokens = spec.stem_macs + head_macs_at(spec, pooled), spec.tokens
    for keep in schedule:
        total += block_macs(spec, tokens, keep)
        tokens = keep
    return total


def vlm_macs(spec: VLMSpec, schedule: list[int] | None = None) -> int:
    """MACs of one reference prompt's prefill: vision tower, projector, language model. The
    schedule is the tower's blocks, then (visual-token methods) the visual tokens of the image
    each decoder layer processes; a block method's tower-only schedule sends the tower's
    remaining tokens on."""
    tower = list(schedule[: spec.depth]) if schedule else [spec.tokens] * spec.depth
    llm = list(schedule[spec.depth :]) if schedule else []
    projected = spec.projected_tokens
    # beside a visual-token method the tower unmerges its tokens before its head
    pooled = spec.tokens if llm else None
    if not llm:
        visual = spec.visual_tokens
        if tower[-1] != spec.tokens:
            visual = projected = tower[spec.feature_block] - spec.feature_prefix
        llm = [visual] * spec.llm_depth
    total = (
        encoder_macs(spec, tower, pooled) * spec.crops
        + projected * spec.visual_geometry.projector_token_macs
        + spec.lm_head_macs
    )
    for visual in llm:
        sequence = spec.prompt_tokens + visual
        total += sequence * spec.llm_token_macs + 2 * sequence * sequence * spec.llm_attn_dim
    return total


def model_macs(spec: ModelSpec, schedule: list[int] | None = None) -> int:
    """MACs of one image (a VLM: one reference prompt) under `schedule` (None: unpruned)."""
    if isinstance(spec, VLMSpec):
        return vlm_macs(spec, schedule)
    return encoder_macs(spec, schedule)


def total_macs(spec: ModelSpec, method: Method, schedule: list[int]) -> int:
    """MACs of one image (a VLM: one reference prompt) under `method` and its `schedule`: the
    model's and the method's own."""
    return model_macs(spec, schedule) + selection_macs(spec, method, schedule)


def selection_macs(
    spec: ModelSpec, method: Method, schedule: list[int], tower: BlockMethod | None = None
) -> int:
    """MACs of `method`'s own work per image (a VLM: per reference prompt) under `schedule`:
    its reductions or choices and the signals the adapter computes for it beyond the model;
    with `tower` merging inside a VLM's vision tower beside it, that method's work too."""
    if isinstance(spec, VLMSpec) and isinstance(method, VisualMethod):
        own = _choice_macs(spec, method) + _visual_signal_macs(spec, method, schedule)
        return own + (0 if tower is None else _tower_reduction_macs(spec, tower, schedule))
    if isinstance(spec, VLMSpec):
        return _tower_reduction_macs(spec, method, schedule)
    return _reduction_macs(spec, method, schedule)


def _tower_reduction_macs(spec: VLMSpec, method: BlockMethod, schedule: list[int]) -> int:
    """A block method's work inside the vision tower, every crop (the schedule's tower part)."""
    return spec.crops * _reduction_macs(spec.tower(), method, schedule[: spec.depth])


def _reduction_macs(spec: ModelSpec, method: BlockMethod, schedule: list[int]) -> int:
    """A block method's work at every block where it reduces, with the class-attention row."""
    total, tokens = 0, spec.tokens
    for index, keep in enumerate(schedule):
        if method.acts(keep, tokens):
            total += method.reduce_macs(spec, tokens, keep, index)
            total += _class_row_macs(spec, method.needs, tokens)
        tokens = keep
    return total


def _class_row_macs(spec: ModelSpec, needs: frozenset[Signal], tokens: int) -> int:
    """The class token's attention logits computed beside fused attention (adapters/base.py
    `attend`); full attention matrices cost what the fused call would."""
    beside = Signal.CLS_ATTN in needs and Signal.ATTN not in needs and spec.class_token
    return tokens * spec.attn_dim if beside else 0


def _choice_macs(spec: VLMSpec, method: VisualMethod) -> int:
    """A visual-token method's choice in each segment of the reference image (an LLM-stage
    method: at each boundary, among the tokens the previous ones left)."""
    if method.stage is not Stage.LLM:
        kept = method.kept_of(spec.selectable, spec.frames)
        return _segment_choice_macs(spec, method, spec.segments, budget_shares(spec.segments, kept))
    total, sizes = 0, list(spec.segments)
    for stage in range(len(method.checked_boundaries(spec.llm_depth))):
        shares = method.stage_shares(stage, spec.selectable, spec.llm_depth, sizes)
        total += _segment_choice_macs(spec, method, sizes, shares)
        sizes = method.cut_sizes(sizes, shares)
    return total


def _segment_choice_macs(
    spec: VLMSpec, method: VisualMethod, sizes: list[int], shares: list[int]
) -> int:
    """`shares` tokens chosen in segments of `sizes` tokens (a segment whose share is 0 is
    not chosen in: it costs nothing)."""
    return sum(
        method.select_macs(spec.segment_geometry(index), size, share)
        for index, (size, share) in enumerate(zip(sizes, shares, strict=True))
        if share
    )


def _visual_signal_macs(spec: VLMSpec, method: VisualMethod, schedule: list[int]) -> int:
    """The signals the adapter computes for a visual-token method: the language model's scoring
    layer's at each boundary (LLM stage), on the prompt before that boundary's cut (PyramidDrop
    scores in layer b itself, but before the cut), or the tower's attention at its feature
    layer, per crop (attention or keys declared)."""
    if method.stage is Stage.LLM:
        visual = schedule[spec.depth :]
        boundaries = method.checked_boundaries(spec.llm_depth)
        layers = sum(_layer_signal_macs(spec, method, visual[b - 1]) for b in boundaries)
        return layers + _query_weight_macs(spec, method)
    if method.visual_needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
        return spec.crops * _tower_attention_macs(spec)
    return 0


def _query_weight_macs(spec: VLMSpec, method: LLMStageMethod) -> int:
    """Choosing the query rows' weights once, on the reference prompt (its image first)."""
    if method.llm_signal is not LLMSignal.ATTENTION:
        return 0
    length = spec.prompt_tokens + spec.visual_tokens
    after = (torch.arange(length) >= spec.visual_tokens)[None]  # the text after the image
    rows = int(method.queries(after).sum())
    width = spec.visual_geometry.output_width
    return method.query_weight_macs(spec.visual_tokens - spec.text_visual, rows, width)


def _text_rows(spec: VLMSpec, length: int, visual: int) -> torch.Tensor:
    """(1, length) the text rows of the reference prompt holding `visual` visual tokens (the
    image first; its text tokens, Mistral 3's image breaks, counted with the text)."""
    return (torch.arange(length) >= visual - spec.text_visual)[None]


def _tower_attention_macs(spec: VLMSpec) -> int:
    """The feature layer's q of the class row (every row without a class token), k of every
    token and the logits (families/llava.py `_attention`)."""
    rows = 1 if spec.class_token else spec.tokens
    projections = (rows + spec.tokens) * spec.width * spec.attn_dim
    return projections + rows * spec.tokens * spec.attn_dim


def _layer_signal_macs(spec: VLMSpec, method: LLMStageMethod, visual: int) -> int:
    """The signal a scoring layer gives `method` with `visual` visual tokens at that layer: its
    keys of the whole prompt (adapters/hf_vlm/decoder.py `layer_keys`; the final norm has no
    matmul), or its attention."""
    if method.llm_signal is LLMSignal.KEYS_AND_STATES:
        return (spec.prompt_tokens + visual) * spec.visual_geometry.output_width * spec.llm_kv_dim
    return _layer_attention_macs(spec, method, visual)


def _layer_attention_macs(spec: VLMSpec, method: LLMStageMethod, visual: int) -> int:
    """A scoring layer's q of the method's query rows, k of the whole prompt (`visual` visual
    tokens at that layer) and the logits (adapters/hf_vlm/decoder.py `attention_received`)."""
    length = spec.prompt_tokens + visual
    rows = int(method.queries(_text_rows(spec, length, visual)).any(dim=0).sum())
    width = spec.visual_geometry.output_width
    projections = rows * width * spec.llm_attn_dim + length * width * spec.llm_kv_dim
    return projections + rows * length * spec.llm_attn_dim

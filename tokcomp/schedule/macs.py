"""The analytic MACs model (multiply-adds per image): attention 4NC^2 + 2N^2C and MLP 2NCH
per block, the stem and head outside the blocks; for a VLM, the prefill of one reference
prompt (tower, projector, language model). docs/methods.md section 9."""

from __future__ import annotations

from tokcomp.schedule.spec import ModelSpec, VLMSpec


def block_macs(spec: ModelSpec, tokens_in: int, tokens_out: int) -> int:
    """MACs of one block: attention at the incoming token count, MLP at the reduced one."""
    projections = 4 * tokens_in * spec.width * spec.attn_dim
    attention = 2 * tokens_in * tokens_in * spec.attn_dim
    mlp = 2 * tokens_out * spec.width * spec.mlp_hidden
    return projections + attention + mlp


def encoder_macs(spec: ModelSpec, schedule: list[int] | None = None) -> int:
    """MACs of one image through a vision encoder under `schedule` (None: unpruned)."""
    schedule = schedule if schedule is not None else [spec.tokens] * spec.depth
    total, tokens = spec.stem_macs + spec.head_macs, spec.tokens
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
    if not llm:
        visual = spec.visual_tokens
        if tower[-1] != spec.tokens:
            visual = projected = tower[spec.feature_block] - spec.feature_prefix
        llm = [visual] * spec.llm_depth
    total = (
        encoder_macs(spec, tower) * spec.crops
        + projected * spec.projector_token_macs
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

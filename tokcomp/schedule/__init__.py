"""Schedules and MACs in one place: the model shapes adapters describe (spec), the analytic
MACs model (macs) and the resolution of every method's budget on every model (resolve)."""

from tokcomp.schedule.macs import block_macs, head_macs_at, model_macs, selection_macs
from tokcomp.schedule.resolve import (
    check_schedule,
    resolve,
    resolve_with_tower,
    visual_schedule,
)
from tokcomp.schedule.spec import REFERENCE_PROMPT, ModelSpec, VLMSpec

__all__ = [
    "REFERENCE_PROMPT",
    "ModelSpec",
    "VLMSpec",
    "block_macs",
    "check_schedule",
    "head_macs_at",
    "model_macs",
    "resolve",
    "resolve_with_tower",
    "selection_macs",
    "visual_schedule",
]

"""Qwen2-VL (Qwen2VLForConditionalGeneration) and Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration):
dynamic resolution, images and videos, and multimodal RoPE."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from tokcomp.adapters.hf_vlm.families.base import (
    REFERENCE_PIXELS,
    Images,
    VLMFamily,
    one_segment_each,
    real_token_positions,
    tower_fields,
)
from tokcomp.adapters.hf_vlm.sequence import renumber_mrope
from tokcomp.methods.visual import VisualSignal
from tokcomp.schedule import VLMSpec

_MODELS = "transformers.models."


class Qwen2VL(VLMFamily):
    """Qwen2-VL: dynamic resolution, a 2x2 patch merger (RMS/LayerNorm, then an MLP: the
    projector), multimodal RoPE positions from the model's get_rope_index. A video is its
    temporal patches (2 frames each) through the tower, one segment of t x h x w tokens."""

    handles = (f"{_MODELS}qwen2_vl.modeling_qwen2_vl.Qwen2VLForConditionalGeneration",)
    image_inputs = (
        "pixel_values",
        "image_grid_thw",
        "pixel_values_videos",
        "video_grid_thw",
        "second_per_grid_ts",
        "mm_token_type_ids",
    )
    encoder_inputs = ("pixel_values", "image_grid_thw")
    video_encoder_inputs = ("pixel_values_videos", "video_grid_thw")

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        return tuple(self.inner.visual.merger.mlp)

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        return self._segments(encoded, inputs["image_grid_thw"], needs)

    def videos(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> Images:
        grid = inputs.get("video_grid_thw")
        if grid is None:
            raise ValueError("pass video_grid_thw (the processor returns it) with the videos")
        return self._segments(encoded, grid, needs, grid[:, 0].tolist())

    def _segments(
        self,
        encoded: Any,
        grid: torch.Tensor,
        needs: frozenset[VisualSignal],
        frames: list[int] | None = None,
    ) -> Images:
        """One segment per image (or video of `frames` temporal patches) of `grid` (n, 3)."""
        embeds = list(encoded.pooler_output)
        signals = {}
        if VisualSignal.FEATURES in needs:
            merger = self.inner.visual.merger
            x = merger.ln_q(encoded.last_hidden_state).view(-1, merger.hidden_size)
            x = x[self._merged_order(grid)]
            signals["features"] = x.split([len(e) for e in embeds])
        return one_segment_each(embeds, self.projector, signals, frames)

    def _merged_order(self, grid: torch.Tensor) -> slice | torch.Tensor:
        """Index putting the merger's input rows in the order of its outputs."""
        return slice(None)

    def default_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, inputs: dict[str, Any]
    ) -> torch.Tensor:
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError(
                "pass mm_token_type_ids (the processor returns it): multimodal RoPE positions "
                "cannot be computed without it"
            )
        positions, _ = self.inner.get_rope_index(
            input_ids,
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
            attention_mask=attention_mask,
        )
        return positions

    def given_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, batch, -1)
        return position_ids

    def decode_positions(
        self,
        attention_mask: torch.Tensor | None,
        steps: torch.Tensor,
        rope_delta: torch.Tensor | None,
    ) -> torch.Tensor:
        text = steps
        if attention_mask is not None:
            text = real_token_positions(attention_mask)[:, -steps.shape[1] :]
        return (text + rope_delta[:, None]).expand(3, -1, -1)

    def renumber(
        self, positions: torch.Tensor, placeholder: torch.Tensor, pruned: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return renumber_mrope(positions, placeholder, pruned)

    def rope_delta(self, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        spatial = positions[-3:].masked_fill(~valid[None], -1)
        return spatial.amax(dim=(0, 2)) + 1 - valid.sum(dim=1)

    def split_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (positions[1:], positions[0]) if positions.shape[0] == 4 else (positions, None)

    def llm_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def video_spec(self, frames: int) -> VLMSpec:
        """The geometry of a reference video of `frames` REFERENCE_PIXELS-square frames: every
        temporal patch (2 frames; the processor pads an odd count) through the tower alone,
        all its tokens one segment with one budget."""
        spec = self.spec()
        temporal = -(-frames // self.inner.visual.config.temporal_patch_size)
        visual = temporal * spec.visual_tokens
        return replace(
            spec,
            crops=temporal,
            visual_tokens=visual,
            segments=(visual,),
            projected_tokens=temporal * spec.projected_tokens,
            frames=temporal,
        )

    def vision_fields(self) -> dict[str, Any]:
        visual = self.inner.visual
        merge = visual.spatial_merge_size
        side = REFERENCE_PIXELS // visual.config.patch_size // merge * merge
        return tower_fields(
            visual.blocks,
            "attn",
            "mlp",
            side * side,
            visual.patch_embed.proj,
            visual.config.num_heads,
            side * side // merge**2,
        )


class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL: as Qwen2-VL, with window attention in the tower (the merger sees the
    patches in window order and its outputs are put back in image order)."""

    handles = (f"{_MODELS}qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration",)

    def _merged_order(self, grid: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        visual = self.inner.visual
        window, _ = get_vision_window_index(
            grid, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        return window.argsort()

"""Qwen3-VL (Qwen3VLForConditionalGeneration), images: multimodal RoPE as Qwen2-VL and
deepstack features added to the visual tokens' hidden states in the first decoder layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokcomp.adapters.hf_vlm.families.base import (
    REFERENCE_PIXELS,
    Images,
    one_segment_each,
    tower_fields,
)
from tokcomp.adapters.hf_vlm.families.qwen2_vl import Qwen2VL
from tokcomp.adapters.hf_vlm.sequence import Prompt
from tokcomp.methods.visual import VisualSignal

_MODELS = "transformers.models."


class Qwen3VL(Qwen2VL):
    """Qwen3-VL: dynamic resolution, a 2 x 2 patch merger (LayerNorm per patch, then an MLP: the
    projector), positions from the model's get_rope_index (for images the same scheme as
    Qwen2-VL; its rotary embedding interleaves the t/h/w frequencies). Deepstack: mergers of
    some tower blocks' outputs give every visual token k more features, which the language
    model adds to that token's hidden state after its first k layers; a pruned token's
    features go with it, the kept ones' follow their token into the shorter prompt."""

    handles = (f"{_MODELS}qwen3_vl.modeling_qwen3_vl.Qwen3VLForConditionalGeneration",)

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        merger = self.inner.visual.merger
        return (merger.linear_fc1, merger.act_fn, merger.linear_fc2)

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        embeds = list(encoded.pooler_output)
        signals = {}
        if VisualSignal.FEATURES in needs:
            merger = self.inner.visual.merger
            x = merger.norm(encoded.last_hidden_state).view(-1, merger.hidden_size)
            signals["features"] = x.split([len(e) for e in embeds])
        images = one_segment_each(embeds, self.projector, signals)
        levels = encoded.deepstack_features
        if not levels:
            return images
        injected = [torch.stack(per_level, dim=1) for per_level in zip(*levels, strict=True)]
        return Images(images.embeds, images.segments, injected=injected)

    def injection_inputs(self, prompt: Prompt) -> dict[str, Any]:
        if prompt.injected is None:
            return {}
        visual = prompt.placeholder
        levels = prompt.injected[visual].unbind(dim=1)
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": list(levels)}

    def vision_fields(self) -> dict[str, Any]:
        visual = self.inner.visual
        merge = visual.spatial_merge_size
        side = REFERENCE_PIXELS // visual.config.patch_size // merge * merge
        tokens = side * side // merge**2
        fields = tower_fields(
            visual.blocks,
            "attn",
            "mlp",
            side * side,
            visual.patch_embed.proj,
            visual.config.num_heads,
            tokens,
        )
        # the deepstack mergers have the projector's widths: count them as more projected tokens
        deepstack = len(visual.deepstack_merger_list)
        return dict(fields, projected_tokens=tokens * (1 + deepstack))

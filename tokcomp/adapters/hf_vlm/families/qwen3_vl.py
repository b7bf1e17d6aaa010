"""Qwen3-VL (Qwen3VLForConditionalGeneration), images and videos: multimodal RoPE as Qwen2-VL
(a video numbered frame by frame between timestamp texts) and deepstack features added to the
visual tokens' hidden states in the first decoder layers."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.adapters.base import attention_probs
from tokcomp.adapters.hf_vlm.families.base import Images, one_segment_each, tower_hidden
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
    features go with it, the kept ones' follow their token into the shorter prompt.

    A video: its temporal patches (2 frames each) through the tower, one segment of t x h x w
    tokens, frame-major, with one budget. The processor writes each temporal patch as its own
    placeholder run, "<t seconds>" text and vision start and end tokens around it; those are
    text, never pruned, and get_rope_index numbers each run as a one-frame image after them, so
    renumbering closes each run's gap (a run pruned whole leaves none)."""

    handles = (f"{_MODELS}qwen3_vl.modeling_qwen3_vl.Qwen3VLForConditionalGeneration",)

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        merger = self.inner.visual.merger
        return (merger.linear_fc1, merger.act_fn, merger.linear_fc2)

    def tower_kwargs(
        self, kwargs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, Any]:
        """The tower's arguments, asking for the last block's input where `needs` wants its
        attention or keys."""
        wanted = needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}
        if wanted and kwargs.get("output_hidden_states") is not True:
            kwargs = {**kwargs, "output_hidden_states": [len(self.inner.visual.blocks) - 1]}
        return kwargs

    def _segments(
        self,
        encoded: Any,
        grid: torch.Tensor,
        needs: frozenset[VisualSignal],
        frames: list[int] | None = None,
    ) -> Images:
        embeds = list(encoded.pooler_output)
        sizes = [len(e) for e in embeds]
        visual = self.inner.visual
        signals = {}
        if VisualSignal.FEATURES in needs:
            merger = visual.merger
            x = merger.norm(encoded.last_hidden_state).view(-1, merger.hidden_size)
            signals["features"] = x.split(sizes)
        if needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
            block = tower_hidden(encoded, len(visual.blocks) - 1)
            received, keys = self._attention(block, grid)
            unit = visual.spatial_merge_size**2  # a merged token's patches are consecutive
            signals["attention"] = received.view(-1, unit).mean(dim=1).split(sizes)
            signals["keys"] = keys.view(-1, unit, keys.shape[-1]).mean(dim=1).split(sizes)
        images = one_segment_each(embeds, self.projector, signals, frames)
        levels = encoded.deepstack_features
        if not levels:
            return images
        injected = [torch.stack(per_level, dim=1) for per_level in zip(*levels, strict=True)]
        return replace(images, injected=injected)

    def _attention(self, x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last tower block's attention each patch receives from the patches of its image
        or video temporal patch, the ones it attends to (mean over queries, summed over heads:
        the tower has no class token), and its head-averaged keys, for the block's input x
        (patches of all images or videos, C)."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
        from transformers.vision_utils import get_vision_position_ids

        visual = self.inner.visual
        block = visual.blocks[-1]
        attn = block.attn
        x = block.norm1(x)
        positions = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
        cos, sin = visual.rotary_pos_emb(x, positions)
        width = 2 * x.shape[-1]  # q and k: the first two thirds of the fused projection
        qk = F.linear(x, attn.qkv.weight[:width], attn.qkv.bias[:width])
        q, k = qk.reshape(len(x), 2, attn.num_heads, -1).unbind(dim=1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        received = []
        sizes = (grid[:, 1] * grid[:, 2]).repeat_interleave(grid[:, 0]).tolist()
        for q_image, k_image in zip(q.split(sizes), k.split(sizes), strict=True):
            probs = attention_probs(q_image.transpose(0, 1), k_image.transpose(0, 1), attn.scaling)
            received.append(probs.mean(dim=1).sum(dim=0))
        return torch.cat(received), k.mean(dim=1)

    def injection_inputs(self, prompt: Prompt) -> dict[str, Any]:
        if prompt.injected is None:
            return {}
        visual = prompt.placeholder
        levels = prompt.injected[visual].unbind(dim=1)
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": list(levels)}

    def vision_fields(self) -> dict[str, Any]:
        fields = super().vision_fields()
        visual = self.inner.visual
        # the deepstack mergers have the projector's widths: count them as more projected tokens
        deepstack = len(visual.deepstack_merger_list)
        return dict(
            fields,
            projected_tokens=fields["visual_tokens"] * (1 + deepstack),
            tower_attention=True,
            feature_block=len(visual.blocks) - 1,
        )

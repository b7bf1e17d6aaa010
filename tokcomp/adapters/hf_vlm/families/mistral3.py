"""Mistral 3 (Mistral3ForConditionalGeneration): a Pixtral tower at native image resolution
(2-D RoPE), its patches merged 2 x 2 by a learned merger before the projector, and rows of
image tokens separated by image-break tokens and closed by an image-end token."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.adapters.hf_vlm.families.base import (
    REFERENCE_PIXELS,
    Images,
    VLMFamily,
    one_segment_each,
    tower_fields,
)
from tokcomp.methods.visual import VisualSignal

_MODELS = "transformers.models."


class Mistral3(VLMFamily):
    """Mistral 3 (Mistral Small 3.1/3.2): each image's patch grid (its own size) through the
    Pixtral tower, RMS-normed, merged 2 x 2 (an unfold, then a Linear) and projected by an MLP.
    The image-break and image-end tokens are text tokens of the prompt (not placeholders), so
    no method can drop them. Features are the merger's inputs (four patches' normed features
    side by side); the projector methods see is the merger's Linear and the MLP."""

    handles = (f"{_MODELS}mistral3.modeling_mistral3.Mistral3ForConditionalGeneration",)
    image_inputs = ("pixel_values", "image_sizes", "vision_feature_layer")
    encoder_inputs = image_inputs

    @property
    def tower(self) -> nn.Module:
        return self.inner.vision_tower

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        projector = self.inner.multi_modal_projector
        merger = projector.patch_merger.merging_layer
        return (merger, projector.linear_1, projector.act, projector.linear_2)

    def option(self, inputs: dict[str, Any], name: str) -> Any:
        """A feature option from the call, else from the config."""
        value = inputs.get(name)
        return getattr(self.model.config, name) if value is None else value

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        signals = {}
        if VisualSignal.FEATURES in needs:
            signals["features"] = self._merger_inputs(encoded, inputs)
        return one_segment_each(list(encoded.pooler_output), self.projector, signals)

    def _merger_inputs(self, encoded: Any, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image (tokens, 4 C): the normed feature-layer patches each merged token takes,
        unfolded as the merger does."""
        layer = self.option(inputs, "vision_feature_layer")
        layers = [layer] if isinstance(layer, int) else layer
        hidden = torch.cat([encoded.hidden_states[i] for i in layers], dim=-1)[0]
        hidden = self.inner.multi_modal_projector.norm(hidden)
        patch, merge = self.tower.patch_size, self.model.config.spatial_merge_size
        grids = [(int(h) // patch, int(w) // patch) for h, w in inputs["image_sizes"]]
        unfolded = []
        for (h, w), patches in zip(grids, hidden.split([h * w for h, w in grids]), strict=True):
            grid = patches.view(h, w, -1).permute(2, 0, 1)[None]
            unfolded.append(F.unfold(grid, kernel_size=merge, stride=merge)[0].T)
        return unfolded

    def vision_fields(self) -> dict[str, Any]:
        """The reference image's merged tokens, then one image-break (the last: image-end)
        token per row of them, always kept."""
        tower = self.tower
        merge = self.model.config.spatial_merge_size
        side = REFERENCE_PIXELS // tower.patch_size // merge * merge
        tokens, rows = (side // merge) ** 2, side // merge
        fields = tower_fields(
            tower.transformer.layers,
            "attention",
            "feed_forward",
            side * side,
            tower.patch_conv,
            tower.config.num_attention_heads,
            tokens,
        )
        return dict(fields, visual_tokens=tokens + rows, fixed_visual=rows)

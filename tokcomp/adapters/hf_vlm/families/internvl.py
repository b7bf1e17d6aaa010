"""InternVL (InternVLForConditionalGeneration): an InternViT tower per image tile, pixel shuffle
and an MLP projector with a LayerNorm in front."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokcomp.adapters.hf_vlm.families.base import (
    Images,
    VLMFamily,
    one_segment_each,
    tower_fields,
    tower_hidden,
)
from tokcomp.methods.visual import VisualSignal

_MODELS = "transformers.models."


class InternVL(VLMFamily):
    """InternVL 2.5 / 3: each tile (the thumbnail too) is a tower pass whose patch tokens are
    pixel-shuffled (2x2 into one) before the projector; every tile is an image here, with its
    own budget (as Idefics3's tiles)."""

    handles = (f"{_MODELS}internvl.modeling_internvl.InternVLForConditionalGeneration",)
    image_inputs = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")
    encoder_inputs = image_inputs

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        projector = self.inner.multi_modal_projector
        return (projector.layer_norm, projector.linear_1, projector.act, projector.linear_2)

    def tower_kwargs(
        self, kwargs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, Any]:
        layer = self.option(kwargs, "vision_feature_layer")
        if VisualSignal.FEATURES in needs and layer != -1:
            kwargs = {**kwargs, "output_hidden_states": True}
        return kwargs

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        signals = {}
        if VisualSignal.FEATURES in needs:
            signals["features"] = self._projector_inputs(encoded, inputs)
        return one_segment_each(list(encoded.pooler_output), self.projector, signals)

    def _projector_inputs(self, encoded: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """(tiles, N, C) the pixel-shuffled features the projector takes, as the model makes
        them in get_image_features."""
        layer = self.option(inputs, "vision_feature_layer")
        hidden = encoded.last_hidden_state if layer == -1 else tower_hidden(encoded, layer)
        if self.option(inputs, "vision_feature_select_strategy") == "default":
            hidden = hidden[:, 1:]
        tiles, tokens, width = hidden.shape
        side = int(tokens**0.5)
        grid = hidden.reshape(tiles, side, side, width)
        shuffled = self.inner.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return shuffled.reshape(tiles, -1, shuffled.shape[-1])

    def vision_fields(self) -> dict[str, Any]:
        tower = self.inner.vision_tower
        embeddings = tower.embeddings.patch_embeddings
        patches = embeddings.num_patches
        shuffled = round(patches * self.model.config.downsample_ratio**2)
        return tower_fields(
            tower.encoder.layer,
            "attention",
            "mlp",
            patches,
            embeddings.projection,
            tower.config.num_attention_heads,
            shuffled,
            prefix=1,
        )

"""Idefics3 (Idefics3ForConditionalGeneration) and SmolVLM (SmolVLMForConditionalGeneration)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokcomp.adapters.hf_vlm.families.base import Images, VLMFamily, one_segment_each, tower_fields
from tokcomp.methods.visual import VisualSignal

_MODELS = "transformers.models."


class Idefics3(VLMFamily):
    """Idefics3 and SmolVLM: a SigLIP-style tower per image tile, pixel shuffle (the projector
    input is the shuffled rows) and one Linear projection; every tile is an image here."""

    handles = (
        f"{_MODELS}idefics3.modeling_idefics3.Idefics3ForConditionalGeneration",
        f"{_MODELS}smolvlm.modeling_smolvlm.SmolVLMForConditionalGeneration",
    )
    image_inputs = ("pixel_values", "pixel_attention_mask")
    encoder_inputs = image_inputs

    @property
    def language_model(self) -> nn.Module:
        return self.inner.text_model

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        return (self.inner.connector.modality_projection.proj,)

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        hidden = encoded.last_hidden_state
        tiles = hidden.shape[0]
        width = self.projector[0].out_features
        embeds = list(torch.cat(list(encoded.pooler_output)).view(tiles, -1, width))
        signals = {}
        if VisualSignal.FEATURES in needs:
            connector = self.inner.connector
            signals["features"] = connector.pixel_shuffle(hidden, connector.scale_factor)
        return one_segment_each(embeds, self.projector, signals)

    def vision_fields(self) -> dict[str, Any]:
        vision = self.inner.vision_model
        config = vision.config
        patches = (config.image_size // config.patch_size) ** 2
        return tower_fields(
            vision.encoder.layers,
            "self_attn",
            "mlp",
            patches,
            vision.embeddings.patch_embedding,
            config.num_attention_heads,
            patches // self.inner.connector.scale_factor**2,
        )

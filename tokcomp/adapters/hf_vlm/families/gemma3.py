"""Gemma 3 (Gemma3ForConditionalGeneration): a SigLIP tower without a class token, its patches
average-pooled to a fixed number of tokens per image, and image tokens that attend to each
other in both directions inside the language model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokcomp.adapters.hf_vision import HFVisionAdapter
from tokcomp.adapters.hf_vlm.families.base import (
    Images,
    VLMFamily,
    one_segment_each,
    tower_fields,
    tower_hidden,
)
from tokcomp.adapters.hf_vlm.families.llava import tower_attention
from tokcomp.adapters.hf_vlm.sequence import Prompt
from tokcomp.methods.visual import VisualSignal

_MODELS = "transformers.models."


class _RightProjection(nn.Linear):
    """Gemma 3's projection `x @ mm_input_projection_weight` as a Linear (weight read from the
    model at each call), so the projector is a chain of modules like any other."""

    def __init__(self, projector: nn.Module) -> None:
        nn.Module.__init__(self)
        self._projector = (projector,)  # a tuple: not registered as a submodule
        self.in_features, self.out_features = projector.mm_input_projection_weight.shape
        self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        return self._projector[0].mm_input_projection_weight.T


class Gemma3(VLMFamily):
    """Gemma 3: one SigLIP pass per image (pan-and-scan crops are images too), its patch grid
    average-pooled to mm_tokens_per_image tokens, then an RMSNorm and a projection (the
    projector methods see: features are the pooled tower outputs). Tower signals are those of
    the last block (no class token: the mean attention each patch receives) average-pooled like
    the patches. With token_type_ids (the processor's) the image tokens attend to each other in
    both directions: the kept ones of each image keep that block."""

    handles = (f"{_MODELS}gemma3.modeling_gemma3.Gemma3ForConditionalGeneration",)
    image_inputs = ("pixel_values", "token_type_ids")

    @property
    def tower(self) -> nn.Module:
        return self.inner.vision_tower

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        projector = self.inner.multi_modal_projector
        return (projector.mm_soft_emb_norm, _RightProjection(projector))

    def tower_kwargs(
        self, kwargs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, Any]:
        if needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
            kwargs = {**kwargs, "output_hidden_states": True}
        return kwargs

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        signals = {}
        if VisualSignal.FEATURES in needs:
            signals["features"] = self._pool(encoded.last_hidden_state)
        if needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
            block = self.tower.config.num_hidden_layers - 1  # the last
            attention, keys = tower_attention(self.tower, tower_hidden(encoded, block), block)
            signals["attention"] = self._pool(attention[..., None])[..., 0]
            signals["keys"] = self._pool(keys)
        return one_segment_each(list(encoded.pooler_output), self.projector, signals)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, patches, C) -> (B, tokens, C) by the projector's own average pooling."""
        projector = self.inner.multi_modal_projector
        side = projector.patches_per_image
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
        return projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def bidirectional_images(self, inputs: dict[str, Any]) -> bool:
        return inputs.get("token_type_ids") is not None

    def language_mask(self, prompt: Prompt, cache: Any) -> Any:
        """The model's full and sliding masks, each image's kept tokens one bidirectional block
        when the call gave token_type_ids (the processor marks exactly the placeholders)."""
        if not prompt.bidirectional:
            return prompt.mask
        from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

        return create_masks_for_vision_model(
            config=self.language_model.config,
            inputs_embeds=prompt.embeds,
            attention_mask=prompt.mask,
            cache=cache,
            position_ids=self.llm_positions(prompt.positions),
            block_sequence_ids=prompt.image_blocks(),
        )

    def vision_fields(self) -> dict[str, Any]:
        vision = self.tower
        config = vision.config
        patches = (config.image_size // config.patch_size) ** 2
        fields = tower_fields(
            vision.encoder.layers,
            "self_attn",
            "mlp",
            patches,
            vision.embeddings.patch_embedding,
            config.num_attention_heads,
            self.model.config.mm_tokens_per_image,
        )
        # the tower's forward runs its pooling head where the config has one (vision_use_head),
        # though Gemma 3 reads last_hidden_state only: priced as the hf_vision adapter prices it
        head = HFVisionAdapter(vision).spec()
        return dict(
            fields,
            head_macs=head.head_macs,
            head_token_macs=head.head_token_macs,
            tower_attention=True,
            feature_block=len(vision.encoder.layers) - 1,
        )

"""Mistral 3 (Mistral3ForConditionalGeneration): a Pixtral tower at native image resolution
(2-D RoPE), its patches merged 2 x 2 by a learned merger before the projector, and rows of
image tokens separated by image-break tokens and closed by an image-end token."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.adapters.base import attention_probs, split_heads
from tokcomp.adapters.hf_vlm.families.base import (
    REFERENCE_PIXELS,
    Images,
    VLMFamily,
    one_segment_each,
    tower_fields,
    tower_hidden,
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

    def tower_kwargs(
        self, kwargs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, Any]:
        wanted = needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}
        if wanted and kwargs.get("output_hidden_states") is not True:
            block = self._feature_block(kwargs)
            kwargs = {**kwargs, "output_hidden_states": [block, block + 1]}
        return kwargs

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        patch = self.tower.patch_size
        grids = [(int(h) // patch, int(w) // patch) for h, w in inputs["image_sizes"]]
        sizes = [h * w for h, w in grids]
        signals = {}
        if VisualSignal.FEATURES in needs:
            layer = self.option(inputs, "vision_feature_layer")
            layers = [layer] if isinstance(layer, int) else layer
            hidden = torch.cat([tower_hidden(encoded, i) for i in layers], dim=-1)[0]
            normed = self.inner.multi_modal_projector.norm(hidden).split(sizes)
            signals["features"] = [
                self._merged(x, grid, F.unfold) for x, grid in zip(normed, grids, strict=True)
            ]
        if needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
            block = self._feature_block(inputs)
            block_inputs = tower_hidden(encoded, block)[0].split(sizes)
            pairs = [
                (*self._attention(x, grid, block), grid)
                for x, grid in zip(block_inputs, grids, strict=True)
            ]
            signals["attention"] = [
                self._merged(a[:, None], grid, F.avg_pool2d)[:, 0] for a, _, grid in pairs
            ]
            signals["keys"] = [self._merged(k, grid, F.avg_pool2d) for _, k, grid in pairs]
        return one_segment_each(list(encoded.pooler_output), self.projector, signals)

    def _merged(self, patches: torch.Tensor, grid: tuple[int, int], combine: Any) -> torch.Tensor:
        """(h w, C) patch values -> (tokens, C') per merged token, by `combine` over each
        merge x merge window (F.unfold: side by side, as the merger; F.avg_pool2d: the mean)."""
        merge = self.model.config.spatial_merge_size
        image = patches.reshape(*grid, -1).permute(2, 0, 1)[None]
        return combine(image, kernel_size=merge, stride=merge)[0].flatten(1).T

    def _feature_block(self, inputs: dict[str, Any]) -> int:
        """The tower block whose output the projector takes (a single feature layer)."""
        layer = self.option(inputs, "vision_feature_layer")
        if not isinstance(layer, int):
            raise ValueError(
                "tower attention is read in the one block the projector takes; with several "
                "vision_feature_layer use a method without tower signals"
            )
        return layer % (len(self.tower.transformer.layers) + 1) - 1

    def _attention(
        self, x: torch.Tensor, grid: tuple[int, int], block: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tower block `block`'s attention each patch of one image receives (mean over the
        image's patches as queries, summed over heads; the tower's block mask keeps images
        apart) and its head-averaged keys, for the block's input x (h w, C) of the image."""
        from transformers.models.pixtral.modeling_pixtral import apply_rotary_pos_emb

        layer = self.tower.transformer.layers[block]
        attn = layer.attention
        x = layer.attention_norm(x)
        rows, cols = torch.meshgrid(
            *(torch.arange(n, device=x.device) for n in grid), indexing="ij"
        )
        cos, sin = self.tower.patch_positional_embedding(
            x, torch.stack([rows.flatten(), cols.flatten()], dim=-1)
        )
        q = split_heads(attn.q_proj(x)[None], attn.head_dim)
        k = split_heads(attn.k_proj(x)[None], attn.head_dim)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
        probs = attention_probs(q, k, attn.scaling)[0]
        return probs.mean(dim=1).sum(dim=0), k[0].mean(dim=0)

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
        layer = self.model.config.vision_feature_layer
        single = isinstance(layer, int)
        return dict(
            fields,
            visual_tokens=tokens + rows,
            fixed_visual=rows,
            text_visual=rows,
            tower_attention=single,
            feature_block=self._feature_block({}) if single else -1,
        )

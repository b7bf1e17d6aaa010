"""LLaVA-1.5 (LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from tokcomp.adapters.base import attention_probs, split_heads
from tokcomp.adapters.hf_vision import HFVisionAdapter
from tokcomp.adapters.hf_vlm.families.base import (
    REFERENCE_PIXELS,
    Images,
    Segment,
    VLMFamily,
    one_segment_each,
    tower_hidden,
)
from tokcomp.methods import VisualTokens
from tokcomp.methods.visual import VisualSignal
from tokcomp.schedule import ModelSpec

_MODELS = "transformers.models."
#: What get_video_features takes in the LLaVA families with videos (NeXT-Video, OneVision).
VIDEO_ENCODER_INPUTS = (
    "pixel_values_videos",
    "vision_feature_layer",
    "vision_feature_select_strategy",
)


class Llava(VLMFamily):
    """LLaVA-1.5: a CLIP or SigLIP tower, features of one layer (class token dropped by the
    "default" strategy), an MLP projector, one crop per image."""

    handles = (f"{_MODELS}llava.modeling_llava.LlavaForConditionalGeneration",)
    image_inputs = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    )
    encoder_inputs = image_inputs

    @property
    def tower(self) -> nn.Module:
        return self.inner.vision_tower

    @property
    def tower_adapter(self) -> HFVisionAdapter:
        """The hf_vision adapter of the tower (it knows where the tower keeps its parts)."""
        return HFVisionAdapter(self.tower)

    def feature_index(self, inputs: dict[str, Any]) -> int:
        """The (non-negative) hidden-state index of the single layer the projector reads."""
        layers = self.tower_adapter.tower_class.layers(self.tower)
        return self.option(inputs, "vision_feature_layer") % (len(layers) + 1)

    def tower_kwargs(
        self, kwargs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, Any]:
        """get_*_features arguments that also ask for the hidden states the tower-attention
        signals of `needs` read."""
        wanted = needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}
        if wanted and kwargs.get("output_hidden_states") is not True:
            index = self.feature_index(kwargs)
            kwargs = {**kwargs, "output_hidden_states": [index - 1, index]}
        return kwargs

    def crop_signals(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, torch.Tensor]:
        """Per crop (C, N, ...) tower-side signals: features, attention, keys as needed."""
        layer = self.option(inputs, "vision_feature_layer")
        drop = 1 if self.option(inputs, "vision_feature_select_strategy") == "default" else 0
        signals = {}
        if VisualSignal.FEATURES in needs:
            layers = [layer] if isinstance(layer, int) else layer
            signals["features"] = torch.cat(
                [tower_hidden(encoded, i)[:, drop:] for i in layers], dim=-1
            )
        if needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
            index = self.feature_index(inputs)
            attention, keys = tower_attention(
                self.tower, tower_hidden(encoded, index - 1), index - 1
            )
            signals.update(attention=attention[:, drop:], keys=keys[:, drop:])
        return signals

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        embeds = list(encoded.pooler_output)
        if embeds[0].shape[0] != expected:
            return Images(embeds, [], [expected] * len(embeds))
        return one_segment_each(embeds, self.projector, self.crop_signals(encoded, inputs, needs))

    def vision_fields(self) -> dict[str, Any]:
        tower = self.tower_adapter.spec()
        layer = self.model.config.vision_feature_layer
        drop = 1 if self.model.config.vision_feature_select_strategy == "default" else 0
        visual = tower.tokens - drop
        single = isinstance(layer, int)
        block = layer % (tower.depth + 1) - 1 if single else -1
        names = [f.name for f in fields(ModelSpec) if f.name not in ("family", "name", "attention")]
        return dict(
            {n: getattr(tower, n) for n in names},
            crops=1,
            visual_tokens=visual,
            fixed_visual=0,
            segments=(visual,),
            projected_tokens=visual,
            feature_prefix=drop,
            tower_methods=single,
            tower_unmerge=True,
            tower_attention=single and block >= 0,
            feature_block=block,
        )


def tower_attention(
    tower: nn.Module, x: torch.Tensor, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tower block `block`'s attention received (class-token row, or mean over queries without
    a class token), summed over heads, and its head-averaged keys, for input x."""
    tower_class = HFVisionAdapter(tower).tower_class
    layer = tower_class.parts(tower_class.layers(tower)[block])
    attn = layer.attention
    x = layer.norm1(x)
    queries = x[:, :1] if tower_class.class_token else x
    q = split_heads(attn.q_proj(queries), attn.head_dim)
    k = split_heads(attn.k_proj(x), attn.head_dim)
    probs = attention_probs(q.float(), k.float(), layer.scale)
    return probs.mean(dim=2).sum(dim=1), k.mean(dim=1)


class LlavaNext(Llava):
    """LLaVA-NeXT: anyres crops (a base crop and a grid, unpadded, an image-newline token after
    each grid row). Each crop is a segment with an even share of the image's budget; newline
    tokens are in no segment, so they are always kept."""

    handles = (f"{_MODELS}llava_next.modeling_llava_next.LlavaNextForConditionalGeneration",)

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        embeds = list(encoded.pooler_output)
        signals = self.crop_signals(encoded, inputs, needs)
        segments = []
        for image, codes in enumerate(self._codes(inputs)):
            for crop in codes[:, 0].unique().tolist():
                if crop < 0:
                    continue
                slots = (codes[:, 0] == crop).nonzero().squeeze(1)
                local = codes[slots, 1]
                extra = {k: v[crop, local][None] for k, v in signals.items()}
                visual = VisualTokens(embeds[image][slots][None], self.projector, **extra)
                segments.append(Segment(image, slots, visual))
        return Images(embeds, segments)

    def _codes(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image (n_i, 2) long: (global crop, token in crop) of every packed visual token,
        (-1, -1) for image-newline tokens; from the model's own packing of index tensors."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config, sizes = self.model.config, inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(
                "LLaVA-NeXT needs image_sizes with the images (the processor gives it)"
            )
        side = config.vision_config.image_size
        per_crop = (side // config.vision_config.patch_size) ** 2
        crops = [image_size_to_num_patches(s, config.image_grid_pinpoints, side) for s in sizes]
        starts = torch.tensor([0, *crops]).cumsum(0).tolist()
        codes = []
        for start, count in zip(starts, crops, strict=False):
            crop = torch.arange(start, start + count, dtype=torch.float32)
            token = torch.arange(per_crop, dtype=torch.float32)
            codes.append(torch.stack(torch.broadcast_tensors(crop[:, None], token[None]), dim=-1))
        strategy = self.option(inputs, "vision_feature_select_strategy")
        newline = torch.tensor([-1.0, -1.0])
        packed, _ = self.inner.pack_image_features(codes, sizes, strategy, image_newline=newline)
        return [p.round().long().to(sizes.device) for p in packed]

    def vision_fields(self) -> dict[str, Any]:
        config = self.model.config
        base = super().vision_fields()
        reference = torch.tensor([[REFERENCE_PIXELS, REFERENCE_PIXELS]])
        codes = self._codes({"image_sizes": reference})[0]
        crops = int(codes[:, 0].max()) + 1
        patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        return dict(
            base,
            crops=crops,
            visual_tokens=len(codes),
            fixed_visual=int((codes[:, 0] < 0).sum()),
            segments=tuple(int((codes[:, 0] == crop).sum()) for crop in range(crops)),
            projected_tokens=crops * patches,
            tower_methods=False,
            feature_block=-1,
        )

"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): images (anyres crops) and videos
(frames 2 x 2 pooled)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from tokcomp.adapters.hf_vlm.families.base import REFERENCE_PIXELS, Images, Segment
from tokcomp.adapters.hf_vlm.families.llava import VIDEO_ENCODER_INPUTS, Llava
from tokcomp.methods import VisualTokens
from tokcomp.methods.visual import VisualSignal
from tokcomp.schedule import VLMSpec

_MODELS = "transformers.models."
#: Signals packed along with the crop codes, in channel order.
_SIGNALS = ("attention", "keys", "features")
#: An anyres_max budget no grid reaches: packing without the pooling step.
_NO_POOLING = f"anyres_max_{2**31}"


class LlavaOnevision(Llava):
    """LLaVA-OneVision: a SigLIP tower, anyres crops as LLaVA-NeXT (a base crop, then the
    unpadded grid with an image-newline token after each row, bilinearly pooled down to
    anyres_max_N crops' worth of tokens when larger), one base crop and a newline per image in
    multi-image prompts. Each crop is a segment with an even share of the image's budget; a
    pooled grid token belongs to the crop that weighs most in it; newlines are always kept. A
    video: its frames through the tower, projected, 2 x 2 pooled and one newline after them;
    one segment of all frames' tokens, the newline always kept."""

    handles = (
        f"{_MODELS}llava_onevision.modeling_llava_onevision.LlavaOnevisionForConditionalGeneration",
    )
    image_inputs = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "vision_aspect_ratio",
        "batch_num_images",
        "pixel_values_videos",
        "image_sizes_videos",
    )
    # The model's forward gives get_image_features no vision_aspect_ratio (the config's holds).
    encoder_inputs = (
        "pixel_values",
        "image_sizes",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "batch_num_images",
    )

    video_encoder_inputs = VIDEO_ENCODER_INPUTS

    def videos(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> Images:
        """Each video's pooled frame tokens one segment (their features the pooled projector
        outputs, as for pooled crops; attention and keys pooled as the model pools outputs)."""
        embeds = list(encoded.pooler_output)
        frames = (len(embeds[0]) - 1) // self._pooled_per_frame()
        signals = self.crop_signals(encoded, inputs, needs - {VisualSignal.FEATURES})
        pooled = {name: self._pooled(value, frames) for name, value in signals.items()}
        segments = []
        for video, tokens in enumerate(embeds):
            slots = torch.arange(len(tokens) - 1, device=tokens.device)  # the newline: kept
            extra = {name: value[video][None] for name, value in pooled.items()}
            if VisualSignal.FEATURES in needs:
                extra["features"] = tokens[slots][None]
            visual = VisualTokens(tokens[slots][None], (), **extra)
            segments.append(Segment(video, slots, visual, frames))
        return Images(embeds, segments)

    def _pooled(self, signal: torch.Tensor, frames: int) -> torch.Tensor:
        """(videos x frames, tokens, ...) per-frame signal pooled by the model's own video
        pooling, as (videos, frames x pooled tokens, ...)."""
        pooled = self.inner.apply_pooling(_channels(signal))
        return pooled.reshape(-1, frames * pooled.shape[1], *signal.shape[2:]).to(signal.dtype)

    def video_spec(self, frames: int) -> VLMSpec:
        """A reference video of `frames` frames at the tower's size (the processor resizes them
        to it): each frame a tower pass and projected, then pooled, one newline."""
        spec = self.spec()
        pooled = frames * self._pooled_per_frame()
        return replace(
            spec,
            crops=frames,
            visual_tokens=pooled + 1,
            fixed_visual=1,
            segments=(pooled,),
            projected_tokens=frames * self._tokens_per_crop(),
            frames=frames,
            unprojected_segments=(0,),
        )

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        embeds = list(encoded.pooler_output)
        signals = self.crop_signals(encoded, inputs, needs)
        packed = self._pack(self._crops(inputs), signals, inputs["image_sizes"])
        segments = []
        for image, (crop_of, values, pooled) in enumerate(packed):
            for crop in crop_of.unique().tolist():
                if crop < 0:
                    continue
                slots = (crop_of == crop).nonzero().squeeze(1)
                outputs = embeds[image][slots][None]
                extra = {name: value[slots][None] for name, value in values.items()}
                projector = self.projector
                if pooled and crop > 0:  # pooled tokens exist only after the projector
                    projector = ()
                    extra = dict(extra, features=outputs) if "features" in extra else extra
                visual = VisualTokens(outputs, projector, **extra)
                segments.append(Segment(image, slots, visual))
        return Images(embeds, segments)

    def _crops(self, inputs: dict[str, Any]) -> list[int]:
        """Tower crops per image, as get_image_features counts them (one in multi-image
        prompts, given batch_num_images)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            image_size_to_num_patches,
        )

        config, sizes = self.model.config, inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(
                "LLaVA-OneVision needs image_sizes with the images (the processor gives it)"
            )
        per_sample = inputs.get("batch_num_images")
        single = [True] * len(sizes)
        if per_sample is not None:
            single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        side = config.vision_config.image_size
        return [
            image_size_to_num_patches(size, config.image_grid_pinpoints, side) if alone else 1
            for size, alone in zip(sizes, single, strict=True)
        ]

    def _pack(
        self, crops: list[int], signals: dict[str, torch.Tensor], sizes: torch.Tensor
    ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], bool]]:
        """Per image, the crop of every packed token (-1 for image-newline tokens), the signals
        at those tokens and whether its grid was pooled: the crops' one-hot codes and signals go
        through the model's own packing (unpadding, pooling), each token taking the crop that
        weighs most in it."""
        total, tokens = sum(crops), self._tokens_per_crop()
        device = self.inner.image_newline.device
        codes = torch.eye(max(crops), device=device)
        crop_index = torch.cat([torch.arange(n) for n in crops]).to(device)
        one_hot = codes[crop_index][:, None].expand(total, tokens, -1)
        names = [name for name in _SIGNALS if name in signals]
        columns = [_channels(signals[name]) for name in names]
        widths = [column.shape[-1] for column in columns]
        packed = self._packed(torch.cat([one_hot, *columns], dim=-1), crops, sizes)
        unpooled = self._packed(one_hot, crops, sizes, aspect_ratio=_NO_POOLING)
        out = []
        for rows, full in zip(packed, unpooled, strict=True):
            weights, rest = rows[:, : codes.shape[0]], rows[:, codes.shape[0] :]
            crop_of = weights.argmax(dim=1).masked_fill(weights.sum(dim=1) < 0.5, -1)
            values = {
                name: value.to(signals[name].dtype).reshape(len(rows), *signals[name].shape[2:])
                for name, value in zip(names, rest.split(widths, dim=-1), strict=True)
            }
            out.append((crop_of, values, len(rows) != len(full)))
        return out

    def _packed(
        self,
        channels: torch.Tensor,
        crops: list[int],
        sizes: torch.Tensor,
        aspect_ratio: str | None = None,
    ) -> list[torch.Tensor]:
        """(crops, tokens, C) per-crop values packed per image by the model, newlines zero."""
        packed, _ = self.inner.pack_image_features(
            channels.split(crops),
            sizes,
            image_newline=channels.new_zeros(channels.shape[-1]),
            vision_aspect_ratio=aspect_ratio or self.model.config.vision_aspect_ratio,
        )
        return packed

    def _pooled_per_frame(self) -> int:
        """Tokens of one video frame after the model's 2 x 2 pooling."""
        vision = self.model.config.vision_config
        return math.ceil(vision.image_size // vision.patch_size / 2) ** 2

    def _tokens_per_crop(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def vision_fields(self) -> dict[str, Any]:
        base = super().vision_fields()
        reference = torch.tensor([[REFERENCE_PIXELS, REFERENCE_PIXELS]])
        crops = self._crops({"image_sizes": reference})
        ((crop_of, _, pooled),) = self._pack(crops, {}, reference)
        return dict(
            base,
            crops=crops[0],
            visual_tokens=len(crop_of),
            fixed_visual=int((crop_of < 0).sum()),
            segments=tuple(int((crop_of == crop).sum()) for crop in range(crops[0])),
            unprojected_segments=tuple(range(1, crops[0])) if pooled else (),
            projected_tokens=crops[0] * self._tokens_per_crop(),
            tower_methods=False,
            feature_block=-1,
        )


def _channels(signal: torch.Tensor) -> torch.Tensor:
    """A (crops, tokens, ...) signal as float32 channels (crops, tokens, C)."""
    return signal.float().reshape(*signal.shape[:2], -1)

"""LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration): images as LLaVA-NeXT, and videos
(each frame through the tower, its feature-layer patches pooled by the model's resampler before
the projector)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from tokcomp.adapters.hf_vlm.families.base import Images, one_segment_each
from tokcomp.adapters.hf_vlm.families.llava import VIDEO_ENCODER_INPUTS, LlavaNext
from tokcomp.methods.visual import VisualSignal
from tokcomp.schedule import VLMSpec

_MODELS = "transformers.models."


class LlavaNextVideo(LlavaNext):
    """LLaVA-NeXT-Video: images as LLaVA-NeXT (anyres crops, image-newline tokens always kept).
    A video: every frame a tower pass; its feature-layer patches (the class token dropped by the
    "default" strategy) pooled by the model's `vision_resampler` (a stride x stride average in
    the released configs), then projected; frames one after another, no newline. One segment per
    video over all its frames' tokens, frame-major, with one budget. FEATURES are the pooled
    patches (the projector maps them to the video's tokens); ATTENTION and KEYS are the feature
    layer's, averaged over the same pooling windows."""

    handles = (
        f"{_MODELS}llava_next_video.modeling_llava_next_video.LlavaNextVideoForConditionalGeneration",
    )
    image_inputs = (*LlavaNext.image_inputs, "pixel_values_videos")
    video_encoder_inputs = VIDEO_ENCODER_INPUTS

    def videos(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> Images:
        embeds = list(encoded.pooler_output)
        per_frame = self._pooled_per_frame()
        frames = len(embeds[0]) // per_frame
        signals = self.crop_signals(encoded, inputs, needs)  # per frame: (videos x frames, ...)
        if "features" in signals:
            signals["features"] = self.inner.vision_resampler(signals["features"])
        for name in ("attention", "keys"):
            if name in signals:
                signals[name] = self._window_mean(signals[name])
        per_video = {
            name: value.reshape(len(embeds), frames * per_frame, *value.shape[2:])
            for name, value in signals.items()
        }
        return one_segment_each(embeds, self.projector, per_video, [frames] * len(embeds))

    def _window_mean(self, signal: torch.Tensor) -> torch.Tensor:
        """(frames, side x side, ...) per-patch signal averaged over the resampler's pooling
        windows: (frames, pooled, ...)."""
        stride, side = self.model.config.spatial_pool_stride, self._patches_per_side()
        grid = signal.float().reshape(len(signal), side, side, -1).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, stride).flatten(2).transpose(1, 2)
        return pooled.reshape(len(signal), pooled.shape[1], *signal.shape[2:]).to(signal.dtype)

    def _patches_per_side(self) -> int:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size

    def _pooled_per_frame(self) -> int:
        """Tokens of one video frame after the resampler."""
        return (self._patches_per_side() // self.model.config.spatial_pool_stride) ** 2

    def video_spec(self, frames: int) -> VLMSpec:
        """A reference video of `frames` frames at the tower's size (the processor resizes them
        to it): each frame a tower pass, pooled, then projected; one segment, no newline."""
        spec = self.spec()
        pooled = frames * self._pooled_per_frame()
        return replace(
            spec,
            crops=frames,
            visual_tokens=pooled,
            fixed_visual=0,
            segments=(pooled,),
            projected_tokens=pooled,
            frames=frames,
        )

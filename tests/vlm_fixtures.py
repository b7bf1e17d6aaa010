"""Tiny randomly initialised Hugging Face VLMs of every family tokcomp supports, and batched
inputs for them (left-padded prompts of different lengths, different numbers of images per
sample; for the "_video" families, videos and images alternating: Qwen's made from random
frames by Qwen2-VL's video processor, the LLaVA ones tower-sized random frames). Shared by the
VLM tests and the VQA harness; no network, no processor files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as hf
from torch import nn

import tokcomp

VOCAB = 128
PAD, BOS = 0, 1
IMAGE, VISION_START, VISION_END, FAKE_AROUND, VIDEO = 127, 126, 125, 124, 123
#: Pixtral's structural tokens: after each row of an image's tokens, the last one ends it.
IMAGE_BREAK, IMAGE_END = 122, 121
#: Ordinary text tokens are drawn from [TEXT_LOW, TEXT_HIGH).
TEXT_LOW, TEXT_HIGH = 2, 120

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=None,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)


def _llava() -> nn.Module:
    config = hf.LlavaConfig(
        vision_config=hf.CLIPVisionConfig(**_VISION, image_size=32, patch_size=8),
        text_config=hf.LlamaConfig(**_TEXT),
        image_token_index=IMAGE,
        image_seq_length=16,
    )
    return hf.LlavaForConditionalGeneration(config)


def _llava_siglip() -> nn.Module:
    config = hf.LlavaConfig(
        vision_config=hf.SiglipVisionConfig(**_VISION, image_size=32, patch_size=8),
        text_config=hf.LlamaConfig(**_TEXT),
        image_token_index=IMAGE,
        image_seq_length=16,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return hf.LlavaForConditionalGeneration(config)


def _llava_next() -> nn.Module:
    config = hf.LlavaNextConfig(
        vision_config=hf.CLIPVisionConfig(**_VISION, image_size=32, patch_size=8),
        text_config=hf.LlamaConfig(**_TEXT),
        image_token_index=IMAGE,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        image_seq_length=16,
    )
    return hf.LlavaNextForConditionalGeneration(config)


def _llava_onevision() -> nn.Module:
    """A SigLIP tower as the released models; anyres_max_1 so that larger grids are pooled."""
    config = hf.LlavaOnevisionConfig(
        vision_config=hf.SiglipVisionConfig(**_VISION, image_size=32, patch_size=8),
        text_config=hf.Qwen2Config(**_TEXT),
        image_token_index=IMAGE,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_aspect_ratio="anyres_max_1",
    )
    return hf.LlavaOnevisionForConditionalGeneration(config)


def _llava_onevision_video() -> nn.Module:
    model = _llava_onevision()
    model.config.video_token_id = VIDEO
    return model


def _llava_next_video() -> nn.Module:
    """A CLIP tower of 4 x 4 patches: each video frame's patches 2 x 2 average-pooled (the
    released stride and mode) to 4 tokens."""
    config = hf.LlavaNextVideoConfig(
        vision_config=hf.CLIPVisionConfig(**_VISION, image_size=32, patch_size=8),
        text_config=hf.LlamaConfig(**_TEXT),
        image_token_index=IMAGE,
        video_token_index=VIDEO,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        image_seq_length=16,
    )
    return hf.LlavaNextVideoForConditionalGeneration(config)


def _qwen_text() -> dict:
    text = dict(
        _TEXT,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]},
    )
    return text


def _qwen2_vl() -> nn.Module:
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=48,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    config = hf.Qwen2VLConfig(
        text_config=_qwen_text(),
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return hf.Qwen2VLForConditionalGeneration(config)


def _qwen2_5_vl() -> nn.Module:
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=48,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    config = hf.Qwen2_5_VLConfig(
        text_config=_qwen_text(),
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return hf.Qwen2_5_VLForConditionalGeneration(config)


def _qwen3_vl() -> nn.Module:
    """Deepstack features from two of three tower blocks, injected after decoder layers 0 and
    1; 16-pixel patches (a 336-pixel reference image is 441 patches); interleaved MRoPE."""
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=48,
        num_heads=2,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0, 1],
    )
    text = _qwen_text()
    text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
    config = hf.Qwen3VLConfig(
        text_config=dict(text, head_dim=12),
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
    )
    return hf.Qwen3VLForConditionalGeneration(config)


def _idefics3() -> nn.Module:
    config = hf.Idefics3Config(
        vision_config=dict(_VISION, image_size=32, patch_size=4),
        text_config=hf.LlamaConfig(**_TEXT),
        image_token_id=IMAGE,
        scale_factor=2,
    )
    return hf.Idefics3ForConditionalGeneration(config)


def _smolvlm() -> nn.Module:
    config = hf.SmolVLMConfig(
        vision_config=dict(_VISION, image_size=32, patch_size=4),
        text_config=hf.LlamaConfig(**_TEXT),
        image_token_id=IMAGE,
        scale_factor=2,
    )
    return hf.SmolVLMForConditionalGeneration(config)


def _internvl() -> nn.Module:
    vision = hf.InternVLVisionConfig(**_VISION, image_size=32, patch_size=4)
    config = hf.InternVLConfig(
        vision_config=vision,
        text_config=hf.Qwen2Config(**_TEXT),
        image_token_id=IMAGE,
        image_seq_length=16,
    )
    return hf.InternVLForConditionalGeneration(config)


def _gemma3() -> nn.Module:
    """Sliding layers first (FastV scores in one), a window the prompts exceed; untied output
    embeddings and unscaled input ones (else the tiny model repeats its last token and hardly
    sees the images)."""
    text = hf.Gemma3TextConfig(
        **_TEXT,
        tie_word_embeddings=False,
        head_dim=12,
        sliding_window=12,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    )
    config = hf.Gemma3Config(
        vision_config=hf.SiglipVisionConfig(**_VISION, image_size=32, patch_size=4),
        text_config=text,
        mm_tokens_per_image=16,
        image_token_index=IMAGE,
        boi_token_index=VISION_START,
        eoi_token_index=VISION_END,
        tie_word_embeddings=False,
    )
    model = hf.Gemma3ForConditionalGeneration(config)
    model.model.language_model.embed_tokens.embed_scale.fill_(1.0)
    return model


def _mistral3() -> nn.Module:
    """A Pixtral tower (2-D RoPE, native image sizes in multiples of 16 pixels) and a 2 x 2
    patch merger; a text model without a sliding window, as Mistral Small 3.1's."""
    vision = hf.PixtralVisionConfig(**_VISION, image_size=48, patch_size=8, head_dim=16)
    config = hf.Mistral3Config(
        vision_config=vision,
        text_config=hf.MistralConfig(**_TEXT, sliding_window=None),
        image_token_index=IMAGE,
        spatial_merge_size=2,
    )
    return hf.Mistral3ForConditionalGeneration(config)


@dataclass(frozen=True)
class Family:
    """How to build a tiny model of one family and its per-image inputs."""

    build: Callable[[], nn.Module]
    kind: str  # "llava", "llava_next", "qwen", "qwen_video", "anyres_video" (anyres images,
    # videos as frame tensors), "idefics", "gemma" or "pixtral"


FAMILIES: dict[str, Family] = {
    "llava": Family(_llava, "llava"),
    "llava_siglip": Family(_llava_siglip, "llava"),
    "llava_next": Family(_llava_next, "llava_next"),
    "llava_onevision": Family(_llava_onevision, "llava_next"),
    "llava_onevision_video": Family(_llava_onevision_video, "anyres_video"),
    "llava_next_video": Family(_llava_next_video, "anyres_video"),
    "qwen2_vl": Family(_qwen2_vl, "qwen"),
    "qwen2_5_vl": Family(_qwen2_5_vl, "qwen"),
    "qwen3_vl": Family(_qwen3_vl, "qwen"),
    "qwen2_vl_video": Family(_qwen2_vl, "qwen_video"),
    "qwen2_5_vl_video": Family(_qwen2_5_vl, "qwen_video"),
    "qwen3_vl_video": Family(_qwen3_vl, "qwen_video"),
    "idefics3": Family(_idefics3, "idefics"),
    "smolvlm": Family(_smolvlm, "idefics"),
    "internvl": Family(_internvl, "llava"),
    "gemma3": Family(_gemma3, "gemma"),
    "mistral3": Family(_mistral3, "pixtral"),
}


#: The LLaVA families: a CLIP or SigLIP tower that tokcomp's hf_vision adapter patches (its
#: attention for the tower-signal methods, merging with unmerge beside a visual-token method).
LLAVA_FAMILIES = (
    "llava",
    "llava_siglip",
    "llava_next",
    "llava_onevision",
    "llava_onevision_video",
    "llava_next_video",
)


def tiny_vlm(family: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised VLM of `family` in eval mode (sdpa attention). Weights are
    spread so attention and similarities are informative (no near-ties in generation)."""
    torch.manual_seed(seed)
    model = FAMILIES[family].build().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1 and "embed" not in name:
                param.normal_(0, 0.9 / param.shape[1] ** 0.5)
            elif "embed_tokens" in name or "image_newline" in name:
                param.normal_(0, 1.0)
    return model


@dataclass
class Sample:
    """One prompt: its token ids and the tensors of its images, in the family's layout."""

    input_ids: torch.Tensor  # (L,)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    images_count: int = 0


def sample(model: nn.Module, family: str, images: int, text: int, seed: int) -> Sample:
    """A prompt with `images` images (each followed by a few text tokens) and `text` tokens
    after the last image; image sizes vary with the seed where the family allows it ("_video"
    families: the even-numbered images are videos)."""
    generator = torch.Generator().manual_seed(seed)
    kind = FAMILIES[family].kind
    blocks, tensors = [], []
    for index in range(images):
        pixels, tokens, extra = _image(model, kind, generator, index)
        blocks.append((_text(generator, 2 + index), tokens))
        tensors.append((pixels, extra))
    ids = [torch.tensor([BOS])]
    for prefix, tokens in blocks:
        ids += [prefix, tokens]
    ids.append(_text(generator, text))
    return Sample(torch.cat(ids), _stack_images(kind, tensors), images)


def _text(generator: torch.Generator, length: int) -> torch.Tensor:
    return torch.randint(TEXT_LOW, TEXT_HIGH, (length,), generator=generator)


def _image(
    model: nn.Module, kind: str, generator: torch.Generator, index: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One image: its pixel tensor, its placeholder tokens, and per-image extras."""
    if kind == "llava":
        size = model.config.vision_config.image_size
        size = size if isinstance(size, int) else size[0]  # InternVL: (height, width)
        pixels = torch.randn(3, size, size, generator=generator)
        return pixels, torch.full((model.config.image_seq_length,), IMAGE), {}
    if kind == "llava_next":
        return _next_image(model, generator, index)
    if kind == "qwen":
        return _qwen_image(model, generator, index)
    if kind == "pixtral":
        return _pixtral_image(model, generator, index)
    if kind == "qwen_video":
        return _qwen_video(model, generator) if index % 2 == 0 else _qwen_item(model, generator)
    if kind == "anyres_video":
        if index % 2 == 0:
            return _frames_video(model, generator)
        pixels, tokens, extra = _next_image(model, generator, index)
        return (
            None,
            tokens,
            {"pixel_values": pixels[None], "image_sizes": extra["image_sizes"][None]},
        )
    if kind == "gemma":
        size = model.config.vision_config.image_size
        pixels = torch.randn(3, size, size, generator=generator)
        count = model.config.mm_tokens_per_image
        tokens = torch.tensor([VISION_START, *[IMAGE] * count, VISION_END])
        return pixels, tokens, {}
    size = model.config.vision_config.image_size
    pixels = torch.randn(3, size, size, generator=generator)
    per_image = model.model.image_seq_len
    tokens = torch.cat(
        [torch.tensor([FAKE_AROUND]), torch.full((per_image,), IMAGE), torch.tensor([FAKE_AROUND])]
    )
    return pixels, tokens, {}


def _next_image(
    model: nn.Module, generator: torch.Generator, index: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """An anyres image (its crops) of a size chosen by `index`; the placeholder count comes
    from the model's own packing."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config = model.config
    size = [(40, 60), (64, 30), (32, 32)][index % 3]
    crops = image_size_to_num_patches(
        size, config.image_grid_pinpoints, config.vision_config.image_size
    )
    side = config.vision_config.image_size
    pixels = torch.randn(crops, 3, side, side, generator=generator)
    with torch.no_grad():
        features = model.model.get_image_features(pixels[None], torch.tensor([size])).pooler_output
    count = features[0].shape[0]
    return pixels, torch.full((count,), IMAGE), {"image_sizes": torch.tensor(size)}


def _qwen_image(
    model: nn.Module, generator: torch.Generator, index: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    vision = model.config.vision_config
    grid = [(1, 4, 6), (1, 6, 4), (1, 4, 4)][index % 3]
    patches = grid[0] * grid[1] * grid[2]
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(patches, width, generator=generator)
    count = patches // vision.spatial_merge_size**2
    tokens = torch.cat(
        [torch.tensor([VISION_START]), torch.full((count,), IMAGE), torch.tensor([VISION_END])]
    )
    return pixels, tokens, {"image_grid_thw": torch.tensor(grid)}


def _pixtral_image(
    model: nn.Module, generator: torch.Generator, index: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A native-size image (zero-padded to the largest size, as the processor batches them)
    and its tokens as the Pixtral processor lays them out: each row of merged tokens followed
    by an image-break token, the last by an image-end token."""
    largest = model.config.vision_config.image_size
    height, width = [(32, 48), (32, 32), (48, 32)][index % 3]
    pixels = torch.zeros(3, largest, largest)
    pixels[:, :height, :width] = torch.randn(3, height, width, generator=generator)
    step = model.config.vision_config.patch_size * model.config.spatial_merge_size
    row = [IMAGE] * (width // step) + [IMAGE_BREAK]
    tokens = torch.tensor(row * (height // step))
    tokens[-1] = IMAGE_END
    return pixels, tokens, {"image_sizes": torch.tensor([height, width])}


def _qwen_item(
    model: nn.Module, generator: torch.Generator
) -> tuple[None, torch.Tensor, dict[str, torch.Tensor]]:
    """A Qwen image among videos: its tensors all in the extras, grid as a (1, 3) row."""
    pixels, tokens, extra = _qwen_image(model, generator, 1)
    return None, tokens, {"pixel_values": pixels, "image_grid_thw": extra["image_grid_thw"][None]}


#: Video shapes (frames, height and width in patches) and frame rates the fixture draws from.
_VIDEOS = [((4, 4, 6), 2.0), ((6, 6, 4), 1.0), ((2, 4, 4), 4.0)]


def _qwen_video(
    model: nn.Module, generator: torch.Generator
) -> tuple[None, torch.Tensor, dict[str, torch.Tensor]]:
    """A video of random frames of a drawn shape through Qwen2-VL's video processor (2 frames
    per temporal patch); Qwen2.5-VL also gets its seconds per temporal patch. Qwen3-VL's
    processor writes each temporal patch as its own run: "<t seconds>" (here 3 random text
    tokens), then the vision start token, the run's placeholders and the vision end token."""
    vision = model.config.vision_config
    (frames, rows, cols), fps = _VIDEOS[int(torch.randint(3, (1,), generator=generator))]
    height, width = rows * vision.patch_size, cols * vision.patch_size
    processor = hf.Qwen2VLVideoProcessor(
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
        min_pixels=64,
        max_pixels=height * width,
        do_sample_frames=False,
        cap_pixels_per_frame=True,
    )
    video = torch.randint(0, 256, (frames, height, width, 3), generator=generator)
    tensors = dict(processor(videos=[video.to(torch.uint8).numpy()], return_tensors="pt"))
    temporal, rows, cols = tensors["video_grid_thw"][0].tolist()
    per_frame = rows * cols // vision.spatial_merge_size**2
    if model.config.model_type == "qwen2_5_vl":
        tensors["second_per_grid_ts"] = torch.tensor([vision.temporal_patch_size / fps])
    if model.config.model_type == "qwen3_vl":
        run = [VISION_START, *[VIDEO] * per_frame, VISION_END]
        runs = [torch.cat([_text(generator, 3), torch.tensor(run)]) for _ in range(temporal)]
        return None, torch.cat(runs), tensors
    tokens = torch.tensor([VISION_START, *[VIDEO] * (temporal * per_frame), VISION_END])
    return None, tokens, tensors


#: Frames of every LLaVA-OneVision and LLaVA-NeXT-Video video (the model takes them as one
#: tensor, so all videos of a call have as many).
VIDEO_FRAMES = 3


def _frames_video(
    model: nn.Module, generator: torch.Generator
) -> tuple[None, torch.Tensor, dict[str, torch.Tensor]]:
    """A video of tower-sized frames; its placeholder count from the model's own
    get_video_features (LLaVA-OneVision: per frame the 2 x 2-pooled grid, then one newline
    token; LLaVA-NeXT-Video: per frame the resampled grid)."""
    side = model.config.vision_config.image_size
    frames = torch.randn(1, VIDEO_FRAMES, 3, side, side, generator=generator)
    with torch.no_grad():
        count = model.model.get_video_features(frames).pooler_output[0].shape[0]
    return None, torch.full((count,), VIDEO), {"pixel_values_videos": frames}


def _stack_images(
    kind: str, tensors: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]
) -> dict[str, torch.Tensor]:
    if not tensors:
        return {}
    if kind == "qwen_video":
        return _concat_by_name([extra for _, extra in tensors])
    if kind == "anyres_video":
        return _concat_by_name(_crops_padded([extra for _, extra in tensors]))
    extras = {name: torch.stack([extra[name] for _, extra in tensors]) for name in tensors[0][1]}
    pixels = [pixels for pixels, _ in tensors]
    if kind == "qwen":
        return {"pixel_values": torch.cat(pixels), **extras}
    if kind == "llava_next":
        crops = max(p.shape[0] for p in pixels)
        padded = [torch.cat([p, p.new_zeros(crops - p.shape[0], *p.shape[1:])]) for p in pixels]
        return {"pixel_values": torch.stack(padded), **extras}
    return {"pixel_values": torch.stack(pixels), **extras}


def collate(family: str, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Batch `samples`: left-padded input_ids and attention_mask, the images of all samples in
    the family's layout (Idefics3/SmolVLM: padded per sample with all-zero images)."""
    kind = FAMILIES[family].kind
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), PAD)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, length - len(s.input_ids) :] = s.input_ids
        mask[row, length - len(s.input_ids) :] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    with_images = [s for s in samples if s.images_count]
    if kind == "idefics":
        batch.update(_idefics_pixels(samples))
    elif with_images:
        batch.update(_concat_images(kind, with_images))
    if kind in ("qwen", "qwen_video"):
        batch["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    if kind == "gemma":
        batch["token_type_ids"] = (ids == IMAGE).long()
    return batch


def _crops_padded(parts: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The parts' anyres pixel_values (images, crops, ...) zero-padded to the most crops."""
    crops = max((p["pixel_values"].shape[1] for p in parts if "pixel_values" in p), default=0)
    padded = []
    for part in parts:
        if "pixel_values" in part:
            p = part["pixel_values"]
            pad = p.new_zeros(p.shape[0], crops - p.shape[1], *p.shape[2:])
            part = {**part, "pixel_values": torch.cat([p, pad], dim=1)}
        padded.append(part)
    return padded


def _concat_by_name(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every tensor name of `parts`, concatenated over the parts that have it, in order."""
    names = dict.fromkeys(name for part in parts for name in part)
    return {name: torch.cat([part[name] for part in parts if name in part]) for name in names}


def _concat_images(kind: str, samples: list[Sample]) -> dict[str, torch.Tensor]:
    if kind == "qwen_video":
        return _concat_by_name([s.images for s in samples])
    if kind == "anyres_video":
        return _concat_by_name(_crops_padded([s.images for s in samples]))
    names = samples[0].images.keys()
    if kind != "llava_next":
        return {name: torch.cat([s.images[name] for s in samples]) for name in names}
    crops = max(s.images["pixel_values"].shape[1] for s in samples)
    pixels = []
    for s in samples:
        p = s.images["pixel_values"]
        pixels.append(torch.cat([p, p.new_zeros(p.shape[0], crops - p.shape[1], *p.shape[2:])], 1))
    return {
        "pixel_values": torch.cat(pixels),
        "image_sizes": torch.cat([s.images["image_sizes"] for s in samples]),
    }


def _idefics_pixels(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """(B, max images, 3, H, W) with all-zero padding images, as the Idefics3 processor makes."""
    most = max(s.images_count for s in samples)
    if most == 0:
        return {}
    shape = next(s.images["pixel_values"].shape[1:] for s in samples if s.images_count)
    pixels = torch.zeros(len(samples), most, *shape)
    for row, s in enumerate(samples):
        if s.images_count:
            pixels[row, : s.images_count] = s.images["pixel_values"]
    return {"pixel_values": pixels}


def batch_inputs(
    model: nn.Module, family: str, layout: list[tuple[int, int]], seed: int = 0
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A batch of prompts with (images, text tokens) per sample, and each sample alone."""
    samples = [sample(model, family, n, t, seed + 7 * i) for i, (n, t) in enumerate(layout)]
    return collate(family, samples), [collate(family, [s]) for s in samples]


def assert_config_reloads(
    config: Any,
    make_model: Callable[[], nn.Module],
    model: nn.Module,
    run: Callable,
    batch: Any,
    folder: Path,
) -> None:
    """`config`, saved as JSON and as YAML, loads equal and, applied to a fresh model, gives the
    same config and the same `run(model, batch)` output as `model`."""
    for suffix in (".json", ".yaml"):
        path = config.save(folder / f"{config.method}{suffix}")
        assert tokcomp.Config.load(path) == config
        other = tokcomp.apply(make_model(), path)
        assert tokcomp.config_of(other) == config
        assert torch.equal(run(other, batch), run(model, batch))

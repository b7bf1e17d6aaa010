"""CDPruner: keep the visual tokens of maximal conditional diversity, a greedy DPP MAP on their
similarity weighted by their relevance to the instruction (Zhang et al., "Beyond Attention or
Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs", NeurIPS 2025;
Theia-4869/CDPruner; docs/methods.md section 6.9)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualGeometry, VisualMethod, VisualSignal, VisualTokens
from tokcomp.ops import greedy_dpp

#: Added to the shifted relevance so the least relevant token keeps a non-zero weight (released
#: llava_arch.py encode_images).
RELEVANCE_FLOOR = 1e-6
#: The CLIP checkpoint LLaVA-1.5's and LLaVA-NeXT's vision towers come from, whose text tower
#: the released code loads.
RELEASED_CLIP = "openai/clip-vit-large-patch14-336"
#: Largest relative distance between the tower's and the CLIP checkpoint's vision weights
#: accepted as the same tower (LLaVA-NeXT fine-tunes its tower a little; an unrelated or
#: re-initialised CLIP of the same shape lies near 1 to 1.4).
TOWER_TOLERANCE = 0.25
#: What the released relevance reads: the tower's feature-layer patches and the prompt's text.
CLIP_NEEDS = frozenset({VisualSignal.FEATURES, VisualSignal.PROMPT})


def instruction_relevance(unit: torch.Tensor, text: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(B, N) relevance of unit-norm visual tokens (B, N, D) to their prompts' text: the mean
    over the text tokens of their cosine similarity to the token (one matmul with the mean
    unit text vector), min-max normalised per sample as the released code does over its whole
    batch (shifted_minmax: from 1e-6 / (max - min) up to just above 1)."""
    rows = []
    for tokens, words in zip(unit, text, strict=True):
        if words.shape[0] == 0:
            raise ValueError(
                "cdpruner: a prompt has no text tokens to condition its visual tokens on; give "
                "each image an instruction (or use divprune, its unconditional counterpart)"
            )
        rows.append((tokens @ mean_direction(words)[:, None])[:, 0])
    return shifted_minmax(torch.stack(rows))


def mean_direction(vectors: torch.Tensor) -> torch.Tensor:
    """The mean of the unit vectors along (M, D) `vectors`, as float32 (D,): its dot product
    with a unit vector is their mean cosine to it."""
    return F.normalize(vectors.float(), dim=-1).mean(dim=0)


def shifted_minmax(relevance: torch.Tensor) -> torch.Tensor:
    """Each row of (B, N) `relevance` as (r - min r + 1e-6) / (max r - min r)."""
    low, high = relevance.aminmax(dim=1, keepdim=True)
    return (relevance - low + RELEVANCE_FLOOR) / (high - low)


def load_clip(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, Any]:
    """The CLIPModel (float32, eval, on `device`) and tokenizer saved in the folder `path`;
    one copy per device, so that models on different devices never move a shared one."""
    return _load_clip(path, torch.device(device))


@functools.lru_cache(maxsize=2)
def _load_clip(path: str, device: torch.device) -> tuple[nn.Module, Any]:
    from transformers import AutoTokenizer, CLIPModel

    try:
        clip = CLIPModel.from_pretrained(path).float().eval().to(device)
        return clip, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cdpruner: text_encoder={path!r} is no CLIP checkpoint folder with its tokenizer "
            f"({type(error).__name__}); pass the local folder of the CLIP model the vision "
            f"tower comes from ({RELEASED_CLIP} for LLaVA-1.5 and LLaVA-NeXT)"
        ) from error


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in the folder `path`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cdpruner: prompt_tokenizer={path!r} holds no tokenizer ({type(error).__name__}); "
            "pass the local folder of the VLM's tokenizer (or processor)"
        ) from error


def tower_distance(clip: nn.Module, tower: nn.Module) -> float:
    """Relative Frobenius distance between a CLIPVisionModel's weights and a CLIPModel's vision
    weights (inf where their shapes differ)."""
    own, reference = tower.state_dict(), clip.vision_model.state_dict()
    if own.keys() != reference.keys() or any(
        own[name].shape != weight.shape for name, weight in reference.items()
    ):
        return math.inf
    difference = sum(
        float((own[n].float() - w.to(own[n].device).float()).square().sum())
        for n, w in reference.items()
    )
    size = sum(float(w.float().square().sum()) for w in reference.values())
    return math.sqrt(difference / size)


def text_embeds(clip: nn.Module, tokenizer: Any, text: str) -> torch.Tensor:
    """(M, P) CLIP text embeddings of `text` as the released clip_encoder.py forms them:
    tokenised without truncation, ids and mask padded with zeros to M whole context windows,
    each window through the text tower and text_projection."""
    tokens = tokenizer(text, return_tensors="pt")
    window = clip.config.text_config.max_position_embeddings
    pad = -tokens["input_ids"].shape[1] % window
    device = clip.text_projection.weight.device
    ids, mask = (
        F.pad(tokens[name], (0, pad)).reshape(-1, window).to(device)
        for name in ("input_ids", "attention_mask")
    )
    return clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)


def clip_relevance(
    clip: nn.Module, tokenizer: Any, features: torch.Tensor, texts: list[str]
) -> torch.Tensor:
    """(B, N) the released relevance of feature-layer patches (B, N, C) to their samples'
    texts: minus the mean cosine between the patches through the tower's post-layernorm and
    visual_projection and the texts' CLIP embeddings, min-max normalised per sample (`clip`
    on the features' device)."""
    image = clip.visual_projection(clip.vision_model.post_layernorm(features.float()))
    unit = F.normalize(image, dim=-1)
    directions = {text: mean_direction(text_embeds(clip, tokenizer, text)) for text in set(texts)}
    rows = [-(tokens @ directions[t][:, None])[:, 0] for tokens, t in zip(unit, texts, strict=True)]
    return shifted_minmax(torch.stack(rows))


def text_tower_macs(config: Any) -> int:
    """Multiply-adds of one context window through a CLIP text tower and text_projection."""
    text = config.text_config
    window, width = text.max_position_embeddings, text.hidden_size
    layer = (
        4 * window * width**2 + 2 * window**2 * width + 2 * window * width * text.intermediate_size
    )
    return text.num_hidden_layers * layer + width * config.projection_dim


@register
@dataclass(kw_only=True)
class CDPruner(VisualMethod):
    """Greedy MAP of the DPP with kernel L = diag(r) S diag(r) over an image's projector outputs
    (S their cosine similarities, r their relevance to the prompt's text), exactly `keep` steps
    (default 64, the released scripts' smallest budget; 128 and 192 are the others;
    LLaVA-NeXT: the image's budget in even shares per crop, where the released budget is per
    crop); kept tokens in raster order, numbered contiguously.

    By default r is instruction_relevance: the prompt's own tokens in the language model's input
    embeddings (a Hugging Face VLM checkpoint holds no CLIP text tower). With `text_encoder`,
    the local folder of the CLIP checkpoint a CLIP vision tower comes from, and
    `prompt_tokenizer`, the VLM's tokenizer folder, r is the released one (clip_relevance): the
    sample's text after its last image, decoded, through CLIP's text tower, against the
    feature-layer patches through post_layernorm and visual_projection."""

    name: ClassVar[str] = "cdpruner"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset({VisualSignal.TEXT})

    keep: int | float = 64
    text_encoder: str | None = None
    prompt_tokenizer: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.text_encoder is None) != (self.prompt_tokenizer is None):
            raise ValueError(
                "cdpruner: give text_encoder (the CLIP checkpoint's folder) and prompt_tokenizer "
                "(the VLM's tokenizer folder, to read the instruction back as text) together"
            )
        if self.text_encoder is not None:
            self.visual_needs = CLIP_NEEDS  # type: ignore[misc]  # this instance's signals

    def check_tower(self, tower: nn.Module | None) -> None:
        """With text_encoder: refuse a tower that is not the CLIP checkpoint's vision model."""
        if self.text_encoder is None:
            return
        from transformers import CLIPVisionModel

        if not isinstance(tower, CLIPVisionModel):
            kind = "not one tokcomp reads" if tower is None else type(tower).__name__
            raise ValueError(
                f"cdpruner: text_encoder needs a CLIP vision tower (LLaVA-1.5, LLaVA-NeXT); this "
                f"model's tower is {kind}: leave text_encoder unset to score relevance against "
                "the language model's text embeddings (the default)"
            )
        distance = tower_distance(load_clip(self.text_encoder)[0], tower)
        if distance > TOWER_TOLERANCE:
            apart = "of other shapes" if math.isinf(distance) else f"{distance:.2f} apart, relative"
            raise ValueError(
                f"cdpruner: text_encoder={self.text_encoder!r} is not the CLIP checkpoint this "
                f"model's vision tower comes from (vision weights {apart}); pass that checkpoint "
                f"({RELEASED_CLIP} for LLaVA-1.5 and LLaVA-NeXT)"
            )

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        unit = F.normalize(visual.outputs.float(), dim=-1)
        similarity = unit @ unit.transpose(-1, -2)
        return greedy_dpp(similarity, self.relevance(visual, unit), keep)

    def relevance(self, visual: VisualTokens, unit: torch.Tensor) -> torch.Tensor:
        """(B, N) each visual token's relevance to its sample's instruction."""
        if self.text_encoder is None:
            return instruction_relevance(unit, visual.text)
        clip, tokenizer = load_clip(self.text_encoder, visual.features.device)
        return clip_relevance(clip, tokenizer, visual.features, self.instructions(visual))

    def instructions(self, visual: VisualTokens) -> list[str]:
        """Each image's instruction: its sample's text after its last image, decoded."""
        decoder = load_tokenizer(self.prompt_tokenizer)
        texts = [decoder.decode(ids, skip_special_tokens=True).strip() for ids in visual.prompt]
        if not all(texts):
            raise ValueError(
                "cdpruner: a prompt has no text after its images for CLIP's text tower; put "
                "the instruction after the image (or leave text_encoder unset)"
            )
        return texts

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """The N x N cosine similarities and the N relevances (the greedy steps count 0); with
        text_encoder, the N patches through visual_projection and one context window of text
        through CLIP's text tower."""
        similarity = (tokens * tokens + tokens) * geometry.output_width
        if self.text_encoder is None:
            return similarity
        config = load_clip(self.text_encoder)[0].config
        projected = tokens * (config.vision_config.hidden_size + 1) * config.projection_dim
        return tokens * tokens * geometry.output_width + projected + text_tower_macs(config)

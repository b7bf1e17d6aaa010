"""What a VLM family is: where one Hugging Face VLM class keeps its parts, how its images
become visual tokens (per image, in segments a method chooses from) and how it numbers
positions; and its geometry for schedules and MACs (a VLMSpec). One file per family in this
package; a family registers the transformers classes it handles."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from tokcomp.adapters.base import linear_macs
from tokcomp.adapters.hf_vlm.sequence import Prompt, renumber_1d
from tokcomp.errors import UsageError
from tokcomp.methods import AttentionStyle, VisualTokens
from tokcomp.methods.visual import VisualSignal, projector_form
from tokcomp.schedule import REFERENCE_PROMPT, VLMSpec

#: The name of the adapter that patches VLMs (VLM specs carry it as `family`).
ADAPTER_NAME = "hf_vlm"
#: Side in pixels of the reference image of dynamic-resolution models (Qwen2-VL, LLaVA-NeXT).
REFERENCE_PIXELS = 336
#: Family classes by the transformers class they handle ("module.Class"), filled by subclasses.
_REGISTRY: dict[str, type[VLMFamily]] = {}


@dataclass(frozen=True)
class Segment:
    """Visual tokens of one image chosen together with one budget share (an image, one crop
    of an anyres image, or a whole video): their slots in the image's token list, what methods
    see, and the frames they span (a video's temporal patches, frame-major with an equal
    number of tokens each; 1 for an image)."""

    image: int
    slots: torch.Tensor
    visual: VisualTokens
    frames: int = 1


@dataclass(frozen=True)
class Images:
    """The visual tokens of every image of a forward, in placeholder order.

    embeds: per image, the (n_i, D) tokens that fill its placeholders. segments: the groups a
    method chooses from; slots in no segment (LLaVA-NeXT image-newline tokens) are always kept.
    placeholders: per image placeholder count when the vision tower already compressed the
    image to fewer tokens (its tokens then take the first places); None otherwise.
    injected: per image (n_i, k, D) what the language model adds to each visual token's hidden
    state after each of its first k layers (Qwen3-VL's deepstack features); None for none.
    """

    embeds: list[torch.Tensor]
    segments: list[Segment]
    placeholders: list[int] | None = None
    injected: list[torch.Tensor] | None = None

    def counts(self) -> list[int]:
        """Placeholder tokens per image."""
        return self.placeholders or [e.shape[0] for e in self.embeds]

    def injected_rows(self) -> torch.Tensor | None:
        """(T, k, D) the injected features of every placeholder in order (None for none)."""
        return None if self.injected is None else torch.cat(self.injected)

    def selectable(self) -> list[int]:
        """Tokens per image a method chooses from (those in its segments)."""
        sizes = [0] * len(self.embeds)
        for segment in self.segments:
            sizes[segment.image] += segment.visual.tokens
        return sizes


class VLMFamily(abc.ABC):
    """Where one VLM class keeps its parts, how its images become visual tokens and how it
    numbers positions. Subclasses list the transformers classes they handle in `handles`."""

    #: The transformers classes ("transformers.models.<module>.<Class>") this family handles.
    handles: ClassVar[tuple[str, ...]] = ()
    #: forward arguments about images (taken out of what reaches the language model)
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: those get_image_features takes
    encoder_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: those get_video_features takes (none: the family takes no videos)
    video_encoder_inputs: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.__dict__.get("handles", ()):
            _REGISTRY[name] = cls

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.inner = model.model

    @property
    def language_model(self) -> nn.Module:
        return self.inner.language_model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def video_token_id(self) -> int | None:
        """The placeholder token of video frames (None: the family takes no videos)."""
        return self.model.config.video_token_id if self.video_encoder_inputs else None

    def placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) the image and video placeholder tokens of a prompt."""
        placeholder = input_ids == self.image_token_id
        if self.video_token_id is not None:
            placeholder |= input_ids == self.video_token_id
        return placeholder

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        """The projector as a chain of modules (features -> language-model inputs)."""
        projector = self.inner.multi_modal_projector
        return (projector.linear_1, projector.act, projector.linear_2)

    def option(self, inputs: dict[str, Any], name: str) -> Any:
        """A feature option from the call, else from the config."""
        value = inputs.get(name)
        return getattr(self.model.config, name) if value is None else value

    def encode(self, args: tuple, kwargs: dict[str, Any], needs: frozenset[VisualSignal]) -> Any:
        """The model's own get_image_features (asking for what `needs` requires)."""
        kwargs = self.tower_kwargs(kwargs, needs)
        return type(self.inner).get_image_features(self.inner, *args, **kwargs)

    def tower_kwargs(
        self, kwargs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, Any]:
        """get_*_features arguments that also ask for the tower outputs `needs` reads."""
        return kwargs

    @abc.abstractmethod
    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        """The visual tokens of `encoded` images, with what `needs` asks for per segment;
        `expected` is the unpruned token count per image where the tower may compress."""

    def encode_videos(
        self, args: tuple, kwargs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> Any:
        """The model's own get_video_features (families with videos)."""
        kwargs = self.tower_kwargs(kwargs, needs)
        return type(self.inner).get_video_features(self.inner, *args, **kwargs)

    def videos(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> Images:
        """The visual tokens of `encoded` videos, one segment each (families with videos)."""
        raise NotImplementedError

    def positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs: dict[str, Any],
    ) -> torch.Tensor:
        """(R, B, L) position ids of the whole prompt, as the unpatched model would use them."""
        if position_ids is not None:
            return self.given_positions(position_ids, input_ids.shape[0])
        return self.default_positions(input_ids, attention_mask, inputs)

    def default_positions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """(R, B, L) position ids of a prompt given none: each sample's real tokens counted from
        0, as generate numbers them. (The model counts padding too; its RoPE attention sees
        only relative positions, but a method's signal may not: DART's key norms.)"""
        if attention_mask is None:
            length = input_ids.shape[1]
            return torch.arange(length, device=input_ids.device).expand(1, input_ids.shape[0], -1)
        return real_token_positions(attention_mask)[None]

    def given_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """User or generate position ids as (R, B, L)."""
        return position_ids.expand(batch, -1)[None]

    def decode_positions(
        self,
        attention_mask: torch.Tensor | None,
        steps: torch.Tensor,
        rope_delta: torch.Tensor | None,
    ) -> torch.Tensor:
        """(R, B, count) original positions of new tokens when none are given: counted over the
        real tokens of `attention_mask` (the whole sequence's), as the prompt's were, else
        `steps` (B, count), counted on from the prompt's length; `rope_delta` is what
        `rope_delta` gave for the prompt."""
        if attention_mask is None:
            return steps[None]
        return real_token_positions(attention_mask)[None, :, -steps.shape[1] :]

    def renumber(
        self, positions: torch.Tensor, placeholder: torch.Tensor, pruned: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions after dropping `pruned` tokens, and the (B,) shift of later tokens."""
        return renumber_1d(positions, pruned)

    def rope_delta(self, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """Per-sample offset of text positions for decode calls without position ids."""
        return None

    def split_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rotary position ids, text position ids for the decoder layers)."""
        return positions[0], None

    def llm_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """The position_ids argument of the language model."""
        return positions[0]

    def injection_inputs(self, prompt: Prompt) -> dict[str, Any]:
        """Language-model arguments that add `prompt.injected` to its visual tokens' hidden
        states after the first layers (Qwen3-VL's deepstack); none for other families."""
        return {}

    def bidirectional_images(self, inputs: dict[str, Any]) -> bool:
        """Whether a prefill with these image `inputs` lets each image's tokens attend to each
        other in both directions."""
        return False

    def language_mask(self, prompt: Prompt, cache: Any) -> Any:
        """The attention_mask argument of the language model in a prefill of `prompt`: its 2-D
        mask, from which the model builds the causal one."""
        return prompt.mask

    @abc.abstractmethod
    def vision_fields(self) -> dict[str, Any]:
        """The VLMSpec fields of the vision side."""

    def video_spec(self, frames: int) -> VLMSpec:
        """The geometry of a reference video of `frames` frames (families with videos)."""
        raise ValueError(
            f"{type(self.model).__name__} takes no videos in tokcomp: MACs for a video (frames=) "
            f"are given for {', '.join(video_classes())}"
        )

    def spec(self) -> VLMSpec:
        """This model's geometry for schedules and MACs."""
        layers = self.language_model.layers
        return VLMSpec(
            family=ADAPTER_NAME,
            attention=AttentionStyle.SEPARATE_QKV,
            name=self.model.config.name_or_path or type(self.model).__name__,
            architecture=type(self.model).__name__,
            prompt_tokens=REFERENCE_PROMPT,
            llm_depth=len(layers),
            llm_token_macs=linear_macs(layers[0]),
            llm_attn_dim=layers[0].self_attn.q_proj.out_features,
            llm_kv_dim=layers[0].self_attn.k_proj.out_features,
            lm_head_macs=linear_macs(self.model.lm_head),
            projector_widths=projector_widths(self.projector),
            projector_form=projector_form(self.projector),
            takes_videos=bool(self.video_encoder_inputs),
            **self.vision_fields(),
        )


def real_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) each real token's count of real tokens before it (0 on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def handled_classes() -> list[str]:
    """The names of the transformers classes some family handles, sorted."""
    return sorted(name.rsplit(".", 1)[1] for name in _REGISTRY)


def video_classes() -> list[str]:
    """The names of the transformers classes whose family takes videos, sorted."""
    return sorted(
        name.rsplit(".", 1)[1] for name, family in _REGISTRY.items() if family.video_encoder_inputs
    )


def family_for(model: nn.Module) -> type[VLMFamily] | None:
    """The family handling `model`'s class (or its nearest registered base class)."""
    for cls in type(model).__mro__:
        family = _REGISTRY.get(f"{cls.__module__}.{cls.__qualname__}")
        if family is not None:
            return family
    return None


def projector_widths(projector: tuple[nn.Module, ...]) -> tuple[int, ...]:
    """The widths a chain of Linear layers (and parameter-free activations) passes through."""
    linears = [m for m in projector if isinstance(m, nn.Linear)]
    return (linears[0].in_features, *(m.out_features for m in linears))


def tower_fields(
    layers: nn.ModuleList,
    attention: str,
    mlp: str,
    patches: int,
    conv: nn.Module,
    heads: int,
    visual_tokens: int,
    prefix: int = 0,
) -> dict[str, Any]:
    """VLMSpec fields of the vision side of a model whose tower (blocks with `attention` and
    `mlp` attributes, `prefix` class tokens in front of the patches) gives `visual_tokens` per
    image through a projector, one crop per image; tokcomp neither compresses the tower nor
    reads its attention. No pooling head: a family whose tower's forward runs one prices it."""
    first = layers[0]
    width = conv.out_channels
    return dict(
        crops=1,
        visual_tokens=visual_tokens,
        fixed_visual=0,
        segments=(visual_tokens,),
        projected_tokens=visual_tokens,
        feature_block=-1,
        feature_prefix=0,
        tower_methods=False,
        tower_attention=False,
        tokens=patches + prefix,
        protected=prefix,
        depth=len(layers),
        class_token=prefix > 0,
        width=width,
        heads=heads,
        attn_dim=linear_macs(getattr(first, attention)) // (4 * width),
        mlp_hidden=linear_macs(getattr(first, mlp)) // (2 * width),
        stem_macs=patches * width * conv.in_channels * math.prod(conv.kernel_size),
        head_macs=0,
    )


def tower_hidden(encoded: Any, index: int) -> torch.Tensor:
    """Hidden state `index` of the vision tower in get_*_features' output, refusing encoder
    outputs made without it (mm_encoder_outputs from the unpatched get_image_features)."""
    hidden = getattr(encoded, "hidden_states", None)
    state = None if hidden is None else hidden[index]
    if state is None:
        raise UsageError(
            f"these image features hold no hidden state of the vision tower's layer {index}, "
            "which the method reads: pass the images themselves (pixel_values), or make "
            "mm_encoder_outputs with the patched model's get_image_features"
        )
    return state


def one_segment_each(
    embeds: list[torch.Tensor],
    projector: tuple[nn.Module, ...],
    signals: dict[str, Any],
    frames: list[int] | None = None,
) -> Images:
    """Images (or videos of `frames` frames each) whose visual tokens form one segment each;
    `signals` hold per-image tensors (indexable by image) of the VisualTokens fields."""
    segments = []
    for image, tokens in enumerate(embeds):
        extra = {name: values[image][None] for name, values in signals.items()}
        visual = VisualTokens(tokens[None], projector, **extra)
        slots = torch.arange(len(tokens), device=tokens.device)
        segments.append(Segment(image, slots, visual, frames[image] if frames else 1))
    return Images(embeds, segments)


def in_prompt_order(images: Images | None, videos: Images | None, is_video: torch.Tensor) -> Images:
    """The images and videos of a prompt as one list in placeholder order (each video counts as
    one image, with its own budget); `is_video` (T,) flags the video tokens among the T
    placeholders of the prompts, row-major."""
    sources = {False: images, True: videos}
    waiting = {kind: list(range(len(s.embeds) if s else 0)) for kind, s in sources.items()}
    flags, order, at = is_video.tolist(), [], 0
    while at < len(flags) and waiting[flags[at]]:
        kind = flags[at]
        order.append((kind, waiting[kind].pop(0)))
        at += sources[kind].counts()[order[-1][1]]
    if at != len(flags) or any(waiting.values()):
        videos_given = len(videos.embeds) if videos else 0
        raise ValueError(
            f"the prompts' {len(flags) - sum(flags)} image and {sum(flags)} video placeholder "
            f"tokens do not match the {len(images.embeds) if images else 0} images and "
            f"{videos_given} videos given (one run of placeholders per image or video, in order)"
        )
    new = {key: index for index, key in enumerate(order)}
    segments = [
        replace(segment, image=new[(kind, segment.image)])
        for kind, source in sources.items()
        if source
        for segment in source.segments
    ]
    compressed = any(s is not None and s.placeholders is not None for s in sources.values())
    injected = any(s is not None and s.injected is not None for s in sources.values())
    return Images(
        [sources[kind].embeds[index] for kind, index in order],
        sorted(segments, key=lambda segment: segment.image),
        [sources[kind].counts()[index] for kind, index in order] if compressed else None,
        [sources[kind].injected[index] for kind, index in order] if injected else None,
    )

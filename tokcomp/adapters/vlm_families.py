"""The Hugging Face VLM classes tokcomp supports, one Family each (where the model keeps its
parts, how its images become visual tokens, how it numbers positions), and VLMSpec: their
shape for schedules and MACs. Used by the hf_vlm adapter."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from tokcomp.adapters.base import linear_macs
from tokcomp.adapters.hf_vision import HFVisionAdapter
from tokcomp.adapters.vlm_sequence import Images, Pruned, Segment, renumber_1d, renumber_mrope
from tokcomp.methods import Method
from tokcomp.methods.visual import (
    VisualSignal,
    VisualTokens,
    selects_visual_tokens,
    visual_schedule,
)
from tokcomp.schedule import ModelSpec, block_macs, check_schedule

#: The adapter family name VLM specs carry.
FAMILY = "hf_vlm"
_MODELS = "transformers.models."
#: Text tokens of the reference prompt the MACs are counted for.
REFERENCE_PROMPT = 40
#: Side in pixels of the reference image of dynamic-resolution models (Qwen2-VL, LLaVA-NeXT).
REFERENCE_PIXELS = 336


# -- the spec: schedules and MACs ------------------------------------------------------------


@dataclass(frozen=True)
class VLMSpec(ModelSpec):
    """A VLM's shape for schedules and MACs. The ModelSpec fields describe the vision tower
    (per crop); the others the rest, for one reference image and a REFERENCE_PROMPT-token text.

    crops: tower passes per image. visual_tokens: visual tokens per image reaching the language
    model unpruned, of which fixed_visual are always kept (image-newline). projected_tokens and
    projector_token_macs: tokens through the projector per image, MACs per token. llm_*: decoder
    layers, linear MACs per token per layer (q/k/v/o with GQA widths, gated MLP), attention
    width (heads x head_dim); lm_head_macs: one token's logits. feature_block / feature_prefix:
    the tower block whose output the projector takes and the tokens dropped in front of it (for
    vision-transformer methods inside the tower, which tower_methods allows). tower_attention:
    whether the adapter gives methods the tower's attention and keys at that layer.

    A visual-token method's schedule is the tower's blocks (all tokens) followed by, per decoder
    layer, the visual tokens of the reference image it processes; a vision-transformer method's
    is the tower's alone.
    """

    architecture: str
    crops: int
    visual_tokens: int
    fixed_visual: int
    projected_tokens: int
    projector_token_macs: int
    prompt_tokens: int
    llm_depth: int
    llm_token_macs: int
    llm_attn_dim: int
    lm_head_macs: int
    feature_block: int
    feature_prefix: int
    tower_methods: bool
    tower_attention: bool

    #: Fields besides the vision tower's that a saved config must match (Config.check_model).
    checked: ClassVar[tuple[str, ...]] = (
        "architecture", "crops", "visual_tokens", "llm_depth", "llm_token_macs", "llm_attn_dim",
    )  # fmt: skip

    def tower(self) -> ModelSpec:
        """The vision tower alone, as the hf_vision adapter describes it."""
        names = [f.name for f in fields(ModelSpec)]
        return ModelSpec(**{**{n: getattr(self, n) for n in names}, "family": "hf_vision"})

    def resolve(self, method: Method) -> tuple[Method, list[int]]:
        """The method settled and its schedule on this VLM: a vision-transformer method's on the
        tower alone, a visual-token method's on the tower and the language model."""
        if not selects_visual_tokens(method):
            if not self.tower_methods:
                raise ValueError(
                    f"{method.name} acts inside a vision transformer; tokcomp can apply it to the "
                    f"vision tower of LLaVA-1.5 only, not of {self.architecture}. For this model "
                    "use zoo, divprune, fastv, visionzip or random"
                )
            return self.tower().resolve(method)
        if getattr(method, "layers", None) is not None:
            raise ValueError(
                f"{method.name}: 'layers' has no meaning on a VLM (it prunes visual tokens once)"
            )
        wanted = getattr(method, "visual_needs", frozenset())
        if not self.tower_attention and wanted & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
            raise ValueError(
                f"{method.name} needs the vision tower's attention at its feature layer, which "
                f"tokcomp computes for LLaVA-1.5 and LLaVA-NeXT (CLIP/SigLIP towers), not for "
                f"{self.architecture}; use zoo, divprune, fastv or random on it"
            )
        method = method.settle(self)
        if method.target_macs is not None:
            return self.nearest_to_target(method)
        schedule = self.native_schedule(method)
        if method.schedule is not None and list(method.schedule) != schedule:
            raise ValueError(
                f"{method.name}'s schedule on {self.architecture} follows from its options "
                f"({schedule}); give keep (or target_macs) instead of a different schedule"
            )
        return method, schedule

    def native_schedule(self, method: Method) -> list[int]:
        """The tower's blocks, then the visual tokens each decoder layer processes (also for
        random, whose own knob_schedule is a vision transformer's)."""
        return visual_schedule(method, self)

    @property
    def label(self) -> str:
        return self.architecture

    def model_macs(self, schedule: list[int] | None = None) -> int:
        """MACs of one reference prompt's prefill: vision tower, projector, language model."""
        tower = list(schedule[: self.depth]) if schedule else [self.tokens] * self.depth
        check_schedule(self.tower(), tower)
        llm = list(schedule[self.depth :]) if schedule else []
        projected = self.projected_tokens
        if not llm:
            visual = self.visual_tokens
            if tower[-1] != self.tokens:
                visual = projected = tower[self.feature_block] - self.feature_prefix
            llm = [visual] * self.llm_depth
        total, tokens = self.stem_macs + self.head_macs, self.tokens
        for keep in tower:
            total += block_macs(self, tokens, keep)
            tokens = keep
        total = total * self.crops + projected * self.projector_token_macs + self.lm_head_macs
        for visual in llm:
            sequence = self.prompt_tokens + visual
            total += sequence * self.llm_token_macs + 2 * sequence * sequence * self.llm_attn_dim
        return total


def _tower_fields(
    layers: nn.ModuleList, attention: str, mlp: str, patches: int, conv: nn.Module, heads: int
) -> dict[str, Any]:
    """ModelSpec fields of a vision tower without a class token (blocks at `attention`, `mlp`)."""
    first = layers[0]
    width = conv.out_channels
    attn_dim = linear_macs(getattr(first, attention)) // (4 * width)
    return dict(
        tokens=patches, protected=0, depth=len(layers), class_token=False, width=width,
        heads=heads, attn_dim=attn_dim, mlp_hidden=linear_macs(getattr(first, mlp)) // (2 * width),
        stem_macs=patches * width * conv.in_channels * math.prod(conv.kernel_size), head_macs=0,
    )  # fmt: skip


# -- model families ----------------------------------------------------------------------------


class Family(abc.ABC):
    """Where one VLM class keeps its parts, how its images become visual tokens and how it
    numbers positions."""

    #: forward arguments about images (taken out of what reaches the language model)
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    #: those get_image_features takes
    encoder_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)

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
    def projector(self) -> tuple[nn.Module, ...]:
        """The projector as a chain of modules (features -> language-model inputs)."""
        projector = self.inner.multi_modal_projector
        return (projector.linear_1, projector.act, projector.linear_2)

    def encode(self, args: tuple, kwargs: dict[str, Any], needs: frozenset[VisualSignal]) -> Any:
        """The model's own get_image_features (asking for what `needs` requires)."""
        return type(self.inner).get_image_features(self.inner, *args, **kwargs)

    @abc.abstractmethod
    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        """The visual tokens of `encoded` images, with what `needs` asks for per segment;
        `expected` is the unpruned token count per image where the tower may compress."""

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
        length = input_ids.shape[1]
        return torch.arange(length, device=input_ids.device).expand(1, input_ids.shape[0], -1)

    def given_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        """User or generate position ids as (R, B, L)."""
        return position_ids.expand(batch, -1)[None]

    def decode_positions(
        self, attention_mask: torch.Tensor | None, past: int, count: int, pruned: Pruned
    ) -> torch.Tensor:
        """(R, B, count) original positions of new tokens after `past` when none are given."""
        steps = torch.arange(past, past + count, device=pruned.mask.device)
        return steps.expand(1, pruned.mask.shape[0], -1)

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

    @abc.abstractmethod
    def vision_fields(self) -> dict[str, Any]:
        """The VLMSpec fields of the vision side."""

    def spec(self) -> VLMSpec:
        """This model's VLMSpec."""
        layers = self.language_model.layers
        return VLMSpec(
            family=FAMILY,
            name=self.model.config.name_or_path or type(self.model).__name__,
            architecture=type(self.model).__name__,
            prompt_tokens=REFERENCE_PROMPT,
            llm_depth=len(layers),
            llm_token_macs=linear_macs(layers[0]),
            llm_attn_dim=layers[0].self_attn.q_proj.out_features,
            lm_head_macs=linear_macs(self.model.lm_head),
            projector_token_macs=sum(linear_macs(m) for m in self.projector),
            **self.vision_fields(),
        )


class Llava(Family):
    """LLaVA-1.5: a CLIP or SigLIP tower, features of one layer (class token dropped by the
    "default" strategy), an MLP projector, one crop per image."""

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

    def option(self, inputs: dict[str, Any], name: str) -> Any:
        """A feature option from the call, else from the config."""
        value = inputs.get(name)
        return getattr(self.model.config, name) if value is None else value

    @property
    def tower_adapter(self) -> HFVisionAdapter:
        """The hf_vision adapter of the tower (its layout names the tower's parts)."""
        return HFVisionAdapter(self.tower)

    def feature_index(self, inputs: dict[str, Any]) -> int:
        """The (non-negative) hidden-state index of the single layer the projector reads."""
        layers = self.tower_adapter.layout.layers(self.tower)
        return self.option(inputs, "vision_feature_layer") % (len(layers) + 1)

    def encode(self, args: tuple, kwargs: dict[str, Any], needs: frozenset[VisualSignal]) -> Any:
        wanted = needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}
        if wanted and kwargs.get("output_hidden_states") is not True:
            index = self.feature_index(kwargs)
            kwargs = {**kwargs, "output_hidden_states": [index - 1, index]}
        return super().encode(args, kwargs, needs)

    def crop_signals(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal]
    ) -> dict[str, torch.Tensor]:
        """Per crop (C, N, ...) tower-side signals: features, attention, keys as needed."""
        hidden = encoded.hidden_states
        layer = self.option(inputs, "vision_feature_layer")
        drop = 1 if self.option(inputs, "vision_feature_select_strategy") == "default" else 0
        signals = {}
        if VisualSignal.FEATURES in needs:
            layers = [layer] if isinstance(layer, int) else layer
            signals["features"] = torch.cat([hidden[i][:, drop:] for i in layers], dim=-1)
        if needs & {VisualSignal.ATTENTION, VisualSignal.KEYS}:
            index = self.feature_index(inputs)
            attention, keys = self._attention(hidden[index - 1], index - 1)
            signals.update(attention=attention[:, drop:], keys=keys[:, drop:])
        return signals

    def _attention(self, x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tower block `block`'s attention received (class-token row, or mean over queries
        without a class token), summed over heads, and its head-averaged keys, for input x."""
        layout = self.tower_adapter.layout
        layer = layout.layer(layout.layers(self.tower)[block])
        x = layer.norm1(x)
        shape = (*x.shape[:2], -1, layer.attention.head_dim)
        q = layer.attention.q_proj(x).view(shape).transpose(1, 2)
        k = layer.attention.k_proj(x).view(shape).transpose(1, 2)
        if layout.class_token:
            q = q[:, :, :1]
        probs = ((q.float() * layer.scale) @ k.float().transpose(-1, -2)).softmax(dim=-1)
        return probs.mean(dim=2).sum(dim=1), k.mean(dim=1)

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        embeds = list(encoded.pooler_output)
        if embeds[0].shape[0] != expected:
            return Images(embeds, [], [expected] * len(embeds))
        return _one_segment_each(embeds, self.projector, self.crop_signals(encoded, inputs, needs))

    def vision_fields(self) -> dict[str, Any]:
        tower = self.tower_adapter.spec()
        layer = self.model.config.vision_feature_layer
        drop = 1 if self.model.config.vision_feature_select_strategy == "default" else 0
        visual = tower.tokens - drop
        single = isinstance(layer, int)
        block = layer % (tower.depth + 1) - 1 if single else -1
        names = [f.name for f in fields(ModelSpec) if f.name not in ("family", "name")]
        return dict(
            {n: getattr(tower, n) for n in names}, crops=1, visual_tokens=visual, fixed_visual=0,
            projected_tokens=visual, feature_prefix=drop, tower_methods=single,
            tower_attention=single and block >= 0, feature_block=block,
        )  # fmt: skip


class LlavaNext(Llava):
    """LLaVA-NeXT: anyres crops (a base crop and a grid, unpadded, an image-newline token after
    each grid row). Each crop is a segment with an even share of the image's budget; newline
    tokens are in no segment, so they are always kept."""

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
            base, crops=crops, visual_tokens=len(codes), fixed_visual=int((codes[:, 0] < 0).sum()),
            projected_tokens=crops * patches, tower_methods=False, feature_block=-1,
        )  # fmt: skip


class Qwen2VL(Family):
    """Qwen2-VL: dynamic resolution, a 2x2 patch merger (RMS/LayerNorm, then an MLP: the
    projector), multimodal RoPE positions from the model's get_rope_index."""

    image_inputs = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                    "second_per_grid_ts", "mm_token_type_ids")  # fmt: skip
    encoder_inputs = ("pixel_values", "image_grid_thw")

    @property
    def projector(self) -> tuple[nn.Module, ...]:
        return tuple(self.inner.visual.merger.mlp)

    def images(
        self, encoded: Any, inputs: dict[str, Any], needs: frozenset[VisualSignal], expected: int
    ) -> Images:
        embeds = list(encoded.pooler_output)
        signals = {}
        if VisualSignal.FEATURES in needs:
            merger = self.inner.visual.merger
            x = merger.ln_q(encoded.last_hidden_state).view(-1, merger.hidden_size)
            x = x[self._merged_order(inputs["image_grid_thw"])]
            signals["features"] = x.split([len(e) for e in embeds])
        return _one_segment_each(embeds, self.projector, signals)

    def _merged_order(self, grid: torch.Tensor) -> slice | torch.Tensor:
        """Index putting the merger's input rows in the order of its outputs."""
        return slice(None)

    def positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        inputs: dict[str, Any],
    ) -> torch.Tensor:
        if position_ids is not None:
            return self.given_positions(position_ids, input_ids.shape[0])
        if inputs.get("mm_token_type_ids") is None:
            raise ValueError(
                "pass mm_token_type_ids (the processor returns it): multimodal RoPE positions "
                "cannot be computed without it"
            )
        positions, _ = self.inner.get_rope_index(
            input_ids, mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=attention_mask,
        )  # fmt: skip
        return positions

    def given_positions(self, position_ids: torch.Tensor, batch: int) -> torch.Tensor:
        if position_ids.dim() == 2:
            return position_ids[None].expand(3, batch, -1)
        return position_ids

    def decode_positions(
        self, attention_mask: torch.Tensor | None, past: int, count: int, pruned: Pruned
    ) -> torch.Tensor:
        if attention_mask is None:
            text = torch.arange(past, past + count, device=pruned.mask.device)[None]
        else:
            text = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
            text = text[:, -count:]
        return (text + pruned.rope_delta[:, None]).expand(3, pruned.mask.shape[0], -1)

    def renumber(
        self, positions: torch.Tensor, placeholder: torch.Tensor, pruned: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return renumber_mrope(positions, placeholder, pruned)

    def rope_delta(self, positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        spatial = positions[-3:].masked_fill(~valid[None], -1)
        return spatial.amax(dim=(0, 2)) + 1 - valid.sum(dim=1)

    def split_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return (positions[1:], positions[0]) if positions.shape[0] == 4 else (positions, None)

    def llm_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions

    def vision_fields(self) -> dict[str, Any]:
        visual = self.inner.visual
        merge = visual.spatial_merge_size
        side = REFERENCE_PIXELS // visual.config.patch_size // merge * merge
        tower = _tower_fields(
            visual.blocks,
            "attn",
            "mlp",
            side * side,
            visual.patch_embed.proj,
            visual.config.num_heads,
        )
        tokens = side * side // merge**2
        return dict(
            tower, crops=1, visual_tokens=tokens, fixed_visual=0, projected_tokens=tokens,
            feature_block=-1, feature_prefix=0, tower_methods=False, tower_attention=False,
        )  # fmt: skip


class Qwen25VL(Qwen2VL):
    """Qwen2.5-VL: as Qwen2-VL, with window attention in the tower (the merger sees the
    patches in window order and its outputs are put back in image order)."""

    def _merged_order(self, grid: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import get_vision_window_index

        visual = self.inner.visual
        window, _ = get_vision_window_index(
            grid, visual.spatial_merge_size, visual.window_size, visual.patch_size
        )
        return window.argsort()


class Idefics3(Family):
    """Idefics3 and SmolVLM: a SigLIP-style tower per image tile, pixel shuffle (the projector
    input is the shuffled rows) and one Linear projection; every tile is an image here."""

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
        embeds = list(
            torch.cat(list(encoded.pooler_output)).view(tiles, -1, self.projector[0].out_features)
        )
        signals = {}
        if VisualSignal.FEATURES in needs:
            connector = self.inner.connector
            signals["features"] = connector.pixel_shuffle(hidden, connector.scale_factor)
        return _one_segment_each(embeds, self.projector, signals)

    def vision_fields(self) -> dict[str, Any]:
        vision = self.inner.vision_model
        config = vision.config
        patches = (config.image_size // config.patch_size) ** 2
        tower = _tower_fields(
            vision.encoder.layers, "self_attn", "mlp", patches, vision.embeddings.patch_embedding,
            config.num_attention_heads,
        )  # fmt: skip
        tokens = patches // self.inner.connector.scale_factor**2
        return dict(
            tower, crops=1, visual_tokens=tokens, fixed_visual=0, projected_tokens=tokens,
            feature_block=-1, feature_prefix=0, tower_methods=False, tower_attention=False,
        )  # fmt: skip


def _one_segment_each(
    embeds: list[torch.Tensor], projector: tuple[nn.Module, ...], signals: dict[str, Any]
) -> Images:
    """Images whose visual tokens form one segment each; `signals` hold per-image tensors
    (indexable by image) of the VisualTokens fields."""
    segments = []
    for image, tokens in enumerate(embeds):
        extra = {name: values[image][None] for name, values in signals.items()}
        visual = VisualTokens(tokens[None], projector, **extra)
        segments.append(Segment(image, torch.arange(len(tokens), device=tokens.device), visual))
    return Images(embeds, segments)


#: VLM classes by class name.
FAMILIES: dict[str, type[Family]] = {
    f"{_MODELS}llava.modeling_llava.LlavaForConditionalGeneration": Llava,
    f"{_MODELS}llava_next.modeling_llava_next.LlavaNextForConditionalGeneration": LlavaNext,
    f"{_MODELS}qwen2_vl.modeling_qwen2_vl.Qwen2VLForConditionalGeneration": Qwen2VL,
    f"{_MODELS}qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VLForConditionalGeneration": Qwen25VL,
    f"{_MODELS}idefics3.modeling_idefics3.Idefics3ForConditionalGeneration": Idefics3,
    f"{_MODELS}smolvlm.modeling_smolvlm.SmolVLMForConditionalGeneration": Idefics3,
}

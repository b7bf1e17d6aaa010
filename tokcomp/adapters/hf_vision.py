"""Hugging Face (transformers v5) vision encoders: CLIP and SigLIP image towers (alone or in
CLIPModel, CLIPVisionModelWithProjection or SiglipModel, whose text towers stay untouched),
ViT (ViTModel, ViTForImageClassification) and DINOv2 (LayerScale, SwiGLU, register tokens).

Models are recognised by class name, so `import tokcomp` does not import transformers.
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokcomp.adapters.base import (
    Adapter,
    BlockParts,
    Compression,
    UnsupportedModelError,
    compressed_block,
    empty_batch_output,
    linear_macs,
    mlp_hidden,
    path_to,
    pool_attention,
    refuse_skipped_work,
    split_heads,
)
from tokcomp.errors import UsageError
from tokcomp.libraries import HF_VISION
from tokcomp.methods import AttentionStyle, TokenState
from tokcomp.schedule import ModelSpec

_MODELS = "transformers.models."


@dataclass(frozen=True)
class EncoderLayer:
    """One transformers encoder layer's parts under common names: its self-attention has
    q_proj, k_proj, v_proj and head_dim; its output projection is `out_proj`."""

    norm1: nn.Module
    attention: nn.Module
    out_proj: nn.Module
    scale: float
    dropout: float
    after_attn: tuple[nn.Module, ...]
    norm2: nn.Module
    mlp: nn.Module
    after_mlp: tuple[nn.Module, ...]

    def block_parts(self) -> BlockParts:
        """The layer as the shared compressed block sees it."""
        attn = self.attention

        def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            return tuple(split_heads(p(x), attn.head_dim) for p in projections)

        return BlockParts(
            norm1=self.norm1,
            qkv=qkv,
            scale=self.scale,
            dropout=self.dropout if attn.training else 0.0,
            output=lambda heads, x: self.out_proj(heads),
            after_attn=self.after_attn,
            norm2=self.norm2,
            mlp=self.mlp,
            after_mlp=self.after_mlp,
        )


class _TowerClass(abc.ABC):
    """What tokcomp knows of one transformers vision model class: where it keeps its parts, and
    how it embeds and pools."""

    class_token: ClassVar[bool] = True

    @abc.abstractmethod
    def layers(self, tower: nn.Module) -> nn.ModuleList:
        """The encoder layers."""

    @abc.abstractmethod
    def parts(self, layer: nn.Module) -> EncoderLayer:
        """The parts of one encoder layer."""

    @abc.abstractmethod
    def patch_conv(self, tower: nn.Module) -> nn.Conv2d:
        """The patch-embedding convolution."""

    def patches(self, tower: nn.Module) -> int:
        """Patch tokens per image at the config's image_size (set it to the size fed: DINOv2
        and interpolate_pos_encoding=True take any size, the embeddings keep the built one)."""
        config = tower.config
        sides = zip(_pair(config.image_size), _pair(config.patch_size), strict=True)
        return math.prod(side // patch for side, patch in sides)

    def prefix(self, tower: nn.Module) -> int:
        """Tokens in front of the patches (class and register tokens), all protected."""
        return 1

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        """The tokens entering the first layer."""
        return tower.embeddings(pixel_values, **options)

    @abc.abstractmethod
    def last_hidden_state(self, tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The model's last_hidden_state from the last layer's output."""

    @abc.abstractmethod
    def pool(self, tower: nn.Module, last: torch.Tensor, state: TokenState) -> torch.Tensor | None:
        """The model's pooler_output (size-aware where it pools over patches)."""

    def head_macs(self, tower: nn.Module, tokens: int) -> int:
        """MACs of the pooling head."""
        return 0


class _ClipTower(_TowerClass):
    """CLIPVisionModel: pre-norm after the embeddings; last_hidden_state is not normed, the
    pooled class token is."""

    def layers(self, tower: nn.Module) -> nn.ModuleList:
        return tower.encoder.layers

    def parts(self, layer: nn.Module) -> EncoderLayer:
        attn = layer.self_attn
        return EncoderLayer(
            layer.layer_norm1,
            attn,
            attn.out_proj,
            attn.scale,
            attn.dropout,
            (),
            layer.layer_norm2,
            layer.mlp,
            (),
        )

    def patch_conv(self, tower: nn.Module) -> nn.Conv2d:
        return tower.embeddings.patch_embedding

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        return tower.pre_layrnorm(tower.embeddings(pixel_values, **options))

    def last_hidden_state(self, tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x

    def pool(self, tower: nn.Module, last: torch.Tensor, state: TokenState) -> torch.Tensor:
        return tower.post_layernorm(last[:, 0])


class _SiglipTower(_ClipTower):
    """SiglipVisionModel: no class token; post-norm on every token, attention-pooling head."""

    class_token = False

    def prefix(self, tower: nn.Module) -> int:
        return 0

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        return tower.embeddings(pixel_values, **options)

    def last_hidden_state(self, tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return tower.post_layernorm(x)

    def pool(self, tower: nn.Module, last: torch.Tensor, state: TokenState) -> torch.Tensor | None:
        return _siglip_pool(tower.head, last, state) if tower.use_head else None

    def head_macs(self, tower: nn.Module, tokens: int) -> int:
        if not tower.use_head:
            return 0
        head = tower.head
        width = head.attention.embed_dim
        attention = 2 * width * width + 2 * tokens * width * width + 2 * tokens * width
        return attention + linear_macs(head.mlp)


class _VitTower(_TowerClass):
    """ViTModel: dropout after attention and MLP; final norm, optional dense+tanh pooler."""

    def layers(self, tower: nn.Module) -> nn.ModuleList:
        return tower.layers

    def parts(self, layer: nn.Module) -> EncoderLayer:
        attn = layer.attention
        return EncoderLayer(
            layer.layernorm_before,
            attn,
            attn.o_proj,
            attn.scaling,
            attn.attention_dropout,
            (layer.dropout,),
            layer.layernorm_after,
            layer.mlp,
            (layer.dropout,),
        )

    def patch_conv(self, tower: nn.Module) -> nn.Conv2d:
        return tower.embeddings.patch_embeddings.projection

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        pixel_values = pixel_values.to(self.patch_conv(tower).weight.dtype)
        return tower.embeddings(pixel_values, **options)

    def last_hidden_state(self, tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return tower.layernorm(x)

    def pool(self, tower: nn.Module, last: torch.Tensor, state: TokenState) -> torch.Tensor | None:
        return None if tower.pooler is None else tower.pooler(last)

    def head_macs(self, tower: nn.Module, tokens: int) -> int:
        return 0 if tower.pooler is None else linear_macs(tower.pooler.dense)


class _Dinov2Tower(_VitTower):
    """Dinov2Model and Dinov2WithRegistersModel: LayerScale and drop-path on both branches;
    register tokens after the class token; the pooled output is the normed class token."""

    def layers(self, tower: nn.Module) -> nn.ModuleList:
        return tower.encoder.layer

    def parts(self, layer: nn.Module) -> EncoderLayer:
        attn = layer.attention
        return EncoderLayer(
            layer.norm1,
            attn,
            attn.o_proj,
            attn.scaling,
            attn.attention_dropout,
            (layer.layer_scale1, layer.drop_path),
            layer.norm2,
            layer.mlp,
            (layer.layer_scale2, layer.drop_path),
        )

    def prefix(self, tower: nn.Module) -> int:
        return 1 + getattr(tower.config, "num_register_tokens", 0)

    def embed(self, tower: nn.Module, pixel_values: torch.Tensor, **options: Any) -> torch.Tensor:
        return tower.embeddings(pixel_values, **options)

    def pool(self, tower: nn.Module, last: torch.Tensor, state: TokenState) -> torch.Tensor:
        return last[:, 0]

    def head_macs(self, tower: nn.Module, tokens: int) -> int:
        return 0


#: Vision towers by class name.
_TOWERS: dict[str, _TowerClass] = {
    f"{_MODELS}clip.modeling_clip.CLIPVisionModel": _ClipTower(),
    f"{_MODELS}siglip.modeling_siglip.SiglipVisionModel": _SiglipTower(),
    f"{_MODELS}vit.modeling_vit.ViTModel": _VitTower(),
    f"{_MODELS}dinov2.modeling_dinov2.Dinov2Model": _Dinov2Tower(),
    f"{_MODELS}dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersModel": (
        _Dinov2Tower()
    ),
}

#: Models around a vision tower, by class name: (tower attribute, image head attribute).
_WRAPPERS: dict[str, tuple[str, str | None]] = {
    f"{_MODELS}clip.modeling_clip.CLIPModel": ("vision_model", "visual_projection"),
    f"{_MODELS}clip.modeling_clip.CLIPVisionModelWithProjection": (
        "vision_model",
        "visual_projection",
    ),
    f"{_MODELS}siglip.modeling_siglip.SiglipModel": ("vision_model", None),
    f"{_MODELS}vit.modeling_vit.ViTForImageClassification": ("vit", "classifier"),
}


class HFVisionAdapter(Adapter):
    """Patches the vision tower's forward (inside a wrapper model, the wrapper's tower)."""

    name = "hf_vision"
    attention = AttentionStyle.SEPARATE_QKV
    library = HF_VISION
    supported = (
        "Hugging Face CLIPVisionModel, CLIPVisionModelWithProjection and CLIPModel, "
        "SiglipVisionModel and SiglipModel, ViTModel and ViTForImageClassification, Dinov2Model "
        "and Dinov2WithRegistersModel (image towers only)"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        tower_name, head_name = _lookup(model, _WRAPPERS) or (None, None)
        self.tower = getattr(model, tower_name) if tower_name else model
        self.tower_config = f"model.{tower_name}.config" if tower_name else "model.config"
        self.head = getattr(model, head_name) if head_name else None
        self.tower_class = _lookup(self.tower, _TOWERS)
        # found once, not on every call; plain attributes, since dynamo breaks the graph on
        # functools.cached_property's lock (and warns on tracing through functools.cache)
        self._skipped_modules = self._find_skipped_modules() if self.tower_class else ([], [])
        self._embedding_options = (
            _options_taken_by_embeddings(self.tower) if self.tower_class else frozenset()
        )

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return _lookup(model, _TOWERS) is not None or _lookup(model, _WRAPPERS) is not None

    def spec(self) -> ModelSpec:
        if self.tower_class is None:
            raise UnsupportedModelError(
                f"this {type(self.model).__name__}'s vision tower is a "
                f"{type(self.tower).__name__}; tokcomp supports {self.supported}"
            )
        tower, tower_class = self.tower, self.tower_class
        layers = tower_class.layers(tower)
        first = tower_class.parts(layers[0])
        conv = tower_class.patch_conv(tower)
        patches, prefix = tower_class.patches(tower), tower_class.prefix(tower)
        return ModelSpec(
            tokens=patches + prefix,
            protected=prefix,
            depth=len(layers),
            class_token=tower_class.class_token,
            attention=self.attention,
            family=self.name,
            name=self.model.config.name_or_path or type(self.model).__name__,
            width=tower.config.hidden_size,
            heads=tower.config.num_attention_heads,
            attn_dim=first.attention.q_proj.out_features,
            mlp_hidden=mlp_hidden(first.mlp, tower.config.hidden_size),
            stem_macs=patches * conv.out_channels * conv.in_channels * math.prod(conv.kernel_size),
            head_macs=tower_class.head_macs(tower, patches + prefix) + linear_macs(self.head),
            head_token_macs=tower_class.head_macs(tower, 1) - tower_class.head_macs(tower, 0),
        )

    def overrides(self) -> list[tuple[nn.Module, str, str]]:
        return [(self.tower, "forward", "forward")]

    # -- the compressed forward -----------------------------------------------------------
    def forward(
        self,
        compression: Compression,
        pixel_values: torch.Tensor | None = None,
        *positional: Any,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **embed_options: Any,
    ) -> Any:
        """The tower's forward with compressed layers: a BaseModelOutputWithPooling (or its
        tuple), hidden_states holding each layer's (shrinking) output when asked for."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if positional:  # each family orders them differently: by name they cannot be misread
            raise UsageError(
                f"the compressed {type(self.tower).__name__} takes only pixel_values by "
                "position; pass its other arguments by name (e.g. interpolate_pos_encoding=True)"
            )
        if pixel_values is not None and pixel_values.shape[0] == 0:
            options = {
                "output_attentions": output_attentions,
                "output_hidden_states": output_hidden_states,
                "return_dict": return_dict,
                "attention_mask": attention_mask,
            }
            return empty_batch_output(
                lambda one: self.forward(compression, one, **options, **embed_options),
                pixel_values,
            )
        config = self.tower.config
        _refuse_unsupported(
            _or_config(output_attentions, config, "output_attentions"),
            attention_mask,
            embed_options.get("is_causal", False),
        )
        wanted = _or_config(output_hidden_states, config, "output_hidden_states")
        state, hidden = self._trunk(compression, pixel_values, bool(wanted), **embed_options)
        if compression.unmerge:
            state = state.unmerged()
        last = self.tower_class.last_hidden_state(self.tower, state.x)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last,
            pooler_output=self.tower_class.pool(self.tower, last, state),
            hidden_states=_hidden_states(_select(hidden, wanted), compression.unmerge),
        )
        return output if _or_config(return_dict, config, "return_dict") else output.to_tuple()

    def forward_tokens(
        self, compression: Compression, pixel_values: torch.Tensor, **embed_options: Any
    ) -> TokenState:
        """The final tokens as last_hidden_state holds them (CLIP: before post_layernorm)."""
        if pixel_values.shape[0] == 0:
            forward = functools.partial(self.forward_tokens, compression, **embed_options)
            return empty_batch_output(forward, pixel_values)
        state, _ = self._trunk(compression, pixel_values, False, **embed_options)
        return state.with_x(self.tower_class.last_hidden_state(self.tower, state.x))

    def _trunk(
        self,
        compression: Compression,
        pixel_values: torch.Tensor | None,
        collect: bool,
        **embed_options: Any,
    ) -> tuple[TokenState, list[TokenState] | None]:
        """The tokens after the last layer, and every layer's input and output if `collect`."""
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        tower, tower_class = self.tower, self.tower_class
        self._refuse_skipped_work()
        taken = {k: v for k, v in embed_options.items() if k in self._embedding_options}
        x = tower_class.embed(tower, pixel_values, **taken)
        self._refuse_other_size(compression, pixel_values, x.shape[1])
        state = compression.start(x, tower_class.prefix(tower))
        hidden = [state] if collect else None
        for index, layer in enumerate(tower_class.layers(tower)):
            parts = tower_class.parts(layer).block_parts()
            state = compressed_block(parts, index, state, compression)
            if hidden is not None:
                hidden.append(state)
        return state, hidden

    def _refuse_skipped_work(self) -> None:
        """Refuse gradient checkpointing and hooks the compressed layers would leave out."""
        from transformers import PreTrainedModel

        skipped, flagged = self._skipped_modules
        # the flag sits on the encoder (older transformers) or on every layer
        checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in flagged)
        renamed = hasattr(PreTrainedModel, "activation_checkpointing_disable")  # 5.24
        disable = f"model.{'activation' if renamed else 'gradient'}_checkpointing_disable()"
        refuse_skipped_work(self.tower, skipped, checkpointing, disable)

    def _find_skipped_modules(self) -> tuple[list[nn.Module], list[nn.Module]]:
        """The modules whose own forward the compressed layers never call (the encoder, the
        layer list, the layers, the modules down to their attention), and those of them that
        may hold the gradient-checkpointing flag."""
        tower, tower_class = self.tower, self.tower_class
        layers = tower_class.layers(tower)
        owners = path_to(tower, layers)[1:]  # the encoder (if any) and the layer list
        attention = [
            module
            for layer in layers
            for module in path_to(layer, tower_class.parts(layer).attention)[1:]
        ]
        return [*owners, *layers, *attention], [*owners, *layers]

    def _refuse_other_size(
        self, compression: Compression, pixel_values: torch.Tensor, tokens: int
    ) -> None:
        """Raise for an image size the schedule was not built for, naming how to rebuild it."""
        if tokens == compression.spec.tokens:
            return
        height, width = pixel_values.shape[-2:]
        size = height if height == width else (height, width)
        raise ValueError(
            f"this tokcomp schedule was built for {compression.spec.tokens} tokens per image "
            f"(config.image_size), the {height}x{width} input gives {tokens}; set "
            f"{self.tower_config}.image_size = {size} and apply tokcomp again"
        )


def _options_taken_by_embeddings(tower: nn.Module) -> frozenset[str]:
    """The call options the tower's embeddings take (interpolate_pos_encoding, ...); the
    others are the caller's TransformersKwargs (a VLM's vision_aspect_ratio), which the
    tower's own forward ignores too."""
    return frozenset(inspect.signature(type(tower.embeddings).forward).parameters)


def _siglip_pool(head: nn.Module, last: torch.Tensor, state: TokenState) -> torch.Tensor:
    """SiglipMultiheadAttentionPoolingHead.forward with each key weighted by its size
    (log-size added to the probe's attention logits, as in proportional attention); the keys
    that the DiffRate search masked get no weight."""
    bias = state.log_size_bias()
    if bias is None and state.mask is None:
        return head(last)
    probe = head.probe.repeat(last.shape[0], 1, 1)
    pooled = pool_attention(head.attention, probe, last, bias, state.mask)
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


def _refuse_unsupported(
    output_attentions: bool, attention_mask: torch.Tensor | None, is_causal: bool
) -> None:
    """Raise for the call options a compressed forward cannot honour."""
    if output_attentions:
        raise ValueError(
            "output_attentions=True is not available on a token-compressed model (tokcomp uses "
            "fused attention and the maps change size from layer to layer); call "
            "tokcomp.remove(model) to get attention maps"
        )
    if attention_mask is not None or is_causal:
        raise ValueError(
            "attention_mask and is_causal are not supported on a token-compressed model (merged "
            "tokens no longer match the mask's patches); call tokcomp.remove(model) to use them"
        )


def _hidden_states(
    states: tuple[TokenState | None, ...] | None, unmerge: bool
) -> tuple[torch.Tensor | None, ...] | None:
    """The selected layers' hidden states (back on the input grid with `unmerge`)."""
    if states is None:
        return None
    return tuple(None if s is None else (s.unmerged() if unmerge else s).x for s in states)


def _select(
    hidden: list[TokenState] | None, wanted: bool | int | list[int]
) -> tuple[TokenState | None, ...] | None:
    """The hidden states `output_hidden_states` asks for, as transformers returns them: all
    for True; for indices (negative ones count from the end), None in the other places."""
    if hidden is None:
        return None
    if isinstance(wanted, bool):
        return tuple(hidden)
    count = len(hidden)
    asked = [wanted] if isinstance(wanted, int) else wanted
    indices = {i % count for i in asked if -count <= i < count}
    return tuple(h if i in indices else None for i, h in enumerate(hidden))


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """A config's image or patch size as (height, width)."""
    return (value, value) if isinstance(value, int) else tuple(value)


def _or_config(value: Any, config: Any, name: str) -> Any:
    """`value`, or the config's setting `name` when it is None."""
    return getattr(config, name, None) if value is None else value


def _lookup(model: nn.Module, table: dict[str, Any]) -> Any:
    """The entry of `table` for the nearest class of `model` (by module and class name)."""
    for cls in type(model).__mro__:
        entry = table.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return None

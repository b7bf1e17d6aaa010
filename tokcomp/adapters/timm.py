"""timm VisionTransformer family: ViT/AugReg, DeiT (distilled too), DeiT-III (LayerScale),
register-token and global-average-pool models."""

from __future__ import annotations

import math
from typing import Any

import torch

# vision_transformer imports Attention from timm.layers (timm 1.0.16+) or defines it (older)
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from tokcomp.adapters.base import (
    Adapter,
    BlockParts,
    Compression,
    UnsupportedModelError,
    compressed_block,
    intermediates,
    linear_macs,
    mlp_hidden,
    refuse_skipped_work,
    size_weighted_mean,
)
from tokcomp.errors import UsageError
from tokcomp.libraries import TIMM
from tokcomp.methods import AttentionStyle, TokenState
from tokcomp.schedule import ModelSpec

_POOLS = ("token", "avg", "")
#: timm's pools that average tokens, which tokcomp weights by token size.
_AVERAGES = ("avg", "avgmax")
#: The attribute of the tokens forward_features returns holding their average-pool weights
#: (None: a plain mean), so that model.forward_head pools them as model(x) does.
_POOL_WEIGHTS = "tokcomp_pool_weights"


class TimmViTAdapter(Adapter):
    """Patches timm's VisionTransformer (and subclasses such as VisionTransformerDistilled)."""

    name = "timm"
    attention = AttentionStyle.FUSED_QKV
    library = TIMM
    supported = (
        "timm VisionTransformer models built from timm's Block and Attention (ViT, AugReg, "
        "DeiT and distilled DeiT, DeiT-III, register tokens), with 'token', 'avg' or no pooling"
    )

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def spec(self) -> ModelSpec:
        model = self.model
        self._check_supported()
        attn = model.blocks[0].attn
        patch = model.patch_embed
        stem = patch.num_patches * model.embed_dim * patch.proj.in_channels
        stem *= math.prod(patch.patch_size)
        tokens = patch.num_patches + model.num_prefix_tokens
        distilled = getattr(model, "head_dist", None)  # its heads read their own two tokens
        head = linear_macs(model.head) + linear_macs(distilled)
        per_token = head if model.global_pool == "" and distilled is None else 0  # every token
        return ModelSpec(
            tokens=tokens,
            protected=model.num_prefix_tokens,
            depth=len(model.blocks),
            class_token=model.cls_token is not None,
            attention=self.attention,
            family=self.name,
            name=getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__),
            width=model.embed_dim,
            heads=attn.num_heads,
            attn_dim=attn.num_heads * attn.head_dim,
            mlp_hidden=mlp_hidden(model.blocks[0].mlp, model.embed_dim),
            stem_macs=stem,
            head_macs=head + per_token * (tokens - 1),
            head_token_macs=per_token,
        )

    def _check_supported(self) -> None:
        model = self.model
        if not isinstance(model.patch_embed, PatchEmbed):
            raise UnsupportedModelError(
                f"this {type(model).__name__} embeds its patches with "
                f"{type(model.patch_embed).__name__} (a hybrid CNN stem, whose MACs tokcomp does "
                f"not model); tokcomp supports {self.supported}, with timm's PatchEmbed"
            )
        for index, block in enumerate(model.blocks):
            attention = getattr(block, "attn", None)  # a parallel block has none
            if type(block) is not Block or type(attention) is not Attention:
                what = "no attn" if attention is None else type(attention).__name__
                raise UnsupportedModelError(
                    f"block {index} of this {type(model).__name__} is {type(block).__name__} "
                    f"with {what}; tokcomp supports {self.supported}"
                )
        if model.attn_pool is not None or model.global_pool not in _POOLS:
            raise UnsupportedModelError(
                f"global_pool={model.global_pool!r} is not supported; tokcomp supports "
                f"{self.supported} (create the model with global_pool='token' or 'avg')"
            )

    def pools_by_average(self) -> bool:
        return self.model.global_pool in _AVERAGES

    def overrides(self) -> list[tuple[nn.Module, str, str]]:
        return [
            (self.model, "forward", "forward"),
            (self.model, "forward_features", "forward_features"),
            (self.model, "forward_head", "forward_head_of_features"),
            *_pool_override(self.model),
            *intermediates(self.model, ("forward_intermediates", "get_intermediate_layers")),
        ]

    # -- the compressed forward -----------------------------------------------------------
    def forward(self, compression: Compression, x: torch.Tensor, **masks: Any) -> torch.Tensor:
        _refuse_masks(**masks)
        return self.forward_head(self.forward_tokens(compression, x))

    def forward_features(
        self, compression: Compression, x: torch.Tensor, **masks: Any
    ) -> torch.Tensor:
        _refuse_masks(**masks)
        state = self.forward_tokens(compression, x)
        setattr(state.x, _POOL_WEIGHTS, state.pool_weights())
        return state.x

    def forward_head_of_features(
        self, compression: Compression, features: torch.Tensor, pre_logits: bool = False
    ) -> torch.Tensor:
        """timm's forward_head on forward_features' tokens, pooled as model(x) pools them."""
        model = self.model
        weights = None
        if model.global_pool in _AVERAGES:
            weights = _pool_weights_of(features, compression.spec.tokens)
        return self.forward_head(TokenState(features, model.num_prefix_tokens, weights), pre_logits)

    def pool_of_features(
        self, compression: Compression, features: torch.Tensor, pool_type: str | None = None
    ) -> torch.Tensor:
        """timm's pool on forward_features' tokens, averages weighted by size as model(x) pools."""
        model = self.model
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type not in _AVERAGES:
            # the class's own pool: the instance's is this patch's
            return type(model).pool(model, features, pool_type=pool_type)
        weights = _pool_weights_of(features, compression.spec.tokens)
        return self._average(features, weights, pool_type)

    def forward_tokens(self, compression: Compression, x: torch.Tensor) -> TokenState:
        model = self.model
        _check_no_patch_dropout(model)
        blocks = model.blocks
        checkpointing = getattr(model, "grad_checkpointing", False)
        skipped = [blocks, *blocks, *(block.attn for block in blocks)]
        refuse_skipped_work(model, skipped, checkpointing, "model.set_grad_checkpointing(False)")
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        state = compression.start(x, model.num_prefix_tokens)
        for index, block in enumerate(model.blocks):
            state = compressed_block(_block_parts(block), index, state, compression)
        return state.with_x(model.norm(state.x))

    def forward_head(self, state: TokenState, pre_logits: bool = False) -> torch.Tensor:
        """timm's head, with the average pool weighted by token size."""
        model = self.model
        if model.global_pool not in _AVERAGES:
            # the class's own forward_head: the instance's is this patch's
            return type(model).forward_head(model, state.x, pre_logits=pre_logits)
        x = self._average(state.x, state.pool_weights(), model.global_pool)
        x = model.head_drop(model.fc_norm(x))
        return x if pre_logits else model.head(x)

    def _average(
        self, x: torch.Tensor, weights: torch.Tensor | None, pool_type: str
    ) -> torch.Tensor:
        """timm's 'avg' or 'avgmax' pool of tokens `x`, the mean weighted by `weights`."""
        model = self.model
        # timm before 1.0.16 has no pool_include_prefix and always leaves the prefix out
        start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
        x = x[:, start:]
        mean = size_weighted_mean(x, None if weights is None else weights[:, start:])
        return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)


def _pool_override(model: VisionTransformer) -> list[tuple[nn.Module, str, str]]:
    """The override of timm's pool where the model has one (timm 1.0.7+), none where not."""
    # the class, not the instance: a previous patch may still shadow pool on the instance
    return [(model, "pool", "pool_of_features")] if hasattr(type(model), "pool") else []


def _pool_weights_of(features: torch.Tensor, tokens: int) -> torch.Tensor | None:
    """The average-pool weights forward_features left on its tokens (None where a plain mean is
    right: nothing merged); raise for reduced tokens whose sizes were lost (not forward_features'
    own tensor)."""
    if hasattr(features, _POOL_WEIGHTS):
        return getattr(features, _POOL_WEIGHTS)
    if features.shape[1] != tokens:
        raise UsageError(
            f"timm's pool got {features.shape[1]} compressed tokens without their sizes, which "
            "the average pool weights them by; pass forward_features' output unchanged, or call "
            "model(x), or pool tokcomp.forward_tokens(model, x) (it returns the sizes)"
        )
    return None


def _refuse_masks(attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> None:
    """Refuse timm's attention mask and causal attention (forward's and forward_features'
    options): merged tokens no longer match a mask's patches."""
    if attn_mask is not None or is_causal:
        raise UsageError(
            "attn_mask and is_causal are not supported on a token-compressed model (merged "
            "tokens no longer match the mask's patches); call tokcomp.remove(model) to use them"
        )


def _check_no_patch_dropout(model: VisionTransformer) -> None:
    """Raise while timm's patch dropout would drop tokens (training mode)."""
    dropout = model.patch_drop
    if dropout.training and getattr(dropout, "prob", 0.0) > 0:
        raise ValueError(
            f"timm's patch dropout (patch_drop_rate={dropout.prob}) is active in training mode "
            "and drops tokens itself; token compression needs every patch: call model.eval() "
            "or create the model with patch_drop_rate=0"
        )


def _block_parts(block: Block) -> BlockParts:
    """timm's Block (and its Attention) under BlockParts' names."""
    attn = block.attn

    def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = attn.qkv(x).unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(2)
        return attn.q_norm(q.transpose(1, 2)), attn.k_norm(k.transpose(1, 2)), v.transpose(1, 2)

    def output(heads: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = getattr(attn, "norm", nn.Identity())(heads)
        if getattr(attn, "gate", None) is not None:
            out = out * attn.gate(x).sigmoid()
        return attn.proj_drop(attn.proj(out))

    return BlockParts(
        norm1=block.norm1,
        qkv=qkv,
        scale=attn.scale,
        dropout=attn.attn_drop.p if attn.training else 0.0,
        output=output,
        after_attn=(block.ls1, block.drop_path1),
        norm2=block.norm2,
        mlp=block.mlp,
        after_mlp=(block.ls2, block.drop_path2),
    )

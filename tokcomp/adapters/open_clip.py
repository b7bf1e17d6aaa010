"""open_clip image towers: VisionTransformer with ResidualAttentionBlock (LayerScale; class
token, average or attention pooling), alone or inside a CLIP, CustomTextCLIP or CoCa model,
whose text tower is left untouched.

open_clip is imported only once a model is known to come from it, so `import tokcomp` stays
fast and works without open_clip installed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokcomp.adapters.base import (
    Adapter,
    BlockParts,
    Compression,
    UnsupportedModelError,
    compressed_block,
    empty_batch_output,
    intermediates,
    pool_attention,
    refuse_skipped_work,
    size_weighted_mean,
    split_heads,
)
from tokcomp.libraries import OPEN_CLIP
from tokcomp.methods import AttentionStyle, TokenState
from tokcomp.schedule import ModelSpec

#: open_clip's VisionTransformer always puts exactly one class token in front of the patches.
_CLASS_TOKENS = 1


class OpenClipAdapter(Adapter):
    """Patches the image tower (`model.visual`, or the model itself when it is the tower)."""

    name = "open_clip"
    attention = AttentionStyle.MULTIHEAD
    library = OPEN_CLIP
    supported = (
        "open_clip VisionTransformer image towers built from ResidualAttentionBlock ('tok', "
        "'avg' or attention pooling, LayerScale), alone or in a CLIP, CustomTextCLIP or CoCa model"
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.visual = getattr(model, "visual", model)

    @classmethod
    def recognises(cls, model: nn.Module) -> bool:
        if not any(c.__module__.startswith("open_clip.") for c in type(model).__mro__):
            return False
        from open_clip import CLIP, CoCa, CustomTextCLIP
        from open_clip.transformer import VisionTransformer

        return isinstance(model, (VisionTransformer, CLIP, CustomTextCLIP, CoCa))

    def spec(self) -> ModelSpec:
        self._check_supported()
        visual = self.visual
        blocks = visual.transformer.resblocks
        conv = visual.conv1
        patches = math.prod(visual.grid_size)
        return ModelSpec(
            tokens=patches + _CLASS_TOKENS,
            protected=_CLASS_TOKENS,
            depth=len(blocks),
            class_token=True,
            attention=self.attention,
            family=self.name,
            name=_name(visual),
            width=conv.out_channels,
            heads=blocks[0].attn.num_heads,
            attn_dim=blocks[0].attn.embed_dim,
            mlp_hidden=blocks[0].mlp.c_fc.out_features,
            stem_macs=patches * conv.out_channels * conv.in_channels * math.prod(conv.kernel_size),
            head_macs=_head_macs(visual, patches + _CLASS_TOKENS),
            head_token_macs=_head_macs(visual, 1) - _head_macs(visual, 0),
        )

    def pools_by_average(self) -> bool:
        return self.visual.attn_pool is None and self.visual.pool_type == "avg"

    def _check_supported(self) -> None:
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = self.visual
        if not isinstance(visual, VisionTransformer):
            raise UnsupportedModelError(
                f"this {type(self.model).__name__}'s image tower is a {type(visual).__name__}; "
                f"tokcomp supports {self.supported} (for a timm tower, apply tokcomp to "
                "model.visual.trunk)"
            )
        if not visual.transformer.batch_first:
            raise UnsupportedModelError("tokcomp supports batch-first open_clip transformers only")
        for index, block in enumerate(visual.transformer.resblocks):
            attn = getattr(block, "attn", None)
            if type(block) is not ResidualAttentionBlock or not _plain_self_attention(attn):
                raise UnsupportedModelError(
                    f"block {index} of this open_clip VisionTransformer is a "
                    f"{type(block).__name__} (qk-norm, scaled cosine or head scaling turn it "
                    f"into a custom block); tokcomp supports {self.supported}"
                )

    def overrides(self) -> list[tuple[nn.Module, str, str]]:
        return [
            (self.visual, "forward", "forward"),
            *intermediates(self.visual, ("forward_intermediates",)),
        ]

    # -- the compressed forward -----------------------------------------------------------
    def forward(
        self, compression: Compression, x: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """open_clip's VisionTransformer.forward with compressed blocks and size-aware pooling."""
        if x.shape[0] == 0:
            return empty_batch_output(lambda one: self.forward(compression, one), x)
        visual = self.visual
        pooled, tokens = _pool(visual, self._trunk(compression, x))
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return (pooled, tokens) if visual.output_tokens else pooled

    def forward_tokens(self, compression: Compression, x: torch.Tensor) -> TokenState:
        """The final tokens, after ln_post where open_clip norms every token before pooling."""
        if x.shape[0] == 0:
            return empty_batch_output(lambda one: self.forward_tokens(compression, one), x)
        state = self._trunk(compression, x)
        if not _norm_before_pool(self.visual):
            return state
        return state.with_x(self.visual.ln_post(state.x))

    def _trunk(self, compression: Compression, x: torch.Tensor) -> TokenState:
        """The tokens after the last block (before ln_post)."""
        visual = self.visual
        _check_no_patch_dropout(visual)
        transformer = visual.transformer
        blocks = transformer.resblocks
        skipped = [transformer, blocks, *blocks, *(block.attn for block in blocks)]
        checkpointing = getattr(transformer, "grad_checkpointing", False)
        refuse_skipped_work(visual, skipped, checkpointing, "model.set_grad_checkpointing(False)")
        state = compression.start(_embeds(visual, x), _CLASS_TOKENS)
        for index, block in enumerate(visual.transformer.resblocks):
            state = compressed_block(_block_parts(block), index, state, compression)
        return state


def _embeds(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tokens entering the first block: VisionTransformer._embeds, or for open_clip before
    2.32, which has none, the same steps its forward runs inline."""
    if hasattr(type(visual), "_embeds"):
        return visual._embeds(x)
    x = visual.conv1(x).flatten(2).transpose(1, 2)
    class_token = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([class_token, x], dim=1) + visual.positional_embedding.to(x.dtype)
    return visual.ln_pre(visual.patch_dropout(x))


def _block_parts(block: nn.Module) -> BlockParts:
    """ResidualAttentionBlock (batch-first nn.MultiheadAttention) under BlockParts' names."""
    attn = block.attn

    def qkv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        projected = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)
        return tuple(split_heads(part, attn.head_dim) for part in projected.chunk(3, dim=-1))

    return BlockParts(
        norm1=block.ln_1,
        qkv=qkv,
        scale=attn.head_dim**-0.5,
        dropout=attn.dropout if attn.training else 0.0,
        output=lambda heads, x: attn.out_proj(heads),
        after_attn=(block.ls_1,),
        norm2=block.ln_2,
        mlp=block.mlp,
        after_mlp=(block.ls_2,),
    )


def _pool(visual: nn.Module, state: TokenState) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's VisionTransformer._pool, with the average and attention pools size-aware."""
    x = state.x
    if visual.attn_pool is None:
        if visual.final_ln_after_pool:
            pooled, tokens = _global_pool(visual, x, state.pool_weights())
            return visual.ln_post(pooled), tokens
        return _global_pool(visual, visual.ln_post(x), state.pool_weights())
    if visual.attn_pool_contrastive is None:
        queries = visual.ln_post(_attention_pool(visual.attn_pool, state))
        return _global_pool(visual, queries, None)
    state = state.with_x(visual.ln_post(x))
    tokens = _attention_pool(visual.attn_pool, state)
    if visual.attn_pool_type == "parallel":
        return _attention_pool(visual.attn_pool_contrastive, state), tokens
    return visual.attn_pool_contrastive(tokens), tokens


def _global_pool(
    visual: nn.Module, x: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's _global_pool with the 'avg' pool weighted by `weights` (token sizes, times
    the DiffRate search's mask; None: a plain mean)."""
    if visual.pool_type != "avg":
        return visual._global_pool(x)
    patches = x[:, _CLASS_TOKENS:]
    weights = None if weights is None else weights[:, _CLASS_TOKENS:]
    return size_weighted_mean(patches, weights), patches


def _attention_pool(pooler: nn.Module, state: TokenState) -> torch.Tensor:
    """AttentionalPooler.forward on the tokens of `state`, each key weighted by its size
    (log-size added to the attention logits, as in proportional attention); the keys that the
    DiffRate search masked get no weight."""
    bias = state.log_size_bias()
    if bias is None and state.mask is None:
        return pooler(state.x)
    x = pooler.ln_k(state.x)
    query = pooler.ln_q(pooler.query).unsqueeze(0).expand(x.shape[0], -1, -1)
    return pool_attention(pooler.attn, query, x, bias, state.mask)


def _norm_before_pool(visual: nn.Module) -> bool:
    """Whether open_clip applies ln_post to every token before pooling."""
    if visual.attn_pool is None:
        return not visual.final_ln_after_pool
    return visual.attn_pool_contrastive is not None


def _check_no_patch_dropout(visual: nn.Module) -> None:
    """Raise while open_clip's patch dropout would drop tokens (training mode)."""
    dropout = visual.patch_dropout
    if dropout.training and getattr(dropout, "prob", 0.0) > 0:
        raise ValueError(
            "open_clip's patch dropout is active (training mode) and drops tokens itself; "
            "token compression needs every patch: call model.eval() or build the model "
            "with patch_dropout=0"
        )


def _plain_self_attention(attn: Any) -> bool:
    """Whether `attn` is a batch-first nn.MultiheadAttention that `_attention_forward` covers."""
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
    )


def _head_macs(visual: nn.Module, tokens: int) -> int:
    """MACs of the pooling head (attention pools over `tokens` tokens) and projection (of
    every token where nothing pools them)."""
    macs = 0 if visual.proj is None else visual.proj.shape[0] * visual.proj.shape[1]
    if visual.attn_pool is None:
        return macs * tokens if visual.pool_type == "none" else macs
    macs += _pooler_macs(visual.attn_pool, tokens)
    if visual.attn_pool_contrastive is not None:
        parallel = visual.attn_pool_type == "parallel"
        keys = tokens if parallel else visual.attn_pool.query.shape[0]
        macs += _pooler_macs(visual.attn_pool_contrastive, keys)
    return macs


def _pooler_macs(pooler: nn.Module, keys: int) -> int:
    """q, k, v and output projections plus attention of an AttentionalPooler."""
    attn, queries = pooler.attn, pooler.query.shape[0]
    projections = 2 * queries * attn.embed_dim**2 + 2 * keys * attn.kdim * attn.embed_dim
    return projections + 2 * queries * keys * attn.embed_dim


def _name(visual: nn.Module) -> str:
    """A readable architecture name (open_clip does not keep the config name on the model)."""
    height, width = visual.image_size
    blocks = visual.transformer.resblocks
    return (
        f"open_clip ViT {height}x{width}/{visual.patch_size[0]} width {visual.conv1.out_channels}"
        f" depth {len(blocks)}"
    )

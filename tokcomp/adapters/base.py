"""What every model-family adapter does, the patch `apply` installs, and what the encoder
adapters share: one compressed block (BlockParts), attention with signals, pooling."""

from __future__ import annotations

import abc
import dataclasses
import inspect
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from tokcomp.errors import UsageError
from tokcomp.libraries import Library
from tokcomp.methods import (
    AttentionStyle,
    BlockMethod,
    BlockPosition,
    Method,
    Signal,
    Signals,
    TokenState,
)
from tokcomp.schedule import ModelSpec

#: Rows PyTorch's fused CPU attention is fastest on in bfloat16: a multiple of 16. At the
#: token counts merging leaves it takes up to twice the time it takes at the next multiple
#: of 16 (docs/methods.md section 8.1), so a block pads its rows there.
BFLOAT16_ATTENTION_ROWS = 16


class UnsupportedModelError(TypeError):
    """Raised for a model (or a part of one) that no adapter can patch."""


@dataclass(frozen=True)
class Compression:
    """A method bound to its per-block schedule on one model. Immutable: everything that
    changes during a forward lives in the TokenState passed along, so a patched model is
    re-entrant and thread safe.

    unmerge: an encoder returns its tokens (and hidden states) back on the input grid (a VLM's
    tower merging under a visual-token method). tower: on a VLM, the block method merging
    inside its vision tower, bound to the tower (with unmerge), beside the visual-token method.
    """

    method: Method
    schedule: tuple[int, ...]
    spec: ModelSpec
    unmerge: bool = False
    tower: Compression | None = None
    needs: tuple[Signal, ...] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a tuple taken outside tracing: dynamo before torch 2.10 cannot trace `in` on a
        # frozenset of enums that it did not build itself (a block method's `needs`)
        needs = self.method.needs if isinstance(self.method, BlockMethod) else ()
        object.__setattr__(self, "needs", tuple(needs))

    def start(self, x: torch.Tensor, protected: int) -> TokenState:
        """The state entering block 0 for embedded tokens `x`."""
        if x.shape[1] != self.spec.tokens:
            raise ValueError(
                f"this tokcomp schedule was built for {self.spec.tokens} tokens per image, "
                f"the input gives {x.shape[1]} (another image size?); apply tokcomp again "
                "with the model set to this input size"
            )
        source = None
        if self.method.trace_source or self.unmerge:
            eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
            source = eye.expand(x.shape[0], -1, -1)
        return TokenState(x, protected, source=source)

    def attention(
        self,
        index: int,
        state: TokenState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        dropout: float = 0.0,
    ) -> tuple[torch.Tensor, Signals]:
        """Block `index`'s multi-head attention on (B, heads, N, head_dim) q, k, v: with
        proportional attention and the search mask where they apply, plus the signals the
        method needs at this block (and only where it reduces)."""
        needs = self._needs(index, state)
        bias = state.log_size_bias() if self.method.prop_attn else None
        return attend(
            q, k, v, scale, bias, needs, dropout, state.mask, self.spec.class_token, state.tokens
        )

    def attention_rows(self, index: int, state: TokenState, x: torch.Tensor) -> int:
        """Rows block `index` runs its attention on, `x` its normed input: the tokens, padded
        to a multiple of BFLOAT16_ATTENTION_ROWS where the fused attention runs in bfloat16
        on the CPU (the padding rows are masked out as keys and dropped after)."""
        tokens = state.tokens
        fused = not _full_attention(self._needs(index, state), state.mask, self.spec.class_token)
        if not (fused and _bfloat16_on_cpu(x)):
            return tokens
        return rounded_up(tokens, BFLOAT16_ATTENTION_ROWS)

    def _needs(self, index: int, state: TokenState) -> tuple[Signal, ...]:
        """The signals block `index`'s attention computes: the method's where it reduces."""
        return self.needs if self.method.acts(self.schedule[index], state.tokens) else ()

    def reduce(self, index: int, state: TokenState, signals: Signals) -> TokenState:
        """Reduce `state` to block `index`'s budget (no-op where the method does not act)."""
        keep = self.schedule[index]
        if not self.method.acts(keep, state.tokens):
            return state
        return self.method.reduce(state, signals, keep, BlockPosition(index, len(self.schedule)))


@dataclass(frozen=True)
class BlockParts:
    """One encoder block under common names. It computes a = attention(norm1(x)) with the
    heads' q, k, v from `qkv` (each (B, heads, N, head_dim)) and `output` mapping the merged
    heads (B, N, heads x head_dim) and the normed input to the attention branch; then
    x + after_attn(a), the reduction, and x + after_mlp(mlp(norm2(x)))."""

    norm1: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    scale: float
    dropout: float
    output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    after_attn: tuple[nn.Module, ...]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    mlp: Callable[[torch.Tensor], torch.Tensor]
    after_mlp: tuple[nn.Module, ...]


def compressed_block(
    parts: BlockParts, index: int, state: TokenState, compression: Compression
) -> TokenState:
    """One encoder block with the reduction between attention and MLP."""
    x = parts.norm1(state.x)
    rows = compression.attention_rows(index, state, x)
    if rows > state.tokens:  # padded before the projections: the padding fuses into the norm
        x = F.pad(x, (0, 0, 0, rows - state.tokens))
    q, k, v = parts.qkv(x)
    out, signals = compression.attention(index, state, q, k, v, parts.scale, parts.dropout)
    out = parts.output(out.transpose(1, 2).flatten(2), x)[:, : state.tokens]
    state = state.with_x(state.x + through(parts.after_attn, out))
    state = compression.reduce(index, state, signals)
    mlp_out = parts.mlp(parts.norm2(state.x))
    return state.with_x(state.x + through(parts.after_mlp, mlp_out))


def through(modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    """`x` through `modules` in order."""
    for module in modules:
        x = module(x)
    return x


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, heads x head_dim) -> (B, heads, N, head_dim)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    needs: Collection[Signal] = (),
    dropout: float = 0.0,
    key_mask: torch.Tensor | None = None,
    class_token: bool = True,
    tokens: int | None = None,
) -> tuple[torch.Tensor, Signals]:
    """Multi-head attention plus the requested signals.

    Fused attention (scaled_dot_product_attention) unless the full attention matrix is
    needed or a differentiable `key_mask` (B, N) must keep masked keys out (DiffRate's
    search); the class-token row alone is computed on the side when only it is needed.
    Without a class token, CLS_ATTN is the mean attention each token receives. The signals
    are float32 whatever the model's dtype (the methods rank and match tokens by them).
    On the fused path, q, k and v may have padding rows after their first `tokens` (default:
    none), which no query attends to and which the signals leave out.
    """
    rows = q.shape[2]
    tokens = rows if tokens is None else tokens
    keys = k[:, :, :tokens].float().mean(dim=1) if Signal.KEYS in needs else None
    if _full_attention(needs, key_mask, class_token):
        probs = attention_probs(q, k, scale, bias, key_mask)
        attn = probs.to(q.dtype)
        mixed = (F.dropout(attn, dropout) if dropout else attn) @ v
        cls_attn = probs[:, :, 0] if class_token else _received(probs, key_mask)
        full_attn = probs if Signal.ATTN in needs else None
        return mixed, Signals(keys=keys, cls_attn=cls_attn, attn=full_attn)
    mask = bias if rows == tokens else _padding_masked(bias, q, tokens)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    cls_attn = None
    if Signal.CLS_ATTN in needs:
        cls_attn = attention_probs(q[:, :, :1], k[:, :, :tokens], scale, bias)[:, :, 0]
    return out, Signals(keys=keys, cls_attn=cls_attn)


def _full_attention(
    needs: Collection[Signal], key_mask: torch.Tensor | None, class_token: bool
) -> bool:
    """Whether `attend` computes the whole attention matrix (not the fused kernel): for the
    ATTN signal, a search mask, or CLS_ATTN without a class token (the attention received)."""
    cls_from_matrix = Signal.CLS_ATTN in needs and not class_token
    return Signal.ATTN in needs or key_mask is not None or cls_from_matrix


def _padding_masked(bias: torch.Tensor | None, q: torch.Tensor, tokens: int) -> torch.Tensor:
    """The additive key mask (B, 1, 1, rows) over q's rows: `bias` (B, 1, 1, tokens) or zeros on
    the tokens, -inf on the padding rows after them."""
    if bias is None:
        bias = q.new_zeros(q.shape[0], 1, 1, tokens)
    return F.pad(bias, (0, q.shape[2] - tokens), value=float("-inf"))


def rounded_up(count: int, multiple: int) -> int:
    """`count` rounded up to a multiple of `multiple`."""
    return -(-count // multiple) * multiple


def _bfloat16_on_cpu(x: torch.Tensor) -> bool:
    """Whether the attention of a block whose normed input is `x` runs in bfloat16 on the CPU
    (a bfloat16 model, or CPU autocast to bfloat16)."""
    if x.device.type != "cpu":
        return False
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


def _received(probs: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The mean attention each key receives from the queries still in the sequence (all of
    them without a search mask: masked tokens are gone from the inference forward)."""
    if key_mask is None:
        return probs.mean(dim=2)
    weights = key_mask.detach().float()[:, None, :, None]
    return (probs * weights).sum(dim=2) / weights.sum(dim=2)


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    queries_are_keys: bool = True,
) -> torch.Tensor:
    """float32 attention probabilities softmax(q k^T scale + bias) of (..., Q, d) queries
    over (..., K, d) keys, the logits in float32 too (also under autocast: the methods rank
    tokens by these probabilities, and bfloat16 logits move them by percents); `bias` is
    additive (-inf masks a key); `key_mask` (B, K) is DiffRate's differentiable keep-mask,
    under which each query still attends to itself where `queries_are_keys` (self-attention)."""
    with torch.autocast(q.device.type, enabled=False):
        logits = (q.float() * scale) @ k.float().transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    if key_mask is not None:
        return _masked_softmax(logits, key_mask, queries_are_keys)
    return logits.float().softmax(dim=-1)


def _masked_softmax(
    logits: torch.Tensor, key_mask: torch.Tensor, queries_are_keys: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Softmax whose masked keys (key_mask 0) get no weight, differentiably in the mask
    (DiffRate's softmax_with_policy); where the queries are the keys, each still attends to
    itself so that fully masked rows stay defined."""
    tokens = logits.shape[-1]
    policy = key_mask.float()[:, None, None, :]
    if queries_are_keys:
        eye = torch.eye(tokens, device=logits.device, dtype=torch.float32)
        policy = policy + (1.0 - policy) * eye
    weights = (logits.float() - logits.float().amax(dim=-1, keepdim=True)).exp() * policy
    return (weights + eps / tokens) / (weights.sum(dim=-1, keepdim=True) + eps)


def pool_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None,
    key_mask: torch.Tensor | None,
) -> torch.Tensor:
    """An attention pool's `attn` (a batch-first nn.MultiheadAttention) of (B, Q, E) `query`
    over (B, N, kdim) `tokens`, with proportional attention's log sizes `bias` (B, 1, 1, N) on
    its logits and, under the DiffRate search, no weight on the tokens its `key_mask` (B, N)
    leaves out (one of the two at least given)."""
    if key_mask is not None:
        return _masked_pool_attention(attn, query, tokens, bias, key_mask)
    mask = bias.expand(-1, attn.num_heads, query.shape[1], -1).flatten(0, 1)
    return attn(query, tokens, tokens, need_weights=False, attn_mask=mask)[0]


def _masked_pool_attention(
    attn: nn.MultiheadAttention,
    query: torch.Tensor,
    tokens: torch.Tensor,
    bias: torch.Tensor | None,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """An attention pool under the DiffRate search: `attn`'s multi-head attention of (B, Q, E)
    `query` over (B, N, kdim) `tokens` (its keys and values), batch first, through its own
    weights, with the additive `bias` (B, 1, 1, N) on its logits and no weight on the tokens
    that the differentiable keep-mask `key_mask` (B, N) leaves out."""
    if attn.bias_k is not None or attn.add_zero_attn:
        raise UnsupportedModelError(
            "the DiffRate search cannot mask an attention pool whose nn.MultiheadAttention has "
            "add_bias_kv or add_zero_attn; search a model whose pool has neither"
        )
    projections = _in_projection_weights(attn)
    biases = (None,) * 3 if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)
    inputs = (query, tokens, tokens)
    q, k, v = (
        split_heads(F.linear(x, w, b), attn.head_dim)
        for x, w, b in zip(inputs, projections, biases, strict=True)
    )
    probs = attention_probs(q, k, attn.head_dim**-0.5, bias, key_mask, queries_are_keys=False)
    probs = F.dropout(probs, attn.dropout) if attn.training and attn.dropout else probs
    return attn.out_proj((probs.to(v.dtype) @ v).transpose(1, 2).flatten(2))


def _in_projection_weights(
    attn: nn.MultiheadAttention,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q, k and v projection weights: packed in one matrix, or apart where the keys and
    values have their own widths (kdim, vdim)."""
    if attn.in_proj_weight is not None:
        return attn.in_proj_weight.chunk(3)
    return attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight


def refuse_skipped_work(
    model: nn.Module, skipped: Sequence[nn.Module], checkpointing: bool, turn_off: str
) -> None:
    """Refuse what a compressed forward would silently leave out: gradient checkpointing (on,
    with gradients on; `turn_off` says how to switch it off) and forward hooks on `skipped`,
    the modules whose own forward it never calls (the blocks, their container, their
    attention: the layers inside them run, on the compressed tokens)."""
    if torch.compiler.is_compiling():
        return
    if checkpointing and torch.is_grad_enabled():
        raise UsageError(
            "gradient checkpointing is on, and tokcomp's compressed blocks do not checkpoint "
            f"(activations would be kept): turn it off ({turn_off}), or run without gradients"
        )
    hooked = {id(module) for module in skipped if _users_hooks(module)}
    if hooked:
        names = [
            name or "the model" for name, module in model.named_modules() if id(module) in hooked
        ]
        raise UsageError(
            f"forward hooks on {', '.join(names)} would never run: a patched model runs its "
            "blocks through tokcomp's compressed forward, not their own; remove them "
            "(handle.remove()), hook the layers inside the blocks, or read the compressed "
            "tokens with tokcomp.forward_tokens(model, x)"
        )


#: Where the forward hooks that libraries install on their own layers come from (transformers
#: records hidden states and attentions through hooks; tokcomp gives them itself, or refuses).
_LIBRARY_HOOKS = ("transformers.utils.output_capturing",)


def _users_hooks(module: nn.Module) -> list[Callable]:
    """The forward hooks and pre-hooks on `module` that its library did not install."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [hook for hook in hooks if getattr(hook, "__module__", None) not in _LIBRARY_HOOKS]


def path_to(root: nn.Module, target: nn.Module) -> list[nn.Module]:
    """The modules from `root` down to `target` (both included; empty if it is not inside)."""
    for name, module in root.named_modules():
        if module is target:
            parts = name.split(".") if name else []
            return [
                root,
                *(root.get_submodule(".".join(parts[:n])) for n in range(1, len(parts) + 1)),
            ]
    return []


def empty_batch_output(forward: Callable[[torch.Tensor], Any], images: torch.Tensor) -> Any:
    """`forward`'s output for an empty batch of `images`: the model's own code may not reshape
    zero images, so one zero image runs and every tensor of its output keeps 0 rows."""
    return tree_map(_no_rows, forward(images.new_zeros(1, *images.shape[1:])))


def _no_rows(value: Any) -> Any:
    """`value` with 0 rows: a tensor, or each tensor field of a dataclass (a TokenState)."""
    if isinstance(value, torch.Tensor):
        return value[:0]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _no_rows(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **fields)
    return value


def linear_macs(module: nn.Module | None) -> int:
    """MACs per token of the nn.Linear layers in `module` (itself included); 0 for None."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def mlp_hidden(mlp: nn.Module, width: int) -> int:
    """The MLP's hidden width in the MACs model's terms (2 x width x hidden MACs per token),
    from all its linear layers: a plain MLP's hidden width, 3h/2 for a gated (SwiGLU) MLP of
    width h, whether its input projections are packed in one layer or not."""
    return linear_macs(mlp) // (2 * width)


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens (B, N, C) -> (B, C), each token weighted by how many patches it holds.
    A weight's gradient (the DiffRate search's mask in the sizes) flows through the sum only,
    not the normaliser, as the released MAE search divides by `num.detach()`."""
    if size is None:
        return x.mean(dim=1)
    weights = (size / size.sum(dim=1, keepdim=True).detach()).to(x.dtype)
    return (x * weights[..., None]).sum(dim=1)


@dataclass
class Patch:
    """What `apply` leaves on a model (and a VLM on its vision tower): the adapter that
    patched it and the compression."""

    adapter: Adapter
    compression: Compression
    #: The model `tokcomp.apply` patched where this patch is a part of its patch (a VLM's, on
    #: its vision tower); None: the adapter's model.
    owner: nn.Module | None = None

    @property
    def patched_model(self) -> nn.Module:
        """The model whose `tokcomp.apply` made this patch."""
        return self.adapter.model if self.owner is None else self.owner


class Adapter(abc.ABC):
    """Patches the models of one family. Adding a family = adding one file with a subclass.

    A subclass names the attributes it shadows (`overrides`) with adapter methods that take
    the Compression first; `install` sets Override objects that hold the Patch, so a deep copy
    or a pickle (torch.save) of the patched model carries its own adapter and compression.
    """

    #: The adapter's name; specs and configs record it as `family` (a config applies to the
    #: models this adapter patches).
    name: ClassVar[str]
    #: How the family implements attention (some methods' defaults depend on it).
    attention: ClassVar[AttentionStyle]
    #: What this family's adapter supports, for error messages.
    supported: ClassVar[str]
    #: The library its models come from, with the oldest release the adapter works with.
    library: ClassVar[Library]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    @abc.abstractmethod
    def recognises(cls, model: nn.Module) -> bool:
        """Whether `model` belongs to this family (it may still be an unsupported variant)."""

    @abc.abstractmethod
    def spec(self) -> ModelSpec:
        """The model's shape for schedules and MACs; raises UnsupportedModelError for
        variants of the family this adapter cannot patch."""

    @abc.abstractmethod
    def forward_tokens(self, compression: Compression, *args: Any, **kwargs: Any) -> TokenState:
        """Run the compressed trunk; the final token state (after the final norm)."""

    #: Adapter methods whose overrides show the signature of the method they stand in for
    #: (where a caller checks keywords against it); the others show (*args, **kwargs).
    signed: ClassVar[frozenset[str]] = frozenset()

    @abc.abstractmethod
    def overrides(self) -> list[tuple[nn.Module, str, str]]:
        """(module, attribute, adapter method) triples: what the patch shadows, and with what."""

    def intermediates_refused(self, compression: Compression, *args: Any, **kwargs: Any) -> None:
        """Stands in for the model's intermediate-layer entry points, which would run its
        blocks uncompressed."""
        raise UsageError(
            "tokcomp does not compress forward_intermediates / get_intermediate_layers (the "
            "blocks would run uncompressed, and merged layers hold fewer tokens than the grid); "
            "use forward_features or tokcomp.forward_tokens, or tokcomp.remove(model) for the "
            "original model's intermediates"
        )

    def pools_by_average(self) -> bool:
        """Whether the model's output averages its tokens (an 'avg' pool), not reading a class
        token or an attention pool (the DiffRate search then leaves the last block whole)."""
        return False

    def check(self, compression: Compression) -> None:  # noqa: B027  (optional hook)
        """Raise for a compression this model cannot run; `apply` calls it before it replaces
        the previous patch, so that a refused method leaves the model as it was."""

    def install(self, patch: Patch) -> None:
        """Shadow each overridden attribute on its module instance with the adapter method,
        keeping what the instance itself held there (a user's own wrapper of forward)."""
        self.shadowed = [
            (module, attribute, attribute in module.__dict__, module.__dict__.get(attribute))
            for module, attribute, _ in self.overrides()
        ]
        for module, attribute, method in self.overrides():
            signed = (type(module), attribute) if method in self.signed else None
            object.__setattr__(module, attribute, Override(patch, method, signed))

    def uninstall(self) -> None:
        """Remove the instance-level overrides: what the instance held before is back, else
        the class methods are visible again."""
        for module, attribute, held, previous in self.shadowed:
            if held:
                object.__setattr__(module, attribute, previous)
            else:
                module.__dict__.pop(attribute, None)


#: The signature of an override that does not show the one of the method it stands in for.
_ANY_ARGUMENTS = inspect.Signature(
    [
        inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
)


#: Where `tokcomp.apply` keeps the Patch on the model it patched.
PATCH_ATTRIBUTE = "_tokcomp"


def patched_on_its_own(module: nn.Module) -> bool:
    """Whether `tokcomp.apply` patched `module` itself (not as a part of a model holding it)."""
    return PATCH_ATTRIBUTE in module.__dict__


def check_unshared(model: nn.Module) -> None:
    """Refuse (ValueError) to patch `model` where tokcomp already compresses a part of it under
    another patch: a module inside it patched on its own (a CLIP model's or a VLM's image
    tower), or modules of it patched as part of a model holding it. Either patch would run
    unseen by the other's config (its method, schedule and MACs)."""
    names = {id(module): name for name, module in model.named_modules()}
    for module in model.modules():
        for value in module.__dict__.values():
            if not isinstance(value, Override) or value.patch.patched_model is model:
                continue
            holder = value.patch.patched_model
            if id(holder) in names:
                raise ValueError(
                    f"model.{names[id(holder)]} ({type(holder).__name__}) is patched on its "
                    "own: call tokcomp.remove on it first, then patch one of the two (a "
                    "LLaVA-family VLM merges inside its vision tower through tokcomp.apply's "
                    "tower= option)"
                )
            raise ValueError(
                f"this {type(model).__name__} is part of a {type(holder).__name__} that tokcomp "
                f"has patched: call tokcomp.remove on the {type(holder).__name__} first, or "
                "apply the method to it (applying again replaces its method)"
            )


def intermediates(module: nn.Module, names: Sequence[str]) -> list[tuple[nn.Module, str, str]]:
    """Overrides refusing those of `module`'s intermediate-layer entry points `names` it has."""
    return [(module, name, "intermediates_refused") for name in names if hasattr(module, name)]


class Override:
    """An instance attribute standing in for a module's method: calls the patch's adapter
    method `method` with the compression first. Its signature is (*args, **kwargs), or with
    `signed` (the class and name of the method it stands in for) that method's. A plain object
    (not a closure), so patched models pickle and deep-copy."""

    def __init__(self, patch: Patch, method: str, signed: tuple[type, str] | None = None) -> None:
        self.patch = patch
        self.method = method
        self.signed = signed

    @property
    def __signature__(self) -> inspect.Signature:
        """The signature callers inspect (see the class docstring)."""
        if self.signed is None:
            return _ANY_ARGUMENTS
        unbound = inspect.signature(getattr(*self.signed))
        return unbound.replace(parameters=list(unbound.parameters.values())[1:])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        patch = self.patch
        return getattr(patch.adapter, self.method)(patch.compression, *args, **kwargs)

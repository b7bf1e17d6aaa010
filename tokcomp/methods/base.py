"""The two kinds of compression method, as types.

A BlockMethod reduces the tokens of a vision encoder between attention and MLP of its blocks
(`reduce`), given the signals it declared (`needs`) and the block's budget. A VisualMethod
(methods/visual.py) chooses which visual tokens of a VLM reach its language model (`select`),
at a declared stage. A method may be both (random): it then subclasses both.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from types import UnionType
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import numpy as np
import torch

from tokcomp.methods.state import Signal, Signals, TokenState

#: The largest `seed` a seeded method takes: random mixes it with the block index into one
#: 64-bit generator seed (seed * 100_003 + block).
MAX_SEED = 2**32 - 1


class AttentionStyle(enum.Enum):
    """How a model family implements attention; some released methods set their defaults per
    codebase, and the attention implementation is what tells the codebases apart."""

    FUSED_QKV = "fused_qkv"  # one qkv projection (timm's Attention)
    MULTIHEAD = "multihead"  # torch's nn.MultiheadAttention (open_clip)
    SEPARATE_QKV = "separate_qkv"  # q/k/v projections (transformers)


@dataclass(frozen=True)
class Geometry:
    """What a method knows of a model: tokens entering block 0, how many of them are protected,
    the number of blocks, whether token 0 is a class token, the attention style, the residual
    width, the attention heads and the q/k/v width (heads x head_dim)."""

    tokens: int
    protected: int
    depth: int
    class_token: bool
    attention: AttentionStyle
    width: int
    heads: int
    attn_dim: int

    @property
    def head_dim(self) -> int:
        """Width of one head's queries and keys (and of the head-averaged keys)."""
        return self.attn_dim // self.heads


@dataclass(frozen=True)
class BlockPosition:
    """Where a reduction happens: block `index` of `depth`."""

    index: int
    depth: int


@dataclass(kw_only=True)
class Method:
    """Base of all methods. Subclasses are dataclasses whose fields are their options.

    Every method accepts `target_macs` (a fraction of the unpruned MACs; the nearest schedule
    of the method's own family is chosen) and `schedule` (tokens left after each block,
    explicit). Its native knobs are its other fields. Options hold plain values: numpy and torch
    numbers and arrays, tuples and ranges become Python numbers and lists, and a value of a type
    its option does not take is refused with one line naming the option.
    """

    name: ClassVar[str]
    #: The option holding the method's budget (what `target_macs` chooses).
    budget: ClassVar[str]
    #: Options beside the budget that only shape the schedule derived from it (an explicit
    #: schedule leaves them without effect).
    schedule_shapers: ClassVar[tuple[str, ...]] = ()

    target_macs: float | None = None
    schedule: list[int] | None = None

    def __post_init__(self) -> None:
        self._make_options_plain()
        seed = getattr(self, "seed", 0)
        require(self.name, "seed", seed, 0 <= seed <= MAX_SEED, f"an int from 0 to {MAX_SEED}")
        if self.target_macs is not None and self.schedule is not None:
            raise ValueError(f"{self.name}: give either target_macs or schedule, not both")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ValueError(
                f"{self.name}: target_macs is a fraction of the unpruned MACs in (0, 1], "
                f"got {self.target_macs}"
            )

    def _make_options_plain(self) -> None:
        """Hold every option as a plain value (plain_value) of a type it takes; refuse a value
        of another type, naming the option. A value its option takes as it is (a tensor or a
        callable where the option is one) is kept."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            taken = option_takes(type(self), field.name, value) is None
            plain = value if taken and not _stands_for_plain(value) else plain_value(value)
            takes = option_takes(type(self), field.name, plain)
            if takes is not None:
                raise ValueError(
                    f"{self.name}: {field.name}={value!r}, but its {field.name} takes {takes}"
                )
            setattr(self, field.name, plain)

    def settle(self, geometry: Geometry) -> Method:
        """This method with its model-dependent defaults filled in (e.g. per-family
        margins), so that a saved config states every value it ran with."""
        return self

    def candidates(self, geometry: Geometry) -> Iterator[Method]:
        """Copies of this method spanning its family of schedules (for `target_macs`)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Every option's value, defaults included, as plain JSON values: a config saved from
        them runs the same after a default changes."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def with_options(self, **changes: Any) -> Method:
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class BlockMethod(Method):
    """A method that reduces a vision encoder's tokens inside its blocks (ToMe, PiToMe,
    DiffRate, Zero-TPrune, EViT, random); on a VLM it acts inside the vision tower.

    prop_attn: proportional attention (log token size added to the attention logits).
    trace_source: keep the map of input patches inside each token (tokcomp.forward_tokens).
    """

    needs: ClassVar[frozenset[Signal]] = frozenset()
    budget: ClassVar[str] = "keep_ratio"
    #: Whether every token it removes is merged into a kept one, so that the input grid can be
    #: restored after it (merging inside a VLM's vision tower with unmerge).
    only_merges: ClassVar[bool] = False

    prop_attn: bool = True
    trace_source: bool = False

    def knob_schedule(self, geometry: Geometry) -> list[int]:
        """Tokens left after each block under this method's native knobs."""
        raise NotImplementedError

    def check_schedule(self, geometry: Geometry, schedule: list[int]) -> None:
        """Raise ValueError if this method cannot realise `schedule` on `geometry`."""

    def acts(self, keep: int, tokens: int) -> bool:
        """Whether the method works (and needs its signals) at a block that must go from
        `tokens` to `keep` tokens."""
        return keep < tokens

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        """Reduce `state` to `keep` tokens at block `position`."""
        raise NotImplementedError

    def reduce_macs(self, geometry: Geometry, tokens: int, keep: int, index: int) -> int:
        """Multiply-adds of the matmuls `reduce` runs at block `index` (from `tokens` to `keep`
        tokens); sorting, gathers and merges count 0. The signals are the MACs model's."""
        return 0


def split_match_macs(tokens: int, width: int) -> int:
    """MACs of matching alternate tokens (even positions against odd, cosine over `width`)."""
    return (tokens + 1) // 2 * (tokens // 2) * width


def option_names(method: type[Method]) -> list[str]:
    """The options `method` accepts."""
    return [field.name for field in dataclasses.fields(method)]


def plain_value(value: Any) -> Any:
    """`value` as a plain option value: numpy and torch scalars and arrays as Python numbers
    and lists, tuples and ranges as lists, paths as text; so every method reads them alike,
    and a config saved from them reloads equal."""
    if isinstance(value, np.generic | np.ndarray | torch.Tensor):
        value = value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list | tuple | range):
        return [plain_value(item) for item in value]
    return value


def _stands_for_plain(value: Any) -> bool:
    """Whether `value` holds numpy numbers or arrays, tuples, ranges or paths (in a list too),
    which options hold as the Python numbers, lists and text they stand for."""
    if isinstance(value, list):
        return any(_stands_for_plain(item) for item in value)
    return isinstance(value, np.generic | np.ndarray | tuple | range | os.PathLike)


def option_takes(method: type[Method], option: str, value: Any) -> str | None:
    """None if option `option` of `method` takes the plain `value`'s type (an int where it
    takes a float; never a bool where it takes a number); else the types it takes."""
    hint = _option_hints(method).get(option, Any)
    return None if _admits(hint, value) else _type_name(hint)


def require(method: str, option: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise ValueError naming `option`, its `value` and the `allowed` values unless `ok`."""
    if not ok:
        raise ValueError(f"{method}: {option} must be {allowed}, got {value!r}")


@functools.cache
def _option_hints(method: type[Method]) -> dict[str, Any]:
    return get_type_hints(method)


def _admits(hint: Any, value: Any) -> bool:
    """Whether type hint `hint` admits the plain `value` (list hints: every item too)."""
    if hint is Any:
        return True
    if get_origin(hint) in (Union, UnionType):
        return any(_admits(arg, value) for arg in get_args(hint))
    if get_origin(hint) is list:
        return isinstance(value, list) and all(_admits(get_args(hint)[0], v) for v in value)
    if get_origin(hint) is not None:  # another generic (Callable[...], dict[...]): its class
        return isinstance(value, get_origin(hint))
    if not isinstance(hint, type):
        return True
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, int | float) if hint is float else isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if get_origin(hint) in (Union, UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(hint))
    if get_origin(hint) is list:
        return f"list of {_type_name(get_args(hint)[0])}"
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))

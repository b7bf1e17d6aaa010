"""What every compression method is: a small object with native knobs that reduces a token
state, given the signals it declared it needs and this layer's budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from tokcomp.methods.state import Signal, Signals, TokenState


@dataclass(frozen=True)
class Layout:
    """What a method knows of the model: tokens entering block 0, how many of them are
    protected, the number of blocks, whether token 0 is a class token, and the model family
    (adapter name: "timm", "open_clip", "hf_vision", ...) for family-dependent defaults."""

    tokens: int
    protected: int
    depth: int
    class_token: bool
    family: str


@dataclass(frozen=True)
class Layer:
    """Where a reduction happens: block `index` of `depth`."""

    index: int
    depth: int


@dataclass(kw_only=True)
class Method:
    """Base of all methods. Subclasses are dataclasses whose fields are their options.

    Every method accepts `target_macs` (a fraction of the unpruned MACs; the nearest schedule
    of the method's own family is chosen) and `schedule` (tokens left after each block,
    explicit). Its native knobs are its other fields.
    """

    name: ClassVar[str]
    needs: ClassVar[frozenset[Signal]] = frozenset()

    target_macs: float | None = None
    schedule: list[int] | None = None
    prop_attn: bool = True
    trace_source: bool = False

    def __post_init__(self) -> None:
        if self.target_macs is not None and self.schedule is not None:
            raise ValueError(f"{self.name}: give either target_macs or schedule, not both")
        if self.target_macs is not None and not 0 < self.target_macs <= 1:
            raise ValueError(
                f"{self.name}: target_macs is a fraction of the unpruned MACs in (0, 1], "
                f"got {self.target_macs}"
            )

    # -- budgets ---------------------------------------------------------------------------
    def settle(self, layout: Layout) -> Method:
        """This method with its model-dependent defaults filled in (e.g. per-family
        margins), so that a saved config states every value it ran with."""
        return self

    def knob_schedule(self, layout: Layout) -> list[int]:
        """Tokens left after each block under this method's native knobs."""
        raise NotImplementedError

    def candidates(self, layout: Layout) -> Iterator[Method]:
        """Copies of this method spanning its family of schedules (for `target_macs`)."""
        raise NotImplementedError

    def check_schedule(self, layout: Layout, schedule: list[int]) -> None:
        """Raise ValueError if this method cannot realise `schedule` on `layout`."""

    def acts(self, keep: int, tokens: int) -> bool:
        """Whether the method works (and needs its signals) at a block that must go from
        `tokens` to `keep` tokens."""
        return keep < tokens

    # -- the work --------------------------------------------------------------------------
    def reduce(self, state: TokenState, signals: Signals, keep: int, layer: Layer) -> TokenState:
        """Reduce `state` to `keep` tokens at `layer`."""
        raise NotImplementedError

    # -- options ---------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """The options that differ from their defaults, as plain JSON values."""
        result = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != _default(field):
                result[field.name] = value
        return result

    def with_options(self, **changes: Any) -> Method:
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def option_names(method: type[Method]) -> list[str]:
    """The options `method` accepts."""
    return [field.name for field in dataclasses.fields(method)]

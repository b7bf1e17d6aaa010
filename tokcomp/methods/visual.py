"""What a method that prunes a VLM's visual tokens sees and returns, and the budget rules they
share (METHODS.md sections 5 and 6). The VLM adapter computes, per image (or crop), only the
signals a method declares; the method picks which visual tokens reach the language model."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tokcomp.methods.base import Layout, Method
from tokcomp.methods.budget import kept_count

POSITIONS = ("keep", "renumber")


class VisualSignal(enum.Enum):
    """What a visual-token method may ask the VLM adapter for, besides the projector outputs."""

    FEATURES = "features"  # the vision features entering the projector, (B, N, C)
    ATTENTION = "attention"  # class-token attention at the feature layer, summed over heads, (B, N)
    KEYS = "keys"  # head-averaged attention keys at the feature layer, (B, N, head_dim)


@dataclass(frozen=True)
class VisualTokens:
    """The visual tokens of B images (or crops) of N tokens each, in placeholder order.

    outputs: projector outputs, what the language model receives (B, N, D). projector: the
    projector as a chain of modules applied in order (e.g. Linear, activation, Linear), mapping
    features to outputs. features / attention / keys: see VisualSignal (None unless declared).
    Towers without a class token (SigLIP) give as attention the mean attention each token
    receives. FastV gets here the attention each token receives inside the language model.
    """

    outputs: torch.Tensor
    projector: tuple[nn.Module, ...]
    features: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.outputs.shape[0]

    @property
    def tokens(self) -> int:
        return self.outputs.shape[1]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Features (..., C) through the projector."""
        for module in self.projector:
            features = module(features)
        return features


@dataclass(frozen=True)
class Selection:
    """What reaches the language model from each image: `index` (B, k) ascending, the visual
    tokens kept (or whose places merged tokens take); `outputs` (B, k, D) the tokens to insert
    there when they are not the projector outputs at `index` (merged tokens)."""

    index: torch.Tensor
    outputs: torch.Tensor | None = None


def selection_of(method: Method, visual: VisualTokens, keep: int) -> Selection:
    """`method.select(visual, keep)` as a Selection (methods may return bare indices)."""
    chosen = method.select(visual, keep)
    return chosen if isinstance(chosen, Selection) else Selection(chosen)


def selects_visual_tokens(method: Method) -> bool:
    """Whether `method` acts on a VLM's visual tokens (else it acts inside the vision tower)."""
    return callable(getattr(method, "select", None))


def visual_keep(method: Method) -> int | float:
    """The per-image visual budget of a visual-token method: `keep`, or `keep_ratio`."""
    return method.keep if isinstance(method, VisualMethod) else method.keep_ratio


def visual_positions(method: Method) -> str:
    """How kept tokens are numbered: "keep" (original position ids) or "renumber". Every
    method that selects visual tokens has `positions` (random too, which is not a
    VisualMethod because it also prunes vision transformers); a method inside the vision
    tower sends fewer tokens, numbered contiguously."""
    return method.positions if selects_visual_tokens(method) else "renumber"


def check_keep(name: str, keep: Any) -> None:
    """Raise ValueError unless `keep` is a fraction in (0, 1] or a count >= 1."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"{name}: keep must be a fraction in (0, 1] or a count >= 1, got {keep!r}")
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{name}: keep must be a count >= 1 or a fraction, got {keep}")
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise ValueError(f"{name}: a fractional keep must be in (0, 1], got {keep}")


def check_positions(name: str, positions: Any) -> None:
    """Raise ValueError unless `positions` names a numbering of the kept visual tokens."""
    if positions not in POSITIONS:
        raise ValueError(f"{name}: positions must be one of {POSITIONS}, got {positions!r}")


def visual_budget(name: str, keep: int | float, tokens: int) -> int:
    """Visual tokens kept out of `tokens` for `keep` (a fraction, or a count that must fit)."""
    if isinstance(keep, float):
        return max(1, kept_count(tokens, keep))
    if keep > tokens:
        raise ValueError(
            f"{name}: keep={keep} is more than the {tokens} visual tokens of this image; pass "
            f"keep <= {tokens}, or a fraction in (0, 1] to keep a share of every image"
        )
    return keep


def vlm_geometry(layout: Layout, name: str) -> tuple[int, int, int]:
    """(selectable visual tokens per reference image, always-kept visual tokens, language-model
    depth) of a VLM layout; a clear error for any other model."""
    if not hasattr(layout, "llm_depth"):
        raise ValueError(
            f"{name} prunes the visual tokens of a vision-language model (LLaVA-1.5, LLaVA-NeXT, "
            "Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM); this is a vision encoder "
            f"({layout.family}): use tome, pitome, diffrate, zero_tprune, evit or random"
        )
    return layout.visual_tokens - layout.fixed_visual, layout.fixed_visual, layout.llm_depth


def visual_schedule(method: Method, layout: Layout) -> list[int]:
    """A visual-token method's schedule on a VLM: the vision tower's blocks keep every token,
    then, per language-model layer, the visual tokens of the reference image it processes."""
    selectable, fixed, _ = vlm_geometry(layout, method.name)
    kept = visual_budget(method.name, visual_keep(method), selectable) + fixed
    tower = [layout.tokens] * layout.depth
    if isinstance(method, VisualMethod):
        return tower + method.llm_schedule(layout, selectable + fixed, kept)
    return tower + [kept] * layout.llm_depth


@dataclass(kw_only=True)
class VisualMethod(Method):
    """Base of the methods that choose, per image, which visual tokens a VLM's language model
    sees (ZOO-Prune, DivPrune, VisionZip before it; FastV inside it).

    keep: visual tokens kept per image, a fraction in (0, 1] or a count (int >= 1; an image
    with fewer tokens is an error); LLaVA-NeXT's image-newline tokens are kept on top of it,
    and its crops share it evenly. positions: "renumber" numbers the kept sequence
    contiguously (the released LLaVA code inserts fewer tokens), "keep" leaves every kept
    token its original position id; decoding continues at the matching numbering.
    """

    #: Signals the adapter computes for `select`.
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset()
    #: Where the method chooses: "projector" (before the language model) or "llm" (inside it).
    stage: ClassVar[str] = "projector"

    keep: int | float = 64
    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_keep(self.name, self.keep)
        if self.trace_source:
            raise ValueError(f"{self.name}: trace_source applies to vision-encoder methods")
        check_positions(self.name, self.positions)

    def settle(self, layout: Layout) -> Method:
        vlm_geometry(layout, self.name)
        return self

    def knob_schedule(self, layout: Layout) -> list[int]:
        return visual_schedule(self, layout)

    def llm_schedule(self, layout: Layout, tokens: int, kept: int) -> list[int]:
        """Visual tokens per image each language-model layer processes."""
        return [kept] * layout.llm_depth

    def candidates(self, layout: Layout) -> Iterator[Method]:
        selectable, _, _ = vlm_geometry(layout, self.name)
        for count in range(1, selectable + 1):
            yield self.with_options(keep=count, target_macs=None, schedule=None)

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor | Selection:
        """Which `keep` of each image's visual tokens reach the language model: (B, keep)
        ascending indices, or a Selection when merged tokens take some places."""
        raise NotImplementedError

"""The visual-token methods of VLMs: what they see (VisualTokens), what they return (Selection),
where they act (Stage) and their shared budget rules (docs/methods.md sections 5 and 6). The VLM
adapter computes, per image (or crop), only the signals a method declares; the method picks
which visual tokens reach the language model."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import torch
from torch import nn

from tokcomp.methods.base import Method, require

POSITIONS = ("keep", "renumber")


class Stage(enum.Enum):
    """Where a visual-token method chooses. (A BlockMethod applied to a VLM acts earlier,
    inside the vision tower's blocks.)"""

    PROJECTOR = "projector"  # among the visual tokens, before the language model
    LLM = "llm"  # inside the language model, after its first `layer` decoder layers


class VisualSignal(enum.Enum):
    """What a visual-token method may ask the VLM adapter for, besides the projector outputs."""

    FEATURES = "features"  # the vision features entering the projector, (B, N, C)
    ATTENTION = "attention"  # class-token attention at the feature layer, summed over heads, (B, N)
    KEYS = "keys"  # head-averaged attention keys at the feature layer, (B, N, head_dim)
    #: per image, its prompt's text tokens (image placeholders and padding left out) as the
    #: language model's input embeddings: a tuple of B (T_b, D) tensors
    TEXT = "text"
    #: per image, the token ids of its prompt's text after the prompt's last image placeholder
    #: (its instruction, as the language model's tokenizer wrote it): a tuple of B (T_b,) tensors
    PROMPT = "prompt"
    #: the frames of each video (VisualTokens.frames): only families that take videos give them
    FRAMES = "frames"


class LLMSignal(enum.Enum):
    """What an LLM-stage method ranks the visual tokens by, at each of its boundaries."""

    ATTENTION = "attention"  # the attention they receive from the query rows in the scoring layer
    KEYS_AND_STATES = "keys_and_states"  # the scoring layer's keys, the normed states entering b


class ProjectorForm(enum.Enum):
    """The shape of a VLM's projector, as far as perturbing it goes (ZOO's sensitivity)."""

    LINEAR = "linear"  # one nn.Linear
    MLP = "mlp"  # Linear, a parameter-free activation, Linear
    OTHER = "other"  # anything else (e.g. a normalisation inside)


def projector_form(chain: Sequence[nn.Module]) -> ProjectorForm:
    """The form of a projector given as a chain of modules."""
    if len(chain) == 1 and isinstance(chain[0], nn.Linear):
        return ProjectorForm.LINEAR
    if (
        len(chain) == 3
        and isinstance(chain[0], nn.Linear)
        and isinstance(chain[2], nn.Linear)
        and not any(True for _ in chain[1].parameters())
    ):
        return ProjectorForm.MLP
    return ProjectorForm.OTHER


@dataclass(frozen=True)
class VisualGeometry:
    """What the cost of choosing a VLM's visual tokens depends on: the projector's layer widths
    (features first, the language model's width last) and form, and the width of the vision
    tower's head-averaged keys (VisualSignal.KEYS), and the frames of the reference video (1 for
    an image)."""

    projector_widths: tuple[int, ...]
    projector_form: ProjectorForm
    key_width: int
    frames: int = 1

    @property
    def projector_token_macs(self) -> int:
        """MACs of one token through the projector."""
        return sum(a * b for a, b in pairwise(self.projector_widths))

    @property
    def feature_width(self) -> int:
        """Width of the projector inputs (the vision features)."""
        return self.projector_widths[0]

    @property
    def output_width(self) -> int:
        """Width of the projector outputs (the language model's)."""
        return self.projector_widths[-1]


@dataclass(frozen=True)
class VisualTokens:
    """The visual tokens of B images (or crops) of N tokens each, in placeholder order.

    outputs: projector outputs, what the language model receives (B, N, D). projector: the
    projector as a chain of modules applied in order (e.g. Linear, activation, Linear), mapping
    features to outputs. features / attention / keys / text / prompt: see VisualSignal (None
    unless declared). frames: the frames the tokens span, frame-major with tokens // frames each
    (a video's frames, Qwen's temporal patches; 1 for an image).
    Towers without a class token (SigLIP) give as attention the mean attention each token
    receives. LLM-stage methods get here what their `llm_signal` names: the attention each
    token receives inside the language model (ATTENTION); or (KEYS_AND_STATES) as `keys` the
    scoring layer's post-RoPE keys, query heads concatenated (B, N, heads * head_dim), as
    `states` the final-normed hidden states entering the boundary layer (B, N, D), and the
    same two of the prompt's text tokens after the image (`text_keys`, `text_states`,
    (B, M, ...), left-padded; `text_valid` (B, M) marks the real ones). For them `outputs` are
    the hidden states entering the boundary, the tokens the later layers receive. frames: the
    frames each row spans (a video's, frame-major with tokens // frames each; 1 for an image).
    """

    outputs: torch.Tensor
    projector: tuple[nn.Module, ...]
    features: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    states: torch.Tensor | None = None
    text_keys: torch.Tensor | None = None
    text_states: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None
    text: tuple[torch.Tensor, ...] | None = None
    prompt: tuple[torch.Tensor, ...] | None = None
    frames: int = 1

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


@dataclass(kw_only=True)
class VisualMethod(Method):
    """A method that chooses, per image, which visual tokens a VLM's language model sees.

    Declares its `stage`, the signals it needs (`visual_needs`) and the option that holds its
    per-image budget (`budget`): visual tokens kept per image, a fraction in (0, 1] or a count
    (int >= 1; an image with fewer tokens is an error); LLaVA-NeXT's image-newline tokens are
    kept on top of it, and its crops share it evenly. positions: "renumber" numbers the kept
    sequence contiguously (the released LLaVA code inserts fewer tokens), "keep" leaves every
    kept token its original position id; decoding continues at the matching numbering.
    """

    stage: ClassVar[Stage] = Stage.PROJECTOR
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset()
    budget: ClassVar[str] = "keep"
    #: How a fractional budget rounds, as the method's released code does (ZOO-Prune:
    #: int(keep * N); DivPrune and FastV: round).
    rounding: ClassVar[Callable[[float], int]] = staticmethod(math.floor)
    #: Whether target_macs can choose the budget (not where the reference image tokcomp prices
    #: budgets on loses nothing to the method, as with DyCoke's frame merging).
    takes_target_macs: ClassVar[bool] = True

    positions: str = "renumber"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_budget()
        check_positions(self.name, self.positions)

    @classmethod
    def budget_choices(cls) -> str:
        """How an error names the options that set this method's budget."""
        return f"{cls.budget} (or target_macs)" if cls.takes_target_macs else cls.budget

    def check_budget(self) -> None:
        """Raise ValueError unless the budget option is a valid per-image budget."""
        check_keep(self.name, self.visual_keep(), self.budget)

    def visual_keep(self) -> int | float:
        """The per-image budget: a count or a fraction of each image's visual tokens."""
        return getattr(self, self.budget)

    def kept_of(self, tokens: int, frames: int = 1) -> int:
        """Visual tokens this method keeps out of `tokens` spanning `frames` frames (only
        per-frame methods, those needing VisualSignal.FRAMES, depend on `frames`)."""
        return visual_budget(self.name, self.visual_keep(), tokens, self.rounding)

    def check_visual_options(self) -> None:
        """Raise ValueError for options that mean nothing when choosing a VLM's visual tokens."""

    def check_tower(self, tower: nn.Module | None) -> None:
        """Raise ValueError unless the method's options suit the VLM's vision tower (None where
        tokcomp does not address the family's tower); called when the method is applied."""

    def budget_candidates(self, selectable: int) -> Iterator[Method]:
        """Copies spanning the budgets of an image with `selectable` tokens (for target_macs)."""
        for count in range(1, selectable + 1):
            yield self.with_options(**{self.budget: count, "target_macs": None, "schedule": None})

    def llm_schedule(
        self,
        llm_depth: int,
        selectable: int,
        fixed: int,
        frames: int = 1,
        segments: Sequence[int] = (),
    ) -> list[int]:
        """Visual tokens per image each of the `llm_depth` language-model layers processes, for
        an image (or a video of `frames` frames) with `selectable` tokens to choose from, in
        `segments` of those sizes (default: one), and `fixed` always kept."""
        self.checked_decode_boundary(llm_depth)
        return [self.kept_of(selectable, frames) + fixed] * llm_depth

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor | Selection:
        """Which `keep` of each image's visual tokens reach the language model: (B, keep)
        ascending indices, or a Selection when merged tokens take some places."""
        raise NotImplementedError

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """Multiply-adds of the matmuls `select` runs to keep `keep` of one segment's `tokens`
        (sorting, argmax and greedy steps count 0). The signals are the MACs model's."""
        return 0

    def selection(self, visual: VisualTokens, keep: int) -> Selection:
        """`select` as a Selection (methods may return bare indices)."""
        chosen = self.select(visual, keep)
        return chosen if isinstance(chosen, Selection) else Selection(chosen)

    def decode_boundary(self) -> int | None:
        """The first decoder layer that, in each decoding step, attends only to the cached video
        tokens `decode_kept` keeps (None: every decoding step attends to the whole cache)."""
        return None

    def checked_decode_boundary(self, llm_depth: int) -> int | None:
        """`decode_boundary()`, refused with a clear error unless it is inside a language model of
        `llm_depth` layers (checked when the method is applied, not at the first decoding step)."""
        boundary = self.decode_boundary()
        if boundary is not None and boundary >= llm_depth:
            raise ValueError(
                f"{self.name}: decode_layer must be below the language model's {llm_depth} "
                f"layers (the layers from it skip video tokens while decoding), got {boundary}"
            )
        return boundary

    def decode_kept(
        self,
        attention: torch.Tensor,
        video: torch.Tensor,
        previous: torch.Tensor | None,
        kept: torch.Tensor | None,
    ) -> torch.Tensor:
        """(B, P) bool: the cached prompt positions the layers from `decode_boundary()` attend to
        in this decoding step, given the new token's (B, P) `attention` over the prompt in the
        layer before, the prompt's `video` tokens (B, P), and the attention and kept positions
        of the previous step (`previous`, `kept`; None at the first step)."""
        raise NotImplementedError


def most_attended(attention: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, keep) ascending indices of the `keep` tokens with the most (B, N) `attention`
    (ties: the earlier token)."""
    order = attention.argsort(dim=1, descending=True, stable=True)
    return order[:, :keep].sort(dim=1).values


def last_text_token(text: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: each row's last token of the (B, L) `text` tokens (the prompt's real tokens
    that are not image placeholders), wherever padding and images lie."""
    columns = torch.arange(text.shape[1], device=text.device)
    return columns == columns.masked_fill(~text, -1).amax(dim=1, keepdim=True)


def check_keep(name: str, keep: int | float, option: str = "keep") -> None:
    """Raise ValueError unless `keep` (option `option`) is a fraction in (0, 1] or a count >= 1."""
    if isinstance(keep, int) and keep < 1:
        raise ValueError(f"{name}: {option} must be a count >= 1 or a fraction, got {keep}")
    if isinstance(keep, float) and not 0 < keep <= 1:
        raise ValueError(f"{name}: a fractional {option} must be in (0, 1], got {keep}")


def check_decoder_layer(name: str, option: str, layer: int) -> None:
    """Raise ValueError unless `layer` (option `option`) can be a decoder layer to prune before:
    at least 1 (the language model's depth bounds it when the method is applied)."""
    require(name, option, layer, layer >= 1, "a decoder layer >= 1 (layer 0 has none before it)")


def check_positions(name: str, positions: Any) -> None:
    """Raise ValueError unless `positions` names a numbering of the kept visual tokens."""
    if positions not in POSITIONS:
        raise ValueError(f"{name}: positions must be one of {POSITIONS}, got {positions!r}")


def visual_budget(
    name: str, keep: int | float, tokens: int, rounding: Callable[[float], int] = math.floor
) -> int:
    """Visual tokens kept out of `tokens` for `keep`: a count that must fit, or a fraction,
    rounded by `rounding` (at least one)."""
    if isinstance(keep, float):
        # to 9 decimals: a whole product (0.35 * 2880) is no longer a hair below its integer
        return max(1, int(rounding(round(keep * tokens, 9))))
    if keep > tokens:
        raise ValueError(
            f"{name}: keep={keep} is more than the {tokens} visual tokens of this image; pass "
            f"keep <= {tokens}, or a fraction in (0, 1] to keep a share of every image"
        )
    return keep


def budget_shares(sizes: Sequence[int], budget: int) -> list[int]:
    """Each segment's share of an image's `budget`: split evenly over segments of `sizes`
    tokens, capped by each size, filled from the smallest segment up (what a full segment
    cannot take goes to the larger ones)."""
    shares, left = [0] * len(sizes), budget
    for position, index in enumerate(sorted(range(len(sizes)), key=lambda i: (sizes[i], i))):
        shares[index] = min(sizes[index], -(-left // (len(sizes) - position)))
        left -= shares[index]
    return shares


@dataclass(kw_only=True)
class LLMStageMethod(VisualMethod):
    """A visual-token method that chooses inside the language model, at one or more boundaries
    (`boundaries`): before decoder layer b, it keeps `kept_at(stage, tokens)` of each image's
    `tokens` visual tokens, ranked by its `llm_signal` in decoder layer `scoring_layer(b)`
    (FastV: b - 1, the last layer before the cut; PyramidDrop: b, from the layer's own
    projections before it runs): the attention they receive from the `queries` rows, or
    (DART) that layer's keys and the hidden states entering layer b; layers from b on see the
    kept ones. The VLM adapter runs the decoder span by span around the choices."""

    stage: ClassVar[Stage] = Stage.LLM
    llm_signal: ClassVar[LLMSignal] = LLMSignal.ATTENTION
    #: The option that places the boundaries.
    layers_option: ClassVar[str] = "layers"

    def boundaries(self, llm_depth: int) -> list[int]:
        """The decoder layers, ascending, before which the method chooses."""
        raise NotImplementedError

    def scoring_layer(self, boundary: int) -> int:
        """The decoder layer whose attention ranks the visual tokens at `boundary`."""
        return boundary - 1

    def kept_at(self, stage: int, tokens: int, llm_depth: int) -> int:
        """Visual tokens kept after boundary `stage` out of an image's original `tokens`, in a
        language model of `llm_depth` layers."""
        return self.kept_of(tokens)

    def queries(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the query rows whose attention the choice averages, given the (B, L)
        text tokens of the prompt (its real tokens that are not image placeholders)."""
        raise NotImplementedError

    def query_weights(
        self, rows: torch.Tensor, visual: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        """(B, L) float: each of the `rows` query rows' weight in the average, chosen once from
        the original prompt (its (B, L) `visual` placeholders and (B, L, D) input embeddings)
        and kept through the cuts; by default the rows weigh alike."""
        return rows.float()

    def query_weight_macs(self, visual: int, rows: int, width: int) -> int:
        """Multiply-adds of `query_weights` for `visual` visual tokens, `rows` query rows and
        embeddings `width` wide."""
        return 0

    def after_cut(self, kept: int, tokens: int) -> int:
        """Visual tokens a choice of `kept` out of `tokens` leaves (more where it adds merged
        tokens)."""
        return kept

    def checked_boundaries(self, llm_depth: int) -> list[int]:
        """`boundaries`, refused with a clear error unless each splits the language model after
        the previous one, with its scoring layer in between."""
        boundaries, previous = self.boundaries(llm_depth), 0
        for boundary in boundaries:
            if not (previous <= self.scoring_layer(boundary) and 1 <= boundary < llm_depth):
                raise ValueError(self._boundaries_error(boundaries, llm_depth))
            previous = boundary
        return boundaries

    def _boundaries_error(self, boundaries: list[int], llm_depth: int) -> str:
        """Why `boundaries` cannot split a language model `llm_depth` layers deep."""
        option = self.layers_option
        asked = f"{self.name}: {option}={getattr(self, option)!r} prunes before decoder layers "
        if llm_depth < 2:
            return (
                f"{asked}{boundaries}, but the language model has {llm_depth} layer: {self.name} "
                "prunes between decoder layers and needs at least 2"
            )
        return (
            f"{asked}{boundaries}, which must be ascending in 1..{llm_depth - 1} (the language "
            f"model has {llm_depth} layers)"
        )

    def llm_schedule(
        self,
        llm_depth: int,
        selectable: int,
        fixed: int,
        frames: int = 1,
        segments: Sequence[int] = (),
    ) -> list[int]:
        counts, start, sizes = [], 0, list(segments or [selectable])
        for stage, boundary in enumerate(self.checked_boundaries(llm_depth)):
            counts += [sum(sizes) + fixed] * (boundary - start)
            shares = self.stage_shares(stage, selectable, llm_depth, sizes)
            start, sizes = boundary, self.cut_sizes(sizes, shares)
        return counts + [sum(sizes) + fixed] * (llm_depth - start)

    def stage_shares(
        self, stage: int, tokens: int, llm_depth: int, sizes: Sequence[int]
    ) -> list[int]:
        """Each segment's share of boundary `stage`'s budget in an image of `tokens` original
        visual tokens, over segments of `sizes` tokens before it (at most what they hold)."""
        kept = min(self.kept_at(stage, tokens, llm_depth), sum(sizes))
        return budget_shares(sizes, kept)

    def cut_sizes(self, sizes: Sequence[int], shares: Sequence[int]) -> list[int]:
        """Each segment's visual tokens after a cut keeping `shares` of its `sizes`, each cut
        (and, SparseVLM, recycled) on its own; a segment without a share keeps none."""
        return [
            self.after_cut(share, size) if share else 0
            for share, size in zip(shares, sizes, strict=True)
        ]

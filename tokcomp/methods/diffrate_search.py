"""DiffRate's differentiable rates: learnable distributions over kept-token counts per block
and operation, and the training-time reduction that keeps masked tokens in the sequence so
that gradients reach the rates (docs/methods.md section 3, "Search")."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn

from tokcomp.methods.base import BlockMethod, BlockPosition, Geometry
from tokcomp.methods.state import Signal, Signals, TokenState, rank_by_score
from tokcomp.ops import best_match, gather_rows


class _CeilSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        return value.ceil()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


class _MinSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, current, prune, merge):
        return torch.minimum(torch.minimum(current, prune), merge)

    @staticmethod
    def backward(ctx, grad):
        return None, grad, grad


def ceil_ste(value: torch.Tensor) -> torch.Tensor:
    """ceil in the forward pass, identity gradient."""
    return _CeilSTE.apply(value)


def min_ste(current: torch.Tensor, prune: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
    """min of the three in the forward pass; the gradient goes to both kept counts."""
    return _MinSTE.apply(current, prune, merge)


class KeptCount(nn.Module):
    """One block's learnable choice among kept-token counts c = [P, P-g, ..., > 0]."""

    def __init__(self, patches: int, protected: int, granularity: int) -> None:
        super().__init__()
        self.protected = protected
        self.register_buffer("candidates", torch.arange(patches, 0, -granularity).float())
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))

    def centre_on(self, count: int, spread: float) -> None:
        """Start the choice as a Gaussian over the candidates, `spread` tokens wide, whose
        expectation is `count` (protected tokens included; at most `count`, within float
        precision, so that the kept count starts there): near the ends of the candidates,
        which cut the Gaussian, its centre moves outwards (at the top count it would
        otherwise start tokens lower)."""
        goal = count - self.protected
        low = self.candidates.min().item() - 10 * spread
        high = self.candidates.max().item() + 10 * spread
        for _ in range(60):  # the expectation grows with the centre: bisect for the goal
            middle = (low + high) / 2
            low, high = (
                (low, middle) if self._expectation(middle, spread) > goal else (middle, high)
            )
        with torch.no_grad():
            self.logits.copy_(self._gaussian(low, spread))

    def _gaussian(self, centre: float, spread: float) -> torch.Tensor:
        """Logits of a Gaussian over the candidates around `centre`, `spread` tokens wide."""
        return -0.5 * ((self.candidates - centre) / spread) ** 2

    def _expectation(self, centre: float, spread: float) -> float:
        """The expected candidate under `_gaussian(centre, spread)`."""
        return (self.candidates @ self._gaussian(centre, spread).softmax(dim=0)).item()

    def kept(self) -> torch.Tensor:
        """ceil_STE(sum_k c_k p_k) + protected, a differentiable scalar."""
        expected = self.candidates @ self.logits.softmax(dim=0)
        return ceil_ste(expected) + self.protected

    def token_mask(self, kept: int, alive: int, tokens: int) -> torch.Tensor:
        """(tokens,) mask over importance-sorted positions: 0 for [kept, alive), 1 elsewhere
        in value; its gradient is that of the keep-probability P_i = sum_k p_k [i < c_k + p]."""
        position = torch.arange(tokens, device=self.logits.device)[:, None]
        covered = (position < (self.candidates + self.protected)[None, :]).float()
        probability = covered @ self.logits.softmax(dim=0)
        hard = torch.ones_like(probability)
        hard[kept:alive] = 0
        return hard - probability.detach() + probability


class DiffRateRates(nn.Module):
    """Prune and merge KeptCounts for every block but block 0 (never compressed) and, with
    `whole_last`, the last block (the released MAE search's, for average-pooled models)."""

    def __init__(self, geometry: Geometry, granularity: int = 4, whole_last: bool = False) -> None:
        super().__init__()
        patches = geometry.tokens - geometry.protected
        self.tokens, self.depth = geometry.tokens, geometry.depth
        self.compressed = geometry.depth - 1 - int(whole_last)  # blocks 1, 2, ... with counts
        if self.compressed < 1:
            whole = "its first and last blocks" if whole_last else "its first block"
            raise ValueError(
                f"a DiffRate search leaves {whole} whole: this {geometry.depth}-block model has "
                "no block left to search"
            )
        self.register_buffer("full", torch.tensor(float(geometry.tokens)), persistent=False)

        def counts() -> nn.ModuleList:
            return nn.ModuleList(
                KeptCount(patches, geometry.protected, granularity) for _ in range(self.compressed)
            )

        self.prune, self.merge = counts(), counts()

    def start_at(self, prune_kept: list[int], merge_kept: list[int], spread: float) -> None:
        """Centre every block's choices on these counts (those of the blocks never compressed
        are ignored)."""
        for index, counter in enumerate(self.prune):
            counter.centre_on(prune_kept[index + 1], spread)
        for index, counter in enumerate(self.merge):
            counter.centre_on(merge_kept[index + 1], spread)

    def kept(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index`'s differentiable (prune_kept, merge_kept); all tokens for a block
        never compressed (it keeps what reaches it)."""
        if index == 0 or index > self.compressed:
            return self.full, self.full
        return self.prune[index - 1].kept(), self.merge[index - 1].kept()

    def kept_lists(self) -> tuple[list[int], list[int]]:
        """The counts the rates select now, as DiffRate's inference effectively keeps them."""
        tokens, pruned, merged = self.tokens, [], []
        for index in range(self.depth):
            prune, merge = (int(v.item()) for v in self.kept(index))
            pruned.append(min(tokens, prune))
            tokens = min(pruned[-1], merge)
            merged.append(tokens)
        return pruned, merged


@dataclass(kw_only=True)
class DiffRateSearch(BlockMethod):
    """The training-time DiffRate: masks instead of removal, rates from `rates`. Used by
    tokcomp.search.diffrate; not a user-facing method name."""

    name: ClassVar[str] = "diffrate"
    needs: ClassVar[frozenset[Signal]] = frozenset({Signal.CLS_ATTN})

    rates: DiffRateRates = field(compare=False)

    def acts(self, keep: int, tokens: int) -> bool:
        return True

    def reduce(
        self, state: TokenState, signals: Signals, keep: int, position: BlockPosition
    ) -> TokenState:
        if state.mask is None:
            state = replace(state, mask=state.x.new_ones(state.x.shape[:2], dtype=torch.float32))
        state = _sort_by_importance(state, signals)
        if position.index == 0:
            return state
        prune, merge = self.rates.kept(position.index)
        alive = int(state.mask[0].sum().round().item())
        mask = state.mask
        if int(prune.item()) < alive:
            mask = mask * self.rates.prune[position.index - 1].token_mask(
                int(prune), alive, state.tokens
            )
        middle = min(alive, int(prune.item()))
        if int(merge.item()) < middle:
            counter = self.rates.merge[position.index - 1]
            state = _merge_masked(state, int(merge.item()), middle)
            mask = mask * counter.token_mask(int(merge.item()), middle, state.tokens)
        return TokenState(state.x, state.protected, state.size, state.source, mask)


def _sort_by_importance(state: TokenState, signals: Signals) -> TokenState:
    protected = state.protected
    index = rank_by_score(signals.cls_attn.mean(dim=1)[:, protected:], protected)
    source = None if state.source is None else gather_rows(state.source, index)
    return TokenState(
        gather_rows(state.x, index),
        protected,
        gather_rows(state.sizes(), index),
        source,
        gather_rows(state.mask, index),
    )


def _merge_masked(state: TokenState, keep: int, alive: int) -> TokenState:
    """Training-time merge: tokens [keep, alive) fold into their most similar of the first
    `keep` (plain mean, sizes scaled by similarity and clamped at 1) but stay in place."""
    metric = state.x[:, :alive].detach()
    similarity, match = best_match(metric[:, keep:], metric[:, :keep], 0, state.protected)
    match = match.clamp(min=state.protected)  # no finite similarity: index 0, a protected token
    sizes = state.size
    src_sizes = (sizes[:, keep:alive] * similarity).clamp_min(1)
    dst_sizes = sizes[:, :keep].scatter_add(1, match, src_sizes)
    channels = state.x.shape[-1]
    index = match[..., None].expand(-1, -1, channels)
    dst = state.x[:, :keep].scatter_reduce(1, index, state.x[:, keep:alive], reduce="mean")
    x = torch.cat([dst, state.x[:, keep:]], dim=1)
    size = torch.cat([dst_sizes, src_sizes, sizes[:, alive:]], dim=1)
    return TokenState(x, state.protected, size, state.source, state.mask)

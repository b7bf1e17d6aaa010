"""FastVID: dynamic temporal segments, then per frame the most attended tokens and per segment
density-peak anchors that absorb the rest (Shen et al., 2025; docs/methods.md section 6.13)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokcomp.methods.density_peaks import density_peak_scores, scaled_distances
from tokcomp.methods.registry import register
from tokcomp.methods.visual import (
    Selection,
    VisualGeometry,
    VisualMethod,
    VisualSignal,
    VisualTokens,
    budget_shares,
)

#: Nearest neighbours (the token itself included) of the density estimate, as released.
DENSITY_NEIGHBOURS = 4


@dataclass(frozen=True)
class SegmentPlan:
    """How many tokens a segment's frames keep: per frame its salient tokens and its anchors,
    and the anchors its anchor frames cannot hold, kept as further salient tokens."""

    salient: tuple[int, ...]
    anchors: tuple[int, ...]
    promoted: int


@register
@dataclass(kw_only=True)
class FastVID(VisualMethod):
    """Per video, `keep` tokens (a fraction of its tokens or a count), shared evenly over its
    frames (R_f each). DySeg cuts the video after the c - 1 transitions whose frames' global
    features (the mean of the frame's tokens) are least cosine-similar, and after every one below
    tau. STPrune: each frame keeps its R_f - int(R_f * d) tokens receiving the most tower
    attention; each segment's int(R_f * d) context tokens become anchors in its anchor frames
    (the last and every p-th before it), chosen among each anchor frame's other tokens by
    DPC-kNN score (k = 4); every non-salient token of the segment joins its most cosine-similar
    anchor of each anchor frame, and an anchor becomes w * anchor + (1 - w) * mean(joined),
    w = max(1 / (joined + 1), beta). Merged tokens take their anchor's place and (positions
    "keep") its position id. Defaults: the released LLaVA-OneVision run (LunarShen/FastVID
    fastvid_llavaonevision scripts/eval.sh: rho = 0.10, c = 8, tau = 0.9, d = 0.4, p = 4,
    beta = 0.6). An image is a one-frame video; families that take no videos refuse it.
    """

    name: ClassVar[str] = "fastvid"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset(
        {VisualSignal.ATTENTION, VisualSignal.FRAMES}
    )

    keep: int | float = 0.10
    segments: int = 8
    tau: float = 0.9
    context: float = 0.4
    anchor_stride: int = 4
    beta: float = 0.6
    positions: str = "keep"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.segments < 1 or self.anchor_stride < 1:
            raise ValueError(
                f"fastvid: segments (c) and anchor_stride (p) must be >= 1, got "
                f"{self.segments} and {self.anchor_stride}"
            )
        if math.isnan(self.tau):  # no transition would ever be cut
            raise ValueError(
                f"fastvid: tau is the cosine similarity of two frames below which DySeg cuts "
                f"between them (0.9 released), got {self.tau}"
            )
        for option in ("context", "beta"):
            if not 0 <= getattr(self, option) <= 1:
                raise ValueError(
                    f"fastvid: {option} must be in [0, 1], got {getattr(self, option)}"
                )

    def select(self, visual: VisualTokens, keep: int) -> Selection:
        chosen = [
            self._video(visual.outputs[row], visual.attention[row], visual.frames, keep)
            for row in range(visual.batch)
        ]
        return Selection(
            torch.stack([index for index, _ in chosen]),
            torch.stack([outputs for _, outputs in chosen]),
        )

    def _video(
        self, outputs: torch.Tensor, attention: torch.Tensor, frames: int, keep: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep,) ascending indices and their tokens for one video's (N, D) outputs."""
        per_frame = outputs.shape[0] // frames
        tokens = outputs.float().view(frames, per_frame, -1)
        scores = attention.float().view(frames, per_frame)
        sizes = dynamic_segments(tokens.mean(dim=1), self.segments, self.tau)
        budgets = budget_shares([per_frame] * frames, keep)
        kept, merged = [], outputs.new_zeros(outputs.shape)
        start = 0
        for size in sizes:
            plan = self.segment_plan(budgets[start : start + size], per_frame)
            index, values = self._segment(
                tokens[start : start + size], scores[start : start + size], plan
            )
            index = index + start * per_frame
            merged[index] = values.to(outputs.dtype)
            kept.append(index)
            start += size
        index = torch.cat(kept).sort().values
        return index, merged[index]

    def segment_plan(self, budgets: list[int], per_frame: int) -> SegmentPlan:
        """Salient tokens and anchors per frame of a segment whose frames keep `budgets`."""
        context = [int(budget * self.context) for budget in budgets]
        salient = [budget - c for budget, c in zip(budgets, context, strict=True)]
        anchor_frames = list(range(len(budgets) - 1, -1, -self.anchor_stride))
        total, count = sum(context), len(anchor_frames)
        shares = [total // count + (i < total % count) for i in range(count)]
        placed = [
            min(share, per_frame - salient[f])
            for share, f in zip(shares, anchor_frames, strict=True)
        ]
        anchors = [0] * len(budgets)
        for frame, share in zip(anchor_frames, placed, strict=True):
            anchors[frame] = share
        return SegmentPlan(tuple(salient), tuple(anchors), sum(context) - sum(placed))

    def _segment(
        self, tokens: torch.Tensor, scores: torch.Tensor, plan: SegmentPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept indices in the segment's (L, n, D) `tokens` and their (merged) values."""
        frames, per_frame, _ = tokens.shape
        flat = tokens.reshape(frames * per_frame, -1)
        salient = torch.zeros(frames, per_frame, dtype=torch.bool, device=tokens.device)
        for frame, count in enumerate(plan.salient):
            salient[frame, _most(scores[frame], count)] = True
        anchors = []
        for frame, count in enumerate(plan.anchors):
            if count:
                others = (~salient[frame]).nonzero().squeeze(1)
                best = _most(anchor_scores(tokens[frame, others]), count)
                anchors.append(others[best] + frame * per_frame)
        salient = salient.flatten()
        if plan.promoted:
            rest = (~salient).nonzero().squeeze(1)
            if anchors:
                rest = rest[~torch.isin(rest, torch.cat(anchors))]
            salient[rest[_most(scores.flatten()[rest], plan.promoted)]] = True
        members = flat[~salient]
        values = [flat[salient]] + [
            merge_into_anchors(flat[a], members, self.beta) for a in anchors
        ]
        index = torch.cat([salient.nonzero().squeeze(1), *anchors])
        order = index.argsort()
        return index[order], torch.cat(values)[order]

    def select_macs(self, geometry: VisualGeometry, tokens: int, keep: int) -> int:
        """Per frame the Gram matrix of its non-salient tokens (DPC-kNN distances), per segment
        the cosine similarity of its non-salient tokens to each anchor, counted for the fewest
        segments DySeg makes (min(c, frames), as equal as can be)."""
        frames = geometry.frames
        per_frame, width = tokens // frames, geometry.output_width
        budgets = budget_shares([per_frame] * frames, keep)
        sizes = budget_shares([frames] * min(self.segments, frames), frames)
        total, start = 0, 0
        for size in sizes:
            plan = self.segment_plan(budgets[start : start + size], per_frame)
            others = [per_frame - s for s in plan.salient]
            members = sum(others) - plan.promoted
            total += sum(m * m for m, a in zip(others, plan.anchors, strict=True) if a) * width
            total += members * sum(plan.anchors) * width
            start += size
        return total


def dynamic_segments(features: torch.Tensor, segments: int, tau: float) -> list[int]:
    """DySeg: the sizes of the runs of consecutive frames, given their (F, D) global features:
    cut after the `segments` - 1 transitions of least cosine similarity and after every one
    below `tau`."""
    frames = features.shape[0]
    if frames == 1:
        return [1]
    unit = F.normalize(features, dim=1)
    similarity = (unit[:-1] * unit[1:]).sum(dim=1)
    fewest = similarity.argsort(stable=True)[: min(segments - 1, frames - 1)]
    cuts = torch.cat([fewest, (similarity < tau).nonzero().squeeze(1)]).unique().tolist()
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in pairwise(bounds)]


def anchor_scores(tokens: torch.Tensor) -> torch.Tensor:
    """DPC-kNN score of each of the (m, D) tokens, over its DENSITY_NEIGHBOURS nearest."""
    return density_peak_scores(scaled_distances(tokens), DENSITY_NEIGHBOURS)[1]


def merge_into_anchors(anchors: torch.Tensor, members: torch.Tensor, beta: float) -> torch.Tensor:
    """(A, D) anchors after each of the (M, D) members joined its most cosine-similar one: w *
    anchor + (1 - w) * mean(joined), w = max(1 / (joined + 1), beta)."""
    similarity = F.normalize(members, dim=1) @ F.normalize(anchors, dim=1).T
    nearest = similarity.argmax(dim=1)
    counts = torch.bincount(nearest, minlength=len(anchors)).to(anchors.dtype)[:, None]
    sums = anchors.new_zeros(anchors.shape).index_add_(0, nearest, members)
    means = sums / counts.clamp_min(1)
    weight = (1 / (counts + 1)).clamp_min(beta)
    return torch.where(counts > 0, anchors + (1 - weight) * (means - anchors), anchors)


def _most(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` highest `scores` (ties: the earlier)."""
    return scores.argsort(descending=True, stable=True)[:count]

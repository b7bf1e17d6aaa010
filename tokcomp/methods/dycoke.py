"""DyCoke's token temporal merging (TTM): in a video, drop the tokens of some frames that repeat
the same position of an earlier frame, before the language model (Tao et al., "DyCoke: Dynamic
Compression of Tokens for Fast Video Large Language Models", CVPR 2025; docs/methods.md 6.12)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualMethod, VisualSignal, VisualTokens


def pruned_frames(frames: int) -> list[tuple[int, int]]:
    """(pruned frame, frame it is compared with) of a video of `frames` frames, as
    KD-TAO/DyCoke llava_arch.py `dycole_ttm` pairs them: each odd frame against the frame before
    it, then in each window of four frames but the one starting at frames - 4 (and later), the
    window's third frame against its first (replacing the third frame's whole tokens)."""
    pairs = [(first + 1, first) for first in range(0, frames - 1, 2)]
    return pairs + [(first + 2, first) for first in range(0, frames - 4, 4)]


def merged_kept(tokens: int, frames: int, k: float) -> int:
    """Tokens DyCoke keeps of a video of `tokens` tokens over `frames` frames: a pruned frame
    keeps int((1 - k) * tokens per frame) of them, the others all."""
    per_frame = tokens // frames
    dropped = per_frame - int((1 - k) * per_frame)
    return tokens - len(pruned_frames(frames)) * dropped


def ttm_index(outputs: torch.Tensor, frames: int, k: float) -> torch.Tensor:
    """(B, kept) ascending indices of the tokens TTM keeps of (B, frames x T, D) frame-major
    `outputs`: every token of an unpruned frame, and in a pruned frame the int((1 - k) * T)
    least cosine-similar to the same position of the frame it is compared with."""
    batch, tokens, _ = outputs.shape
    per_frame = tokens // frames
    by_frame = outputs.view(batch, frames, per_frame, -1)
    kept = torch.ones(batch, frames, per_frame, dtype=torch.bool, device=outputs.device)
    keep = int((1 - k) * per_frame)
    for pruned, compared in pruned_frames(frames):
        similarity = F.cosine_similarity(by_frame[:, pruned], by_frame[:, compared], dim=-1)
        least = similarity.argsort(dim=1, stable=True)[:, :keep]
        kept[:, pruned] = False
        kept[:, pruned].scatter_(1, least, True)
    return kept.view(batch, tokens).nonzero()[:, 1].view(batch, -1)


@register
@dataclass(kw_only=True)
class DyCoke(VisualMethod):
    """DyCoke's TTM: per video, each odd frame keeps its int((1 - k) * T) tokens least cosine
    similar (per position, on the projector outputs) to the frame before it, and in every window
    of four frames the third keeps as many of its tokens least similar to the first (KD-TAO/DyCoke
    llava_arch.py `dycole_ttm`); k = 0.7, the released lmms-eval default (`dycoke_k`). Kept
    tokens stay in frame and raster order; images (one frame) are kept whole, with a warning."""

    name: ClassVar[str] = "dycoke"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset({VisualSignal.FRAMES})
    budget: ClassVar[str] = "k"

    k: float = 0.7

    def check_budget(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not 0 <= self.k <= 1:
            raise ValueError(
                f"dycoke: k is the share of a pruned frame's tokens merged away, in [0, 1] "
                f"(0.7 in the paper), got {self.k!r}"
            )

    def check_visual_options(self) -> None:
        if self.target_macs is not None:
            raise ValueError(
                "dycoke: give k instead of target_macs: tokcomp prices a budget on its reference "
                "image, where DyCoke merges nothing (tokcomp.config_of(model, frames=N) gives "
                "the MACs of k on an N-frame video)"
            )

    def kept_of(self, tokens: int, frames: int = 1) -> int:
        return merged_kept(tokens, frames, self.k)

    def select(self, visual: VisualTokens, keep: int) -> torch.Tensor:
        if visual.frames == 1:
            warnings.warn(
                "dycoke merges the frames of videos: images (one frame) keep all their visual "
                "tokens; to prune images use an image method (e.g. divprune or fastv)",
                UserWarning,
                stacklevel=2,
            )
        return ttm_index(visual.outputs, visual.frames, self.k)

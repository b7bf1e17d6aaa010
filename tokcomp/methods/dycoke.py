"""DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
Models", CVPR 2025; docs/methods.md 6.12): token temporal merging (TTM) drops, before the language
model, the tokens of some frames that repeat the same position of an earlier frame; during
decoding, the layers from L on attend only to the video tokens the new token attends to most,
re-chosen whenever its attention shifts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from tokcomp.methods.registry import register
from tokcomp.methods.visual import VisualMethod, VisualSignal, VisualTokens

#: Cosine similarity of two decoding steps' attention below which DyCoke re-chooses the video
#: tokens (KD-TAO/DyCoke modeling_qwen2.py `dycoke_pruning`: `if config.similarity < 0.9`).
SHIFT_THRESHOLD = 0.9


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


def attention_shifted(
    attention: torch.Tensor, previous: torch.Tensor, video: torch.Tensor
) -> torch.Tensor:
    """(B,) whether each sample's (B, P) `attention` over its `video` tokens moved away from the
    previous step's: their cosine similarity is below SHIFT_THRESHOLD."""
    similarity = F.cosine_similarity(attention * video, previous * video, dim=1)
    return similarity < SHIFT_THRESHOLD


def most_attended_video(attention: torch.Tensor, video: torch.Tensor, p: float) -> torch.Tensor:
    """(B, P) bool: every position that is not a `video` token, and of each sample's n video
    tokens the int(n (1 - p)) with the most `attention` (ties: the earlier token)."""
    keep = (video.sum(dim=1).double() * (1 - p)).floor()  # int(n (1 - p)), in float64 as Python
    order = attention.masked_fill(~video, -torch.inf).argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return ~video | (rank < keep[:, None])


@register
@dataclass(kw_only=True)
class DyCoke(VisualMethod):
    """DyCoke's TTM: per video, each odd frame keeps its int((1 - k) * T) tokens least cosine
    similar (per position, on the projector outputs) to the frame before it, and in every window
    of four frames the third keeps as many of its tokens least similar to the first (KD-TAO/DyCoke
    llava_arch.py `dycole_ttm`); k = 0.7, the released lmms-eval default (`dycoke_k`). Kept
    tokens stay in frame and raster order; images (one frame) are kept whole, with a warning.

    During decoding (decode_p > 0), each step's layers from `decode_layer` (L = 3) attend to
    every non-video token of the cache and to the int(n (1 - decode_p)) video tokens the new
    token attends to most in layer L - 1, chosen at the first step and again whenever that
    attention's cosine similarity to the previous step's falls below 0.9 (KD-TAO/DyCoke
    modeling_qwen2.py `PrunableDynamicCache.dycoke_pruning`, `Qwen2Model.forward`); decode_p =
    0.8, the released lmms-eval default (`dycoke_p`); decode_p = 0 turns it off. A step whose
    attention did not shift keeps the last chosen tokens (decode_reuse, the paper's rule) or,
    with decode_reuse=False, attends to the whole cache (the released code's)."""

    name: ClassVar[str] = "dycoke"
    visual_needs: ClassVar[frozenset[VisualSignal]] = frozenset({VisualSignal.FRAMES})
    budget: ClassVar[str] = "k"
    takes_target_macs: ClassVar[bool] = False

    k: float = 0.7
    decode_layer: int = 3
    decode_p: float = 0.8
    decode_reuse: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decode_layer < 1:
            raise ValueError(
                f"dycoke: decode_layer is the first layer that skips video tokens while "
                f"decoding, chosen by the attention of the layer before it: >= 1 (3 released), "
                f"got {self.decode_layer}"
            )
        p = self.decode_p
        if not 0 <= p <= 1:
            raise ValueError(
                f"dycoke: decode_p is the share of the video tokens each decoding step skips "
                f"from decode_layer on, in [0, 1] (0.8 released; 0 turns it off), got {p!r}"
            )

    def check_budget(self) -> None:
        if not 0 <= self.k <= 1:
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

    def decode_boundary(self) -> int | None:
        return self.decode_layer if self.decode_p > 0 else None

    def decode_kept(
        self,
        attention: torch.Tensor,
        video: torch.Tensor,
        previous: torch.Tensor | None,
        kept: torch.Tensor | None,
    ) -> torch.Tensor:
        chosen = most_attended_video(attention, video, self.decode_p)
        if previous is None or kept is None:  # the first decoding step
            return chosen
        stays = kept if self.decode_reuse else torch.ones_like(kept)
        return torch.where(attention_shifted(attention, previous, video)[:, None], chosen, stays)

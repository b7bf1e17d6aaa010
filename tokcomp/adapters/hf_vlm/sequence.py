"""The prompt of a prefill and its surgery, independent of the model family: drop the pruned
visual tokens and re-pack every sample, padded on the side the caller padded it (left unless
the prompt is right-padded), and number the positions of what is kept ("keep": original ids;
"renumber": contiguous, with multimodal RoPE's image extents)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tokcomp.ops import gather_rows


@dataclass(frozen=True)
class Prompt:
    """The whole prompt of a prefill: embeddings (B, L, D), image placeholders and real tokens
    (B, L), original positions (R, B, L) and the caller's 2-D mask (or None); `bidirectional`:
    each image's tokens attend to each other in both directions (Gemma 3); `injected`: (B, L,
    k, D) what the first k decoder layers' outputs receive, zeros off the visual tokens
    (Qwen3-VL's deepstack), or None."""

    embeds: torch.Tensor
    placeholder: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor | None
    bidirectional: bool = False
    injected: torch.Tensor | None = None

    @property
    def text(self) -> torch.Tensor:
        """(B, L) the real tokens that are not image placeholders."""
        return self.valid & ~self.placeholder

    def filled(self, tokens: torch.Tensor, injected: torch.Tensor | None = None) -> Prompt:
        """The placeholders filled with (T, D) visual tokens, in row-major order, and with the
        (T, k, D) features injected after the first k layers, if any."""
        embeds = self.embeds.masked_scatter(
            self.placeholder[..., None], tokens.to(self.embeds.dtype)
        )
        if injected is not None:
            rows = injected.new_zeros(*self.placeholder.shape, *injected.shape[1:])
            rows[self.placeholder] = injected
            injected = rows
        return replace(self, embeds=embeds, injected=injected)

    def image_blocks(self) -> torch.Tensor | None:
        """(B, L) the index of the image run each placeholder is in (-1 elsewhere), the blocks
        that attend in both directions; None for a causal prompt."""
        if not self.bidirectional:
            return None
        previous = F.pad(self.placeholder, (1, 0))[:, :-1]
        runs = (self.placeholder & ~previous).long().cumsum(dim=1) - 1
        return runs.masked_fill(~self.placeholder, -1)

    def with_embeds(self, embeds: torch.Tensor) -> Prompt:
        """The same prompt with other hidden states (an LLM-stage method, after layer K)."""
        return replace(self, embeds=embeds)


@dataclass(frozen=True)
class Packing:
    """Where each sample's kept tokens go: `index` (B, Lp) original positions in order, left
    padded (pads point at 0) or right padded (pads point after the sample's last kept token);
    `mask` (B, Lp) 1 for real tokens."""

    index: torch.Tensor
    mask: torch.Tensor

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (B, Lp, ...) along the sequence."""
        return gather_rows(x, self.index)

    def gather_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """(R, B, L) position rows -> (R, B, Lp)."""
        return torch.stack([self.gather(row[..., None])[..., 0] for row in positions])


def pack(keep: torch.Tensor, right: bool = False) -> Packing:
    """Left-padded (`right`: right-padded) packing of the (B, L) `keep` tokens of every
    sample. Right-padded, the pads read the tokens after each sample's last kept one, so that
    a prompt losing nothing is packed as it came, its padding included."""
    counts = keep.sum(dim=1)
    length = int(counts.max()) if keep.numel() else 0
    slot = keep.long().cumsum(dim=1) - 1
    if not right:
        slot = slot + length - counts[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    index = torch.zeros(keep.shape[0], length, dtype=torch.long, device=keep.device)
    mask = torch.zeros_like(index)
    index[rows, slot[rows, cols]] = cols
    mask[rows, slot[rows, cols]] = 1
    if right and length:
        columns = torch.arange(keep.shape[1], device=keep.device)
        last = torch.where(keep, columns, -1).amax(dim=1, keepdim=True)
        after = (last + 1 + columns[:length] - counts[:, None]).clamp(max=keep.shape[1] - 1)
        index = torch.where(mask.bool(), index, after)
    return Packing(index, mask)


def right_padded(valid: torch.Tensor) -> bool:
    """Whether the (B, L) real tokens `valid` are right-padded: every sample starts with a real
    token and some sample ends with padding."""
    return valid.shape[1] > 0 and bool(valid[:, 0].all()) and not bool(valid[:, -1].all())


def renumber_1d(positions: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous numbering: each token moves down by the pruned tokens before it. Returns the
    (R, B, L) positions and the (B,) shift of the tokens after the prompt."""
    before = pruned.long().cumsum(dim=1) - pruned.long()
    return positions - before, pruned.long().sum(dim=1)


def renumber_mrope(
    positions: torch.Tensor, placeholder: torch.Tensor, pruned: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multimodal-RoPE renumbering: kept image tokens keep their (t, h, w) coordinates relative
    to the image's start; the gap an image leaves (its original extent minus its kept extent)
    is closed for everything after it. The last three rows are the (t, h, w) rows; extents are
    measured on the h and w rows, as get_rope_index advances the text after an image or a video
    by its spatial extent (a video's time rows may run past it). A run pruned whole (a Qwen3-VL
    video frame) leaves no extent: what follows it moves down to where the run began."""
    shifts = torch.zeros_like(placeholder, dtype=torch.long)
    total = torch.zeros(placeholder.shape[0], dtype=torch.long, device=placeholder.device)
    spatial = positions[-2:]
    for row in range(placeholder.shape[0]):
        gap = 0
        for start, end in _runs(placeholder[row]):
            shifts[row, start:end] = gap
            run = spatial[:, row, start:end]
            kept = run[:, ~pruned[row, start:end]]
            gap += int(run.max() - (kept.max() if kept.numel() else run.min() - 1))
            shifts[row, end:] = gap
        total[row] = gap
    return positions - shifts, total


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-D bool tensor."""
    edges = torch.diff(F.pad(flags.long(), (1, 1))).nonzero().squeeze(1).tolist()
    return list(zip(edges[::2], edges[1::2], strict=True))

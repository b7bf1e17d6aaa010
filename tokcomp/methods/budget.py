"""Keep-ratio budgets shared by the pruning-style methods."""

from __future__ import annotations

import math
from collections.abc import Iterator

from tokcomp.methods.base import Geometry, Method

#: Keep ratios tried when resolving `target_macs` for a ratio-knob method.
RATIO_GRID = tuple(round(0.2 + 0.0025 * i, 4) for i in range(321))


def kept_count(tokens: int, ratio: float) -> int:
    """Tokens kept out of `tokens` at keep `ratio` (the rounding PiToMe and EViT use)."""
    return tokens - math.floor(tokens - tokens * ratio)


def ratio_schedule(
    geometry: Geometry, ratio: float, layers: list[int] | None = None, extra: int = 0
) -> list[int]:
    """Tokens left after each block when every block in `layers` (default: all) keeps
    `ratio` of its unprotected tokens, plus `extra` new tokens where it reduces."""
    layers = range(geometry.depth) if layers is None else layers
    tokens, schedule = geometry.tokens, []
    for index in range(geometry.depth):
        if index in layers:
            unprotected = tokens - geometry.protected
            kept = kept_count(unprotected, ratio)
            if kept < unprotected:
                tokens = geometry.protected + kept + extra
        schedule.append(tokens)
    return schedule


def ratio_candidates(method: Method, lowest: float = 0.0) -> Iterator[Method]:
    """Copies of `method` over the keep-ratio grid (its `keep_ratio` knob), from `lowest`."""
    for ratio in RATIO_GRID:
        if ratio >= lowest:
            yield method.with_options(keep_ratio=ratio, target_macs=None, schedule=None)


def check_layers(
    name: str, layers: list[int] | None, depth: int, option: str = "layers", empty_ok: bool = False
) -> None:
    """Raise ValueError unless `layers` (option `option`) are distinct block indices of a
    `depth`-block model, at least one unless `empty_ok`."""
    if layers is None:
        return
    if not layers and not empty_ok:
        raise ValueError(
            f"{name}: {option} [] reduces at no block; name at least one, or leave {option} out "
            "for the default blocks"
        )
    if any(not 0 <= i < depth for i in layers):
        raise ValueError(f"{name}: {option} {layers} must be block indices in 0..{depth - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{name}: {option} {layers} names a block twice; name each block once")


def check_ratio(name: str, ratio: float, lowest: float = 0.0, inclusive: bool = False) -> None:
    """Raise ValueError unless `ratio` is a keep ratio in (lowest, 1], or with `inclusive` in
    [lowest, 1] (a hair below `lowest`, what arithmetic leaves of it, counts as it)."""
    inside = lowest - 1e-9 <= ratio <= 1 if inclusive else lowest < ratio <= 1
    if not inside:
        interval = f"[{lowest}, 1]" if inclusive else f"({lowest}, 1]"
        raise ValueError(f"{name}: keep_ratio must be a number in {interval}, got {ratio!r}")

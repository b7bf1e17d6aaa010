"""Wall-clock probes: the device-synchronised clock, interleaved timing of contenders (a
baseline and its variants, so that a busy machine slows them alike) with paired speed-ups and
their spread, the moment the first token's logits are ready, and the duration of a language
model's prefill pass."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def now(device: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA) finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


#: A paired speed-up whose spread (interquartile range of the per-round ratios over their
#: median) is above this is flagged as too noisy to trust.
TRUSTED_SPREAD = 0.1


@dataclass(frozen=True)
class Contender:
    """One thing to time: `forward`, after `prepare` (untimed; e.g. patching the model)."""

    forward: Callable[[], Any]
    prepare: Callable[[], Any] = lambda: None


def interleaved(
    contenders: Sequence[Contender], repeats: int, device: torch.device, warmup: int = 1
) -> list[list[float]]:
    """Seconds of each contender's `repeats` timed calls, after `warmup` untimed rounds.
    Every round calls each contender once, in reverse order every other round, so that the
    load of a shared machine and its drift hit all of them alike."""
    times: list[list[float]] = [[] for _ in contenders]
    for round_ in range(warmup + repeats):
        order = list(enumerate(contenders))
        for index, contender in order if round_ % 2 == 0 else order[::-1]:
            contender.prepare()
            start = now(device)
            contender.forward()
            if round_ >= warmup:
                times[index].append(now(device) - start)
    return times


@dataclass(frozen=True)
class Speedup:
    """A variant against its baseline from interleaved rounds: the median of the per-round
    ratios (baseline seconds / variant seconds) and their spread (interquartile range over
    the median; NaN, i.e. not trusted, from a single round)."""

    ratio: float
    spread: float

    @classmethod
    def paired(cls, baseline: Sequence[float], variant: Sequence[float]) -> Speedup:
        """The speed-up of `variant` over `baseline`, timed in the same rounds (a round the
        clock read as 0 s is left out; NaN, not trusted, when none is left)."""
        rounds = zip(baseline, variant, strict=True)
        ratios = [b / v for b, v in rounds if b > 0 and v > 0]
        if not ratios:
            return cls(math.nan, math.nan)
        median = statistics.median(ratios)
        if len(ratios) < 2:
            return cls(median, math.nan)
        low, _, high = statistics.quantiles(ratios, n=4, method="inclusive")
        return cls(median, (high - low) / median)

    @property
    def trusted(self) -> bool:
        """Whether the spread is narrow enough to read the ratio."""
        return self.spread <= TRUSTED_SPREAD


class FirstToken:
    """A logits processor that records when it is first called: the first token's logits
    are ready (the prefill is done)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Pass the scores through unchanged."""
        if self.at is None:
            self.at = now(self.device)
        return scores


class PrefillTimer:
    """Wall time of the first pass through `layers` (a language model's decoder layers) while
    active: from the first layer's first call to the end of the last layer's first call."""

    def __init__(self, layers: nn.ModuleList, device: torch.device) -> None:
        self.layers, self.device = layers, device
        self.start: float | None = None
        self.seconds: float | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> PrefillTimer:
        self._hooks = [
            self.layers[0].register_forward_pre_hook(self._begin),
            self.layers[-1].register_forward_hook(self._end),
        ]
        return self

    def __exit__(self, *_: object) -> None:
        for hook in self._hooks:
            hook.remove()

    def _begin(self, *_: object) -> None:
        if self.start is None:
            self.start = now(self.device)

    def _end(self, *_: object) -> None:
        if self.seconds is None:
            self.seconds = now(self.device) - self.start

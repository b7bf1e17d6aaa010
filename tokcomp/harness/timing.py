"""Wall-clock probes for generation: the device-synchronised clock, the moment the first
token's logits are ready, and the duration of a language model's prefill pass."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


def now(device: torch.device) -> float:
    """perf_counter after the device's queued work (CUDA) finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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

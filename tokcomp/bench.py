"""Speed and memory of compressed models against the unpruned model, in the same run."""

from __future__ import annotations

import copy
import json
import statistics
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokcomp.api import apply, config_of, is_patched, macs
from tokcomp.harness.timing import now


@dataclass(frozen=True)
class Variant:
    """One row of a benchmark: a method with its options, or the unpruned model (None)."""

    label: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


BASELINE = Variant("unpruned")


def parse_variant(text: str) -> Variant:
    """'tome:r=13,prop_attn=false' -> Variant('tome r=13 prop_attn=false', 'tome', {...}).
    Values are read as JSON where they parse (numbers, lists, true/false), else as text."""
    method, _, rest = text.partition(":")
    options = dict(_parse_option(item) for item in _split_options(rest))
    label = " ".join([method, *(f"{k}={_compact(v)}" for k, v in options.items())])
    return Variant(label, method, options)


def _split_options(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item for item in [*items, current] if item]


def _parse_option(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"option {item!r} must look like key=value")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


@dataclass
class BenchRow:
    """Measured figures of one variant; ratios are against the unpruned model of the run."""

    label: str
    method: str | None
    options: dict[str, Any]
    gmacs: float
    macs_ratio: float
    selection_share: float
    images_per_s: float
    speedup: float
    latency_ms: float
    peak_memory_mb: float


@dataclass
class BenchSettings:
    """How to measure: batch, device, dtype (autocast), warm-up and timed repeats."""

    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 2
    repeats: int = 7
    threads: int | None = None


def benchmark(
    model: nn.Module,
    variants: Sequence[Variant],
    settings: BenchSettings,
    input_size: tuple[int, ...] = (3, 224, 224),
) -> list[BenchRow]:
    """Time every variant (unpruned first) on random images, interleaving the repeats so
    drift of a shared machine hits all variants alike; the median time of each counts."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    model = model.eval().to(device)
    images = torch.randn(settings.batch_size, *input_size, device=device)
    models = [_variant_model(model, v) for v in [BASELINE, *variants]]
    run = [_runner(m, images, settings) for m in models]
    for _ in range(settings.warmup):
        for forward in run:
            forward()
    times: list[list[float]] = [[] for _ in run]
    for _ in range(settings.repeats):
        for forward, measured in zip(run, times, strict=True):
            measured.append(timed(forward, device)[1])
    medians = [statistics.median(t) for t in times]
    base_macs = macs(model)
    rows = []
    for variant, compressed, seconds, forward in zip(
        [BASELINE, *variants], models, medians, run, strict=True
    ):
        config = config_of(compressed) if is_patched(compressed) else None
        variant_macs = base_macs if config is None else config.macs
        rows.append(
            BenchRow(
                label=variant.label,
                method=variant.method,
                options=variant.options,
                gmacs=variant_macs / 1e9,
                macs_ratio=variant_macs / base_macs,
                selection_share=0.0 if config is None else config.selection_share,
                images_per_s=settings.batch_size / seconds,
                speedup=medians[0] / seconds,
                latency_ms=seconds * 1e3,
                peak_memory_mb=peak_memory(forward, device) / 2**20,
            )
        )
    return rows


def _variant_model(model: nn.Module, variant: Variant) -> nn.Module:
    if variant.method is None:
        return model
    return apply(copy.deepcopy(model), variant.method, **variant.options)


def _runner(model: nn.Module, images: torch.Tensor, settings: BenchSettings) -> Callable[[], Any]:
    dtype = getattr(torch, settings.dtype)
    autocast = dtype != torch.float32

    def forward() -> Any:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype, enabled=autocast):
            return model(images)

    return forward


def timed(forward: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """forward()'s result and its wall time in seconds (device work included)."""
    start = now(device)
    outputs = forward()
    return outputs, now(device) - start


def peak_memory(forward: Callable[[], Any], device: torch.device | str = "cpu") -> int:
    """Peak bytes of tensors allocated during one call of `forward` (beyond what existed)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _LiveTensorBytes() as tracker:
        forward()
    return tracker.peak


class _LiveTensorBytes(TorchDispatchMode):
    """Tracks the bytes of storages created under it that are still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._watched: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                self._watch(value.untyped_storage())
        return out

    def _watch(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._watched:
            return
        size = storage.nbytes()
        self._watched[key] = weakref.ref(storage, lambda _, k=key, n=size: self._free(k, n))
        self.live += size
        self.peak = max(self.peak, self.live)

    def _free(self, key: int, size: int) -> None:
        self._watched.pop(key, None)
        self.live -= size


def format_table(rows: Sequence[BenchRow]) -> str:
    """The benchmark as a fixed-width text table."""
    header = (
        f"{'variant':<28}{'GMACs':>8}{'MACs':>8}{'sel %':>7}{'img/s':>10}{'speed-up':>10}"
        f"{'ms/batch':>10}{'peak MB':>9}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.label:<28}{row.gmacs:>8.2f}{row.macs_ratio:>8.3f}"
            f"{100 * row.selection_share:>7.1f}{row.images_per_s:>10.1f}"
            f"{row.speedup:>9.2f}x{row.latency_ms:>10.1f}{row.peak_memory_mb:>9.1f}"
        )
    return "\n".join(lines)


def rows_to_json(rows: Sequence[BenchRow], settings: BenchSettings, **context: Any) -> str:
    """The benchmark as JSON: settings, context (model, threads...) and one object per row."""
    return json.dumps(
        {"settings": asdict(settings), **context, "rows": [asdict(r) for r in rows]}, indent=2
    )

"""Speed and memory of compressed models against the unpruned model, in the same run."""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import math
import statistics
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch._inductor.config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tokcomp.api import apply, config_of, is_patched, macs
from tokcomp.harness.timing import TRUSTED_SPREAD, Contender, Speedup, interleaved, now


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
    if not method.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} names no method: write method:key=value,... (e.g. tome:r=13)"
        )
    items = [_parse_option(item) for item in _split_options(rest)]
    options = dict(items)
    if len(options) < len(items):
        counts = collections.Counter(key for key, _ in items)
        repeated = sorted(key for key, count in counts.items() if count > 1)
        # argparse shows this message (it hides a ValueError's)
        raise argparse.ArgumentTypeError(f"option {', '.join(repeated)} is given twice in {text!r}")
    label = " ".join([method, *(f"{k}={_compact(v)}" for k, v in options.items())])
    return Variant(label, method, options)


#: Option values written as in Python, read as their JSON spellings (true, false, null) are.
PYTHON_CONSTANTS = {"True": True, "False": False, "None": None}


def _split_options(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1, "{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    return [item for item in [*items, current] if item]


def _parse_option(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep:
        # argparse shows this message (it hides a ValueError's)
        raise argparse.ArgumentTypeError(f"option {item!r} must look like key=value")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), PYTHON_CONSTANTS.get(value.strip(), value)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if not isinstance(value, str) else value


@dataclass
class BenchRow:
    """Measured figures of one variant. speedup: the median over the interleaved rounds of
    the unpruned model's time over this variant's, speedup_spread: the interquartile range
    of those ratios over their median (too wide: not `trusted`); images_per_s and
    latency_ms: from the variant's median time; peak_memory_mb: of the eager model;
    compile_gain (compiled runs only): the median over the rounds of the eager model's time
    over the compiled one's, compile_gain_spread: the spread of those ratios."""

    label: str
    method: str | None
    options: dict[str, Any]
    gmacs: float
    macs_ratio: float
    selection_share: float
    images_per_s: float
    speedup: float
    speedup_spread: float
    latency_ms: float
    peak_memory_mb: float = 0.0
    compile_gain: float | None = None
    compile_gain_spread: float | None = None

    @property
    def trusted(self) -> bool:
        """Whether the speed-up's spread is narrow enough to read it."""
        return Speedup(self.speedup, self.speedup_spread).trusted

    @property
    def gain_trusted(self) -> bool:
        """Whether the compiled model's gain over eager (if measured) is narrow enough to read."""
        if self.compile_gain is None:
            return True
        spread = math.nan if self.compile_gain_spread is None else self.compile_gain_spread
        return Speedup(self.compile_gain, spread).trusted


@dataclass
class BenchSettings:
    """How to measure: batch, device, dtype (autocast), warm-up and timed repeats, threads
    (torch's intra-op threads while benchmarking, restored after), and whether every model
    (the unpruned one too) runs under torch.compile."""

    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    warmup: int = 2
    repeats: int = 7
    threads: int | None = None
    compile: bool = False


def benchmark(
    model: nn.Module,
    variants: Sequence[Variant],
    settings: BenchSettings,
    input_size: tuple[int, ...] | None = None,
) -> list[BenchRow]:
    """Time every variant (unpruned first) on random images (of `input_size`, default the
    model's own: `input_size_of`) in interleaved rounds, so that
    the load of a shared machine hits all variants alike: speed-ups are paired per round.
    With `settings.compile` every model runs compiled and eagerly in the same rounds: the
    speed-ups are compiled against the compiled unpruned model, `compile_gain` each model's
    compiled speed over its eager speed. Compiled runs need a warm-up round (their first call
    compiles)."""
    if settings.compile and settings.warmup < 1:
        raise ValueError(
            "compiled runs need at least one warm-up round: the first call of each compiled "
            "model compiles it, which would be timed as a round"
        )
    with _threads(settings.threads):
        return _measured(model, variants, settings, input_size or input_size_of(model))


def input_size_of(model: nn.Module) -> tuple[int, ...]:
    """The (C, H, W) of the images `model` takes: a timm ViT's patch embedding's (what it was
    built for; its `pretrained_cfg` keeps the checkpoint's size when img_size was overridden),
    else its `pretrained_cfg` input_size, else 3 x 224 x 224."""
    embed = getattr(model, "patch_embed", None)
    if getattr(embed, "img_size", None) is not None:
        return (embed.proj.in_channels, *embed.img_size)
    return tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))


@contextlib.contextmanager
def _threads(count: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to `count` (None: left as is), restored on exit."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measured(
    model: nn.Module,
    variants: Sequence[Variant],
    settings: BenchSettings,
    input_size: tuple[int, ...],
) -> list[BenchRow]:
    """`benchmark`'s rows (its thread count already set)."""
    device = torch.device(settings.device)
    model = model.eval().to(device)
    # a generator of its own: benchmarking leaves the caller's global RNG stream as it was
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(settings.batch_size, *input_size, generator=generator).to(device)
    models = [variant_model(model, v) for v in [BASELINE, *variants]]
    eager = [runner(m, images, settings.dtype) for m in models]
    runs = list(eager)
    if settings.compile:
        torch._dynamo.reset()  # the compiled code of earlier models counts towards the limit
        runs += [runner(compiled(m), images, settings.dtype) for m in models]
    with torch._dynamo.config.patch(recompile_limit=max(8, 2 * len(models))):
        times = interleaved([Contender(r) for r in runs], settings.repeats, device, settings.warmup)
    measured = times[-len(models) :]  # the compiled runs where there are some
    base_macs = macs(model)
    rows = []
    for index, (variant, compressed) in enumerate(zip([BASELINE, *variants], models, strict=True)):
        row = _row(variant, compressed, base_macs, measured[0], measured[index], settings)
        row.peak_memory_mb = peak_memory(eager[index], device) / 2**20
        if settings.compile:
            gain = Speedup.paired(times[index], measured[index])
            row.compile_gain, row.compile_gain_spread = gain.ratio, gain.spread
        rows.append(row)
    return rows


def _row(
    variant: Variant,
    compressed: nn.Module,
    base_macs: int,
    base_seconds: Sequence[float],
    seconds: Sequence[float],
    settings: BenchSettings,
) -> BenchRow:
    """The figures of one variant from its timed rounds and the unpruned model's."""
    config = config_of(compressed) if is_patched(compressed) else None
    variant_macs = base_macs if config is None else config.macs
    speedup = Speedup.paired(base_seconds, seconds)
    median = statistics.median(seconds)
    return BenchRow(
        label=variant.label,
        method=variant.method,
        options=variant.options,
        gmacs=variant_macs / 1e9,
        macs_ratio=variant_macs / base_macs,
        selection_share=0.0 if config is None else config.selection_share,
        images_per_s=settings.batch_size / median if median > 0 else math.inf,
        speedup=speedup.ratio,
        speedup_spread=speedup.spread,
        latency_ms=median * 1e3,
    )


def compiled(model: nn.Module, cpp_wrapper: bool = True) -> nn.Module:
    """`model` under torch.compile (inductor), static shapes: a patched model compiles in one
    graph for every block method (no graph break), the unpruned model the same way. On the CPU
    it compiles with inductor's CPU inference settings (CPU_INFERENCE_SETTINGS), or with the
    Python wrapper instead of the C++ one where `cpp_wrapper` is False (the profiler sees into
    the Python one only: under the C++ one the linear layers and the attention are not
    recorded as ops of their own). Compile each setting on a model of its own: dynamo reuses
    a model's compiled code whatever the inductor settings."""
    graph = torch.compile(model, dynamic=False)
    settings = {**CPU_INFERENCE_SETTINGS, "cpp_wrapper": cpp_wrapper} if _on_cpu(model) else {}
    return CompiledModel(graph, settings)


#: Inductor's settings for CPU inference. freezing: the weights become graph constants (linear
#: layers run on prepacked oneDNN copies), so they must not change after the first call.
#: cpp_wrapper: the graph's kernels are called from generated C++, not Python (docs/methods.md
#: section 8.1).
CPU_INFERENCE_SETTINGS = {"freezing": True, "cpp_wrapper": True}


class CompiledModel(nn.Module):
    """A compiled module that compiles and runs under inductor `settings` (on the CPU those of
    CPU_INFERENCE_SETTINGS: they must be on while dynamo traces, not only in the backend, which
    is why every call, the first one compiling, runs under them), and that raises where dynamo
    would run it eagerly for having compiled its forward too often (every compiled instance of
    one class counts, freezing guarding on each one's weights): a benchmark never times an
    eager model as a compiled one."""

    def __init__(self, graph: nn.Module, settings: dict[str, Any]) -> None:
        super().__init__()
        self.graph = graph
        self.settings = settings

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with (
            torch._inductor.config.patch(self.settings),
            torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
        ):
            return self.graph(*args, **kwargs)


def _on_cpu(model: nn.Module) -> bool:
    """Whether `model`'s parameters (if any) live on the CPU."""
    parameter = next(model.parameters(), None)
    return parameter is None or parameter.device.type == "cpu"


def variant_model(model: nn.Module, variant: Variant) -> nn.Module:
    """`model` itself for the unpruned variant, else a compressed copy of it."""
    if is_patched(model):
        raise ValueError(
            "benchmark the unpruned model (tokcomp.remove(model) first): its variants are "
            "compressed copies, each timed against it"
        )
    if variant.method is None:
        return model
    return apply(copy.deepcopy(model), variant.method, **variant.options)


def runner(model: nn.Module, images: torch.Tensor, dtype_name: str) -> Callable[[], Any]:
    """A no-argument call of `model` on `images` in inference mode, under autocast to
    `dtype_name` unless that is float32."""
    dtype = getattr(torch, dtype_name)
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
    """Peak bytes of tensors allocated during one call of `forward` (beyond what existed). On
    CUDA after an untimed call: a process's first products allocate cuBLAS's workspace, which
    stays, and would count in the first model probed only."""
    device = torch.device(device)
    if device.type == "cuda":
        forward()
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
    """Tracks the bytes of storages created under it that are still alive, and their peak. An
    op's output that shares the storage of one of its inputs (a view, an in-place op) did not
    allocate it: one that existed before (the inputs, the weights) is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._watched: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {
            id(value.untyped_storage())
            for value in tree_flatten((args, kwargs))[0]
            if isinstance(value, torch.Tensor)
        }
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                storage = value.untyped_storage()
                if id(storage) not in given:
                    self._watch(storage)
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


#: The table's footnote for a flagged speed-up.
UNTRUSTED_NOTE = (
    f"? = the per-round speed-ups spread over more than {TRUSTED_SPREAD:.0%} of their median "
    "(interquartile range), or one round gave no spread: too noisy to trust; rerun with more "
    "repeats or on a quieter machine"
)


def format_table(rows: Sequence[BenchRow]) -> str:
    """The benchmark as a fixed-width text table (compiled runs: their gain over eager too)."""
    gains = any(row.compile_gain is not None for row in rows)
    header = (
        f"{'variant':<28}{'GMACs':>8}{'MACs':>8}{'sel %':>7}{'img/s':>10}{'speed-up':>10}"
        f"{'spread %':>9}{'ms/batch':>10}{'peak MB':>9}" + f"{'vs eager':>10}" * gains
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.label:<28}{row.gmacs:>8.2f}{row.macs_ratio:>8.3f}"
            f"{100 * row.selection_share:>7.1f}{row.images_per_s:>10.1f}"
            f"{row.speedup:>9.2f}{'x' if row.trusted else '?'}{100 * row.speedup_spread:>9.1f}"
            f"{row.latency_ms:>10.1f}{row.peak_memory_mb:>9.1f}"
            + (f"{row.compile_gain:>9.2f}{'x' if row.gain_trusted else '?'}" if gains else "")
        )
    if not all(row.trusted and row.gain_trusted for row in rows):
        lines.append(UNTRUSTED_NOTE)
    return "\n".join(lines)


def rows_to_json(rows: Sequence[BenchRow], settings: BenchSettings, **context: Any) -> str:
    """The benchmark as JSON: settings, context (model, threads...) and one object per row."""
    return json.dumps(
        {"settings": asdict(settings), **context, "rows": [asdict(r) for r in rows]}, indent=2
    )

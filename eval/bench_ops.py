"""Benchmark tokcomp's compiled ops (torch.ops.tokcomp.*) against their PyTorch references.

Cases: best_match alone, weighted_merge alone, "match+argsort+merge" (best_match on the even
and odd tokens with the class token protected, an argsort of the scores, weighted_merge of a
precomputed ToMe plan) and the full ToMe step (bipartite_plan + weighted_merge, weight =
size); at B=32, N=197, C in {64, 384}, r in {13, 98}, and at B=1, N=577. Both sides run in
the same process, alternating, after a warm-up; the table gives medians and speed-ups.

    python eval/bench_ops.py                    # CPU, torch's default thread count
    python eval/bench_ops.py --threads 1 --json results/bench_ops_cpu1.json
    python eval/bench_ops.py --device cuda --check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch

from tokcomp.ops import bipartite
from tokcomp.ops.bipartite import bipartite_plan
from tokcomp.ops.match import best_match_reference
from tokcomp.ops.merge import weighted_merge_reference

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Timing:
    """Milliseconds per call of one function: wall-clock median and minimum, and the median
    of the process CPU time (all threads), which time spent preempted does not inflate."""

    median_ms: float
    min_ms: float
    cpu_median_ms: float
    page_faults: float  # minor page faults per call (fresh memory the allocator maps in)


@dataclass
class Row:
    """One benchmark line; speed-ups are reference / compiled."""

    case: str
    batch: int
    tokens: int
    channels: int
    r: int | None
    reference: Timing
    compiled: Timing
    speedup: float
    cpu_speedup: float
    max_abs_diff: float | None = None


def compiled_match(a: torch.Tensor, b: torch.Tensor, a_protected: int, b_protected: int) -> Pair:
    """The compiled best_match op, called directly on the strided views x[:, ::2], x[:, 1::2]
    (the CPU kernel reads strided rows in place; tokcomp.ops.best_match still copies them)."""
    return torch.ops.tokcomp.best_match(a, b, a_protected, b_protected)


def compiled_merge(x, weight, size, keep_idx, src_idx, dst_pos) -> Pair:
    """The compiled weighted_merge as the public wrapper calls it."""
    return torch.ops.tokcomp.weighted_merge(x, weight, size, keep_idx, src_idx, dst_pos)


def tome_step(x: torch.Tensor, size: torch.Tensor, r: int, match: Callable, merge: Callable):
    """One ToMe step (bipartite_plan with class token protected, size-weighted merge), with
    the given best_match and weighted_merge implementations."""
    with mock.patch.object(bipartite, "best_match", match):
        plan = bipartite_plan(x, 1, r)
    return merge(x, size, size, *plan)


def match_argsort_merge(x, size, plan, match: Callable, merge: Callable) -> Pair:
    """best_match + argsort of its scores + weighted_merge of a precomputed plan."""
    score, _ = match(x[:, ::2], x[:, 1::2], 1, 0)
    score.argsort(dim=1, descending=True)
    return merge(x, size, size, *plan)


def _minor_faults() -> int:
    if resource is None:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(
    reference: Callable[[], object],
    compiled: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
    inner: int,
) -> tuple[Timing, Timing]:
    """Time both functions, alternating, after `warmup` calls of each."""
    for _ in range(warmup):
        reference()
        compiled()
    _sync(device)
    wall: dict[str, list[float]] = {"reference": [], "compiled": []}
    cpu: dict[str, list[float]] = {"reference": [], "compiled": []}
    faults: dict[str, int] = {"reference": 0, "compiled": 0}
    for _ in range(repeats):
        for name, fn in (("reference", reference), ("compiled", compiled)):
            _sync(device)
            start_faults = _minor_faults()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            _sync(device)
            wall[name].append((time.perf_counter() - start) * 1e3 / inner)
            cpu[name].append((time.process_time() - start_cpu) * 1e3 / inner)
            faults[name] += _minor_faults() - start_faults
    timings = (
        Timing(
            statistics.median(wall[k]),
            min(wall[k]),
            statistics.median(cpu[k]),
            faults[k] / (repeats * inner),
        )
        for k in ("reference", "compiled")
    )
    return tuple(timings)


def _max_diff(got: object, want: object) -> float:
    """Largest absolute difference of the floating outputs (scores, merged tokens, sizes)."""
    diff = 0.0
    for g, w in zip(got, want, strict=True):
        if g.is_floating_point():
            finite = torch.isfinite(w)
            diff = max(diff, (g.float() - w.float())[finite].abs().max().item())
    return diff


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    inner = args.inner or (20 if device.type == "cuda" else 1)
    shapes = args.shape or [(32, 197, 64), (32, 197, 384), (1, 577, 64), (1, 577, 384)]
    rows: list[Row] = []
    generator = torch.Generator().manual_seed(0)

    def add(case, shape, r, ref_fn, cpp_fn) -> None:
        ref, cpp = time_pair(ref_fn, cpp_fn, device, args.warmup, args.repeats, inner)
        diff = _max_diff(cpp_fn(), ref_fn()) if args.check else None
        speedup = ref.median_ms / cpp.median_ms
        cpu_speedup = ref.cpu_median_ms / max(cpp.cpu_median_ms, 1e-9)
        rows.append(Row(case, *shape, r, ref, cpp, speedup, cpu_speedup, diff))
        print(_format_row(rows[-1]), flush=True)

    print(_header(), flush=True)
    for shape in shapes:
        batch, tokens, _ = shape
        x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        size = (torch.rand(batch, tokens, generator=generator) * 3 + 1).to(device)
        a, b = x[:, ::2], x[:, 1::2]
        add(
            "best_match",
            shape,
            None,
            lambda a=a, b=b: best_match_reference(a, b, 1, 0),
            lambda a=a, b=b: compiled_match(a, b, 1, 0),
        )
        for r in (13, 98):
            plan = tuple(t.contiguous() for t in bipartite_plan(x, 1, r))
            add(
                "weighted_merge",
                shape,
                r,
                lambda x=x, s=size, p=plan: weighted_merge_reference(x, s, s, *p),
                lambda x=x, s=size, p=plan: compiled_merge(x, s, s, *p),
            )
            add(
                "match+argsort+merge",
                shape,
                r,
                lambda x=x, s=size, p=plan: match_argsort_merge(
                    x, s, p, best_match_reference, weighted_merge_reference
                ),
                lambda x=x, s=size, p=plan: match_argsort_merge(
                    x, s, p, compiled_match, compiled_merge
                ),
            )
            add(
                "tome_step",
                shape,
                r,
                lambda x=x, s=size, r=r: tome_step(
                    x, s, r, best_match_reference, weighted_merge_reference
                ),
                lambda x=x, s=size, r=r: tome_step(x, s, r, compiled_match, compiled_merge),
            )
    return rows


def _header() -> str:
    line = (
        f"{'case':<20} {'B':>3} {'N':>4} {'C':>4} {'r':>3} "
        f"{'reference ms':>12} {'compiled ms':>12} {'speed-up':>8} {'CPU-time speed-up':>17}"
    )
    return line + "\n" + "-" * len(line)


def _format_row(row: Row) -> str:
    r = "-" if row.r is None else str(row.r)
    text = (
        f"{row.case:<20} {row.batch:>3} {row.tokens:>4} {row.channels:>4} {r:>3} "
        f"{row.reference.median_ms:>12.3f} {row.compiled.median_ms:>12.3f} {row.speedup:>7.2f}x "
        f"{row.cpu_speedup:>16.2f}x"
    )
    if row.max_abs_diff is not None:
        text += f"  (max |diff| {row.max_abs_diff:.1e})"
    return text


def _environment(args: argparse.Namespace) -> dict:
    import tokcomp._C as ext

    info = {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "extension_with_cuda": bool(ext.WITH_CUDA),
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, print the table (and write JSON if asked)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--inner", type=int, default=None, help="calls per timed sample")
    parser.add_argument(
        "--shape",
        action="append",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        help="B,N,C to run instead of the default shapes (repeatable)",
    )
    parser.add_argument("--check", action="store_true", help="also report max |diff| vs ref")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    try:
        info = _environment(args)
    except ImportError as err:
        print(f"tokcomp._C is not built ({err}); build it first (pip install -e .)")
        return 1
    if args.device == "cuda" and not info["extension_with_cuda"]:
        print("tokcomp._C was built without CUDA; rebuild with TOKCOMP_CUDA=1")
        return 1
    import tokcomp.ops._fake  # noqa: F401  (registers the fake kernels, as the dispatcher does)

    print(
        "tokcomp ops benchmark: "
        + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("warmup", "repeats"))
    )
    print(
        f"wall-clock medians of {args.repeats} alternating samples after {args.warmup} warm-up "
        "calls; last column: ratio of median process CPU times (robust to preemption on a "
        "shared machine; with several threads it also counts their waiting)\n"
    )
    with torch.inference_mode():
        rows = run(args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"environment": info, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
        )
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

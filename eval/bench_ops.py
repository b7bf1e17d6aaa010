"""Benchmark tokcomp's compiled ops against their PyTorch references.

Groups (--ops, default all):
- tome: best_match alone, weighted_merge alone, "match+argsort+merge" (best_match on the even
  and odd tokens with the class token protected, an argsort of the scores, weighted_merge of a
  precomputed ToMe plan) and the full ToMe step (bipartite_plan + weighted_merge, weight =
  size); at B=32, N=197, C in {64, 384}, and at B=1, N=577; r = 13 and the most a step
  can merge (98 at N=197).
- energy: energy_score (PiToMe) at B=32, T=196, C in {64, 384}, and B=1, T=577, C=384.
--shape B,N,C (repeatable) runs the tome and energy groups at those shapes instead.
- pagerank: attention_pagerank (Zero-TPrune) at B=32, H=6, N=197, iterations 1, 5, 30.
- maxmin: greedy_maxmin (DivPrune, ZOO-Prune) at N=576, k=64, B in {1, 4}, against both the
  plain loop reference and the fast PyTorch form the op falls back to.
- dpp: greedy_dpp (CDPruner) at B=1, N=576, k=64 and N=2880, k=320 (LLaVA-1.5 and
  LLaVA-NeXT's five crops), on the cosine similarities of features of width 4096 (LLaVA-1.5-7B's
  projected tokens), against the reference (also the op's fallback: k steps, each updating
  every row's residual). The similarity matmul is the caller's, outside both timings.
Both sides run in the same process, alternating, after a warm-up; the table gives medians and
speed-ups. --route cupy (CUDA) times torch.ops.tokcomp_cupy.* instead of torch.ops.tokcomp.*.

    python eval/bench_ops.py                    # CPU, torch's default thread count
    python eval/bench_ops.py --threads 1 --json results/bench_ops_cpu1.json
    python eval/bench_ops.py --device cuda --check [--route cupy]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import positive_ints, refusing, script_parser

from tokcomp.files import write_text_whole
from tokcomp.harness.arguments import check_new_file, non_negative_int, positive_int
from tokcomp.harness.timing import TRUSTED_SPREAD, Speedup
from tokcomp.ops import bipartite
from tokcomp.ops.bipartite import bipartite_plan, max_bipartite_merges
from tokcomp.ops.dpp import cosine_similarity_matrix, greedy_dpp_reference
from tokcomp.ops.energy import energy_score_reference
from tokcomp.ops.match import best_match_reference
from tokcomp.ops.maxmin import _greedy_maxmin_fast, cosine_distances, greedy_maxmin_reference
from tokcomp.ops.merge import weighted_merge_reference
from tokcomp.ops.pagerank import attention_pagerank_reference

Pair = tuple[torch.Tensor, torch.Tensor]
#: torch.ops.tokcomp or torch.ops.tokcomp_cupy (see _ops): the ops timed as "compiled".
OpNamespace = Any
GROUPS = ("tome", "energy", "pagerank", "maxmin", "dpp")
TOME_SHAPES = ((32, 197, 64), (32, 197, 384), (1, 577, 64), (1, 577, 384))
ENERGY_SHAPES = ((32, 196, 64), (32, 196, 384), (1, 577, 384))


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
    """One benchmark line; speed-ups are reference / compiled. max_abs_diff: of the floating
    outputs, or the number of differing entries when every output is an integer (picks)."""

    @property
    def trusted(self) -> bool:
        """Whether the speed-up's spread is narrow enough to read it."""
        return Speedup(self.speedup, self.speedup_spread).trusted

    case: str
    shape: str  # B x N x C (B x H x N for attention)
    param: str  # r=, it=, k=, margin=
    reference: Timing
    compiled: Timing
    speedup: float  # median of the per-round ratios
    speedup_spread: float  # their interquartile range over the median
    cpu_speedup: float
    max_abs_diff: float | None = None


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
) -> tuple[Timing, Timing, Speedup]:
    """Time both functions after `warmup` calls of each: `repeats` rounds of one sample each,
    the order reversed every other round (as tokcomp.harness.timing.interleaved), and the
    compiled op's speed-up as the median of the per-round ratios with their spread."""
    for _ in range(warmup):
        reference()
        compiled()
    _sync(device)
    wall: dict[str, list[float]] = {"reference": [], "compiled": []}
    cpu: dict[str, list[float]] = {"reference": [], "compiled": []}
    faults: dict[str, int] = {"reference": 0, "compiled": 0}
    pair = [("reference", reference), ("compiled", compiled)]
    for round_ in range(repeats):
        for name, fn in pair if round_ % 2 == 0 else pair[::-1]:
            _sync(device)
            start_faults = _minor_faults()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            _sync(device)
            wall[name].append((time.perf_counter() - start) * 1e3 / inner)
            cpu[name].append((time.process_time() - start_cpu) * 1e3 / inner)
            faults[name] += _minor_faults() - start_faults
    reference_timing, compiled_timing = (
        Timing(
            statistics.median(wall[k]),
            min(wall[k]),
            statistics.median(cpu[k]),
            faults[k] / (repeats * inner),
        )
        for k in ("reference", "compiled")
    )
    speedup = Speedup.paired(wall["reference"], wall["compiled"])
    return reference_timing, compiled_timing, speedup


def _max_diff(got: object, want: object) -> float:
    """Largest absolute difference of the floating outputs (scores, merged tokens, sizes), or the
    number of differing entries when all outputs are integers (greedy_maxmin's picks)."""
    got, want = (got,) if torch.is_tensor(got) else got, (want,) if torch.is_tensor(want) else want
    pairs = list(zip(got, want, strict=True))
    if not any(g.is_floating_point() for g, _ in pairs):
        return float(sum((g.cpu() != w.cpu()).sum().item() for g, w in pairs))
    diff = 0.0
    for g, w in pairs:
        if g.is_floating_point():
            finite = torch.isfinite(w)
            diff = max(diff, (g.float() - w.float())[finite].abs().max().item())
    return diff


def _ops(route: str) -> OpNamespace:
    """The op namespace timed as "compiled": torch.ops.tokcomp or torch.ops.tokcomp_cupy."""
    if route == "cupy":
        from tokcomp.ops import cupy_kernels

        if not cupy_kernels.available():
            raise SystemExit("--route cupy: cupy cannot run tokcomp's kernels here")
        return torch.ops.tokcomp_cupy
    return torch.ops.tokcomp


@dataclass
class Case:
    """One comparison to time: its row's labels and the reference and compiled calls."""

    name: str
    shape: tuple[int, ...]
    param: str
    reference: Callable[[], object]
    compiled: Callable[[], object]


class Inputs:
    """The cases' random tensors, drawn in turn from one generator seeded at 0."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.generator = torch.Generator().manual_seed(0)

    def normal(self, *shape: int) -> torch.Tensor:
        """Standard normal values in the benchmark's dtype, on its device."""
        values = torch.randn(shape, generator=self.generator)
        return values.to(device=self.device, dtype=self.dtype)

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """float32 values uniform in [low, high), on the benchmark's device."""
        values = torch.rand(shape, generator=self.generator) * (high - low) + low
        return values.to(self.device)


def tome_cases(
    ops: OpNamespace, inputs: Inputs, shapes: Iterable[tuple[int, int, int]]
) -> Iterator[Case]:
    """At each shape: best_match, then merge_cases at r = 13 and at the most a step can
    merge."""
    for shape in shapes:
        batch, tokens, _ = shape
        x = inputs.normal(*shape)
        size = inputs.uniform(batch, tokens, low=1.0, high=4.0)
        # The compiled ops are called directly, best_match on the strided views x[:, ::2] and
        # x[:, 1::2] (the CPU kernel reads strided rows in place), as tokcomp.ops calls them.
        a, b = x[:, ::2], x[:, 1::2]
        reference = partial(best_match_reference, a, b, 1, 0)
        yield Case("best_match", shape, "-", reference, partial(ops.best_match, a, b, 1, 0))
        most = max_bipartite_merges(tokens, 1)
        for r in sorted({min(13, most), most}):
            yield from merge_cases(ops, x, size, r, shape)


def merge_cases(
    ops: OpNamespace, x: torch.Tensor, size: torch.Tensor, r: int, shape: tuple[int, ...]
) -> Iterator[Case]:
    """weighted_merge of a precomputed ToMe plan merging `r`, match+argsort+merge of that
    plan, and the full ToMe step."""
    plan = tuple(t.contiguous() for t in bipartite_plan(x, 1, r))
    references = (best_match_reference, weighted_merge_reference)
    compiled = (ops.best_match, ops.weighted_merge)
    yield Case(
        "weighted_merge",
        shape,
        f"r={r}",
        partial(weighted_merge_reference, x, size, size, *plan),
        partial(ops.weighted_merge, x, size, size, *plan),
    )
    steps = {
        "match+argsort+merge": partial(match_argsort_merge, x, size, plan),
        "tome_step": partial(tome_step, x, size, r),
    }
    for name, step in steps.items():
        yield Case(name, shape, f"r={r}", partial(step, *references), partial(step, *compiled))


def energy_cases(
    ops: OpNamespace, inputs: Inputs, shapes: Iterable[tuple[int, int, int]]
) -> Iterator[Case]:
    """energy_score at margin 0.5 at each shape."""
    for shape in shapes:
        metric = inputs.normal(*shape)
        yield Case(
            "energy_score",
            shape,
            "margin=0.5",
            partial(energy_score_reference, metric, 0.5, 1.0),
            partial(ops.energy_score, metric, 0.5, 1.0),
        )


def pagerank_cases(ops: OpNamespace, inputs: Inputs) -> Iterator[Case]:
    """attention_pagerank at B=32, H=6, N=197 over 1, 5 and 30 iterations."""
    shape = (32, 6, 197)
    attn = inputs.normal(*shape, shape[-1]).float().softmax(dim=-1).to(inputs.dtype)
    for iterations in (1, 5, 30):
        yield Case(
            "attention_pagerank",
            shape,
            f"it={iterations}",
            partial(attention_pagerank_reference, attn, iterations),
            partial(ops.attention_pagerank, attn, iterations),
        )


def maxmin_cases(ops: OpNamespace, inputs: Inputs) -> Iterator[Case]:
    """greedy_maxmin at N=576, k=64, B in {1, 4}, against the loop reference and the fast
    PyTorch form."""
    tokens, k = 576, 64
    for batch in (1, 4):
        dist = cosine_distances(inputs.normal(batch, tokens, 64))
        weight = inputs.uniform(batch, tokens)
        first = weight.argmax(dim=1)
        compiled = partial(ops.greedy_maxmin, dist, weight, first, k)
        for case, reference in (
            ("greedy_maxmin/loop", greedy_maxmin_reference),
            ("greedy_maxmin/fast", _greedy_maxmin_fast),
        ):
            timed = partial(reference, dist, weight, first, k)
            yield Case(case, (batch, tokens, tokens), f"k={k}", timed, compiled)


def dpp_cases(ops: OpNamespace, inputs: Inputs) -> Iterator[Case]:
    """greedy_dpp at B=1, N=576, k=64 and N=2880, k=320 on the cosine similarities of
    features of width 4096; the reference takes them in float32."""
    for tokens, k in ((576, 64), (2880, 320)):
        similarity = cosine_similarity_matrix(inputs.normal(1, tokens, 4096)).to(inputs.dtype)
        relevance = inputs.uniform(1, tokens)
        yield Case(
            "greedy_dpp/reference",
            (1, tokens, tokens),
            f"k={k}",
            lambda s=similarity, r=relevance, k=k: greedy_dpp_reference(s.float(), r, k),
            partial(ops.greedy_dpp, similarity, relevance, k),
        )


def cases(
    groups: Collection[str],
    shapes: list[tuple[int, int, int]] | None,
    ops: OpNamespace,
    inputs: Inputs,
) -> Iterator[Case]:
    """The cases of the selected groups, in the order of GROUPS; `shapes`, when given, in
    place of the tome and energy groups' own."""
    if "tome" in groups:
        yield from tome_cases(ops, inputs, shapes or TOME_SHAPES)
    if "energy" in groups:
        yield from energy_cases(ops, inputs, shapes or ENERGY_SHAPES)
    if "pagerank" in groups:
        yield from pagerank_cases(ops, inputs)
    if "maxmin" in groups:
        yield from maxmin_cases(ops, inputs)
    if "dpp" in groups:
        yield from dpp_cases(ops, inputs)


def measure(case: Case, device: torch.device, inner: int, args: argparse.Namespace) -> Row:
    """Time one case as `args` asks (with --check, also compare its outputs): its row."""
    ref, cpp, speedup = time_pair(
        case.reference, case.compiled, device, args.warmup, args.repeats, inner
    )
    diff = _max_diff(case.compiled(), case.reference()) if args.check else None
    cpu_speedup = ref.cpu_median_ms / max(cpp.cpu_median_ms, 1e-9)
    shape = "x".join(map(str, case.shape))
    return Row(
        case.name, shape, case.param, ref, cpp, speedup.ratio, speedup.spread, cpu_speedup, diff
    )


def run(args: argparse.Namespace) -> list[Row]:
    """Time every case of the selected groups; print each row as it is measured."""
    device = torch.device(args.device)
    inner = args.inner or (20 if device.type == "cuda" else 1)
    ops = _ops(args.route)
    inputs = Inputs(device, getattr(torch, args.dtype))
    rows: list[Row] = []
    print(_header(), flush=True)
    for case in cases(args.ops, args.shape, ops, inputs):
        rows.append(measure(case, device, inner, args))
        print(_format_row(rows[-1]), flush=True)
    return rows


def _header() -> str:
    line = (
        f"{'case':<20} {'shape':>11} {'param':>10} "
        f"{'reference ms':>12} {'compiled ms':>12} {'speed-up':>8} {'spread':>7} "
        f"{'CPU-time speed-up':>17}"
    )
    return line + "\n" + "-" * len(line)


def _format_row(row: Row) -> str:
    text = (
        f"{row.case:<20} {row.shape:>11} {row.param:>10} "
        f"{row.reference.median_ms:>12.3f} {row.compiled.median_ms:>12.3f} {row.speedup:>7.2f}"
        f"{'x' if row.trusted else '?'} {row.speedup_spread:>7.1%} {row.cpu_speedup:>16.2f}x"
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
        "route": args.route,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def parse_shape(text: str) -> tuple[int, int, int]:
    """'8,197,384' -> (8, 197, 384): batch, tokens, channels, each at least 1, and at least 2
    tokens (the ToMe cases protect the first: a class token and one token to match)."""
    values = positive_ints(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"must be B,N,C (three whole numbers), got {text!r}")
    if values[1] < 2:
        raise argparse.ArgumentTypeError(
            f"N must be at least 2 (a class token and a token to match), got {text!r}"
        )
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    """The script's command line."""
    parser = script_parser(__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=non_negative_int, default=5)
    parser.add_argument("--repeats", type=positive_int, default=31)
    parser.add_argument("--inner", type=positive_int, default=None, help="calls per timed sample")
    parser.add_argument(
        "--shape",
        action="append",
        type=parse_shape,
        help="B,N,C to run the tome and energy groups at instead of their default shapes "
        "(repeatable)",
    )
    parser.add_argument("--route", default="compiled", choices=["compiled", "cupy"])
    parser.add_argument(
        "--ops", nargs="+", default=list(GROUPS), choices=GROUPS, help="groups of cases to run"
    )
    parser.add_argument("--check", action="store_true", help="also report max |diff| vs ref")
    parser.add_argument(
        "--json", type=Path, default=None, help="write the results here (overwritten)"
    )
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The options, refusing through `parser` a --shape no selected group takes and a --json
    path that cannot be written."""
    args = parser.parse_args(argv)
    if args.shape and not {"tome", "energy"} & set(args.ops):
        parser.error("--shape sets the shapes of the tome and energy groups: add one to --ops")
    if args.json is not None:
        with refusing(parser):  # a folder, or a file in a folder's place (eval/gpu_check.sh
            check_new_file(args.json, True, "--json")  # reruns overwrite their results)
    return args


def checked_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict | None:
    """The run's environment, or None after saying why the extension cannot run the ops here;
    a device or route that cannot work is refused through `parser`."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    try:
        info = _environment(args)
    except ImportError as err:
        print(f"tokcomp._C is not built ({err}); build it first (pip install -e .)")
        return None
    if args.route == "cupy" and args.device != "cuda":
        parser.error("--route cupy runs on CUDA tensors: add --device cuda")
    if args.device == "cuda" and args.route == "compiled" and not info["extension_with_cuda"]:
        print("tokcomp._C was built without CUDA; rebuild with TOKCOMP_CUDA=1 (or --route cupy)")
        return None
    return info


def print_preamble(args: argparse.Namespace, info: dict) -> None:
    """The environment, and how the table's figures were measured and are read."""
    print(
        "tokcomp ops benchmark: "
        + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("warmup", "repeats"))
    )
    print(
        f"wall-clock medians of {args.repeats} rounds after {args.warmup} warm-up calls, the "
        "order reversed every other round; speed-up: median of the per-round ratios, spread: "
        f"their interquartile range over it (? above {TRUSTED_SPREAD:.0%}: too noisy to trust); "
        "last column: ratio of median process CPU times (robust to preemption on a shared "
        "machine; with several threads it also counts their waiting)\n"
    )


def write_json(path: Path, info: dict, rows: list[Row]) -> None:
    """Write the environment and the rows to `path` (making its folder), and say so."""
    write_text_whole(
        path, json.dumps({"environment": info, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    print(f"\nwrote {path}")


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the benchmark, print the table (and write JSON if asked)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = checked_environment(parser, args)
    if info is None:
        return 1
    import tokcomp.ops._fake  # noqa: F401  (registers the fake kernels, as the dispatcher does)

    print_preamble(args, info)
    with torch.inference_mode():
        rows = run(args)
    if args.json is not None:
        write_json(args.json, info, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

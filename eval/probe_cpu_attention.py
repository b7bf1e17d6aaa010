"""Where does bfloat16 ToMe lose its speed-up on the CPU? Time PyTorch's fused attention
(scaled_dot_product_attention, the CPU flash kernel) at the token count each block of a
compressed DeiT-S attends over, in bfloat16 and float32, with and without proportional
attention's log-size mask (as a float32 and as a bfloat16 tensor), and in bfloat16 also as
tokcomp runs it: rows padded to a multiple of 16, the padding masked out as keys (and, with
--multiples, padded to other multiples, to compare).

Each token count's time is compared with the unpruned count's time scaled by (N / N0)^2, the
share of attention MACs the block keeps: a ratio above 1 is time the kernel loses at that
count. Interleaved rounds, medians (docs/methods.md section 8.1).

    python eval/probe_cpu_attention.py                                  # ToMe r=13
    python eval/probe_cpu_attention.py --method pitome --option target_macs=0.6
    python eval/probe_cpu_attention.py --tokens 197,225,257,289 --model vit_base_patch16_224
    python eval/probe_cpu_attention.py --tokens 184,257,289,385,577 --multiples 32,64
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before importing torch (bench_compile.py)

import argparse
import ast
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tokcomp
sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import method_name, positive_ints, refusing, script_parser

import tokcomp
from tokcomp.adapters.base import BFLOAT16_ATTENTION_ROWS, rounded_up
from tokcomp.harness.arguments import positive_int, timm_model
from tokcomp.harness.timing import Contender, interleaved

CPU = torch.device("cpu")


def padded_column(multiple: int) -> str:
    """The column of the bfloat16 call on rows padded to `multiple`."""
    return f"padded to {multiple}"


#: The padded call's column: what a tokcomp block runs in bfloat16 on the CPU.
PADDED = padded_column(BFLOAT16_ATTENTION_ROWS)


def attended_counts(model_name: str, method: str, options: dict) -> list[int]:
    """Tokens each block's attention sees: the input count, then the schedule shifted by one
    (a block reduces after its attention)."""
    config = tokcomp.config_of(tokcomp.apply(timm.create_model(model_name), method, **options))
    return [config.model["tokens"], *config.schedule[:-1]]


def attention_calls(
    tokens: int,
    batch: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    multiples: Sequence[int] = (),
) -> dict:
    """One fused-attention call per mask variant (none, float32, and in q's dtype where that
    differs), on q, k, v strided as timm's qkv split; in bfloat16 also the float32 mask on
    rows padded to a multiple of 16, as a tokcomp block pads them, and padded to each of the
    other `multiples` for comparison."""
    q, k, v = _split_qkv(tokens, batch, heads, head_dim, dtype)
    bias = (torch.rand(batch, tokens) * 3 + 1).log()[:, None, None, :]
    masks = {"no mask": None, "fp32 mask": bias}
    if dtype != torch.float32:
        masks[f"{str(dtype).removeprefix('torch.')} mask"] = bias.to(dtype)
    calls = {
        name: lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        for name, mask in masks.items()
    }
    if dtype == torch.bfloat16:
        for multiple in (BFLOAT16_ATTENTION_ROWS, *multiples):
            calls[padded_column(multiple)] = _padded_call(tokens, multiple, bias, heads, head_dim)
    return calls


def _padded_call(
    tokens: int, multiple: int, bias: torch.Tensor, heads: int, head_dim: int
) -> Callable[[], torch.Tensor]:
    """The bfloat16 attention call on rows padded to `multiple`, the padding masked out."""
    rows = rounded_up(tokens, multiple)
    padded = _split_qkv(rows, bias.shape[0], heads, head_dim, torch.bfloat16)
    mask = F.pad(bias, (0, rows - tokens), value=float("-inf"))
    return lambda: F.scaled_dot_product_attention(*padded, attn_mask=mask)


def _split_qkv(rows: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype) -> tuple:
    """q, k, v of `rows` tokens, strided as timm's split of one qkv projection."""
    qkv = torch.randn(batch, rows, 3, heads, head_dim, dtype=dtype).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def median_ms(calls: dict, rounds: int) -> dict:
    """Median milliseconds of each call over `rounds` rounds that each run every call once
    (one warm-up round), in reverse order every other round, so that the machine's load and a
    call's place in the round hit all calls alike."""
    with torch.inference_mode():
        times = interleaved([Contender(call) for call in calls.values()], rounds, CPU)
    medians = [statistics.median(seconds) * 1e3 for seconds in times]
    return dict(zip(calls, medians, strict=True))


def python_option(text: str) -> tuple[str, object]:
    """'target_macs=0.6' -> ('target_macs', 0.6): a method option, its value a Python
    literal."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"must look like key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the value must be a Python literal such as 0.6, 13, True or 'text'"
        ) from None


def main(argv: list[str] | None = None) -> None:
    """Print, per dtype, each block's attention time against its N^2 share."""
    parser = script_parser(__doc__)
    parser.add_argument("--model", type=timm_model, default="deit_small_patch16_224")
    parser.add_argument("--method", type=method_name("vision"), default="tome")
    parser.add_argument(
        "--option", action="append", type=python_option, default=[], help="key=value (python)"
    )
    parser.add_argument(
        "--tokens",
        type=positive_ints,
        help="token counts to time instead of the method's schedule, e.g. 197,225,257",
    )
    parser.add_argument(
        "--multiples",
        type=positive_ints,
        default=[],
        help="other row multiples to pad to beside tokcomp's 16, for comparison, e.g. 32,64",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=9)
    args = parser.parse_args(argv)
    options = dict(args.option) or ({"r": 13} if args.method == "tome" else {})
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tokens:
        counts = args.tokens
        print(f"{args.model}: the token counts asked for {counts}")
    else:
        with refusing(parser):  # the method's options, on the model, before any timing
            counts = attended_counts(args.model, args.method, options)
        print(f"{args.model} {args.method} {options}: tokens attended per block {counts}")
    attn = timm.create_model(args.model).blocks[0].attn
    for dtype in (torch.bfloat16, torch.float32):
        calls = {}
        for tokens in counts:
            shaped = attention_calls(
                tokens, args.batch_size, attn.num_heads, attn.head_dim, dtype, args.multiples
            )
            calls.update({(tokens, name): call for name, call in shaped.items()})
        ms = median_ms(calls, args.rounds)
        print_table(ms, counts, dtype, args)


def print_table(ms: dict, counts: list[int], dtype: torch.dtype, args) -> None:
    """One row per block (per count asked for); the total as the model runs it (no mask until
    the first merge)."""
    names = list(dict.fromkeys(name for _, name in ms))
    print(
        f"\n{dtype}, batch {args.batch_size}, {args.threads} threads, ms (median); N^2 ideal: "
        f"the {counts[0]}-token time without a mask x (N / {counts[0]})^2"
    )
    print(f"{'tokens':>6}" + "".join(f"{n:>15}" for n in names) + f"{'N^2 ideal':>15}")
    full = ms[counts[0], "no mask"]
    for tokens in counts:
        ideal = full * (tokens / counts[0]) ** 2
        print(
            f"{tokens:>6}" + "".join(f"{ms[tokens, n]:>15.2f}" for n in names) + f"{ideal:>15.2f}"
        )
    if args.tokens:  # counts asked for, not a model's blocks: no total as the model runs it
        return
    total = full + sum(ms[tokens, "fp32 mask"] for tokens in counts[1:])
    share = sum(t * t for t in counts) / (len(counts) * counts[0] ** 2)
    print(
        f"as run (no mask, then the float32 mask): {total:.1f} ms = "
        f"{total / (full * len(counts)):.3f} of {len(counts)} blocks at {counts[0]} tokens "
        f"without a mask; their N^2 share {share:.3f}"
    )
    if PADDED in names:
        padded = sum(ms[tokens, PADDED] for tokens in counts)
        print(
            f"as a tokcomp block runs it (padded): {padded:.1f} ms = "
            f"{padded / (full * len(counts)):.3f} of the same (the unpatched model), "
            f"{padded / (ms[counts[0], PADDED] * len(counts)):.3f} of {len(counts)} padded "
            f"blocks at {counts[0]} tokens"
        )


if __name__ == "__main__":
    main()

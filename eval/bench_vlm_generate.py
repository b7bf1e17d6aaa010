"""Batched generation throughput of visual-token pruning on the LLaVA-1.5-shaped VLM of
eval/bench_vlm.py (random weights): generated tokens per second of generate() for a batch of
requests with different prompt lengths and different images (left padding, KV cache, 32 new
tokens each, greedy, or beam search with --num-beams), unpruned against ZOO-Prune at 64 of 576
visual tokens (its default), at every batch size asked for.

Each batch size is timed in interleaved rounds after a warm-up round (tokcomp.harness.timing:
the unpruned and the pruned generate alternate, the patch applied or removed outside the
timed call), and the speed-up is the median of the per-round ratios with its spread.
Floors: at least 1.5x at batch 8, and never slower than unpruned (at least 1.0x) at any batch
size; a speed-up whose spread is too wide to trust is flagged "?" and fails the run too.

    python eval/bench_vlm_generate.py                       # batches 1,2,4,8,16
    python eval/bench_vlm_generate.py --batches 8 --rounds 2 --layers 8
    python eval/bench_vlm_generate.py --batches 1,8 --num-beams 4   # beam search
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench_encoders.py
os.environ.setdefault("TOKCOMP_VERIFY", "0")  # the kernels' first-call checks stay untimed

import sys
from pathlib import Path
from statistics import median

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import IMAGE_TOKEN, KEEP, build
from script_args import positive_ints, script_parser

import tokcomp
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.timing import Contender, Speedup, interleaved

NEW_TOKENS, HEADLINE_BATCH, HEADLINE_FLOOR = 32, 8, 1.5
#: The shortest and longest text of a request's prompt (the image's 576 tokens come on top).
PROMPT_RANGE = (20, 120)


def requests(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` requests, left padded: each a text of its own length around one image of its
    own (the image tokens after a fifth of the text, as a chat template puts them)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(*PROMPT_RANGE, (batch,), generator=generator).tolist()
    prompts = []
    for length in lengths:
        text = torch.randint(2, 30000, (length,), generator=generator)
        split = length // 5
        prompts.append(torch.cat([text[:split], torch.full((576,), IMAGE_TOKEN), text[split:]]))
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(batch, longest, dtype=torch.long)
    mask = torch.zeros(batch, longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :] = prompt
        mask[row, longest - len(prompt) :] = 1
    pixels = torch.randn(batch, 3, 336, 336, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def contenders(model: nn.Module, batch: dict[str, torch.Tensor], beams: int = 1) -> list[Contender]:
    """generate() unpruned and with ZOO-Prune at KEEP tokens, toggling the patch untimed."""

    def generate() -> torch.Tensor:
        return model.generate(
            **batch,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            num_beams=beams,
            pad_token_id=0,
        )

    def unpatch() -> None:
        if tokcomp.is_patched(model):
            tokcomp.remove(model)

    def patch() -> None:
        if not tokcomp.is_patched(model):
            tokcomp.apply(model, "zoo", keep=KEEP)

    return [Contender(generate, unpatch), Contender(generate, patch)]


def measure(
    model: nn.Module, sizes: list[int], rounds: int, dtype: torch.dtype, beams: int = 1
) -> list[tuple]:
    """Per batch size: (size, unpruned tokens/s, pruned tokens/s, speed-up)."""
    rows = []
    for size in sizes:
        batch = requests(size)
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        with torch.inference_mode():
            times = interleaved(contenders(model, batch, beams), rounds, torch.device("cpu"))
        speedup = Speedup.paired(*times)
        tokens = size * NEW_TOKENS
        rows.append((size, tokens / median(times[0]), tokens / median(times[1]), speedup))
        print(_line(*rows[-1]), flush=True)
    return rows


def _line(size: int, unpruned: float, pruned: float, speedup: Speedup) -> str:
    flag = "x" if speedup.trusted else "?"
    return (
        f"{size:>6d} {unpruned:>14.2f} {pruned:>14.2f} {speedup.ratio:>9.2f}{flag} "
        f"{100 * speedup.spread:>8.1f}"
    )


def verdict(rows: list[tuple]) -> bool:
    """Print the floors; whether all hold (and every speed-up is trusted)."""
    ok = True
    for size, _, _, speedup in rows:
        floor = HEADLINE_FLOOR if size == HEADLINE_BATCH else 1.0
        passed = speedup.ratio >= floor and speedup.trusted
        ok &= passed
        result = "ok" if passed else "MISSED"
        print(f"  batch {size}: {speedup.ratio:.2f}x, floor {floor}x -> {result}")
    return ok


def main(argv: list[str] | None = None) -> int:
    """Benchmark every batch size; 1 if a floor is missed."""
    parser = script_parser(__doc__)
    parser.add_argument(
        "--batches", type=positive_ints, default="1,2,4,8,16", help="batch sizes, comma separated"
    )
    parser.add_argument(
        "--layers", type=positive_int, default=16, help="decoder layers (LLaVA-1.5: 32)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="timed rounds per batch size"
    )
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--num-beams", type=positive_int, default=1, help="beam search with N beams (1: greedy)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build(args.layers).to(dtype)
    print(
        f"LLaVA-1.5-shaped, random weights, {args.dtype}, {args.layers} decoder layers, "
        f"{args.threads} threads; {NEW_TOKENS} new tokens per request, prompts of "
        f"{PROMPT_RANGE[0]}-{PROMPT_RANGE[1]} text tokens around one image each; ZOO-Prune keeps "
        f"{KEEP} of 576 visual tokens; "
        + (f"beam search, {args.num_beams} beams; " if args.num_beams > 1 else "greedy; ")
        + f"medians of {args.rounds} interleaved rounds after a warm-up round"
    )
    columns = ("unpruned tok/s", "pruned tok/s")
    print(f"{'batch':>6s} {columns[0]:>14s} {columns[1]:>14s} {'speed-up':>10s} {'spread %':>8s}")
    rows = measure(model, args.batches, args.rounds, dtype, args.num_beams)
    return 0 if verdict(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

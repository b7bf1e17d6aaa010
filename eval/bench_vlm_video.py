"""Every visual-token method at 10% of a video's visual tokens on a LLaVA-OneVision-shaped VLM
with random weights (speed does not depend on them): the LLM prefill (the first pass through
the decoder layers) and the time to first token (tower, the method's own selection, prefill;
generate(max_new_tokens=1)), each against the unpruned model timed in the same interleaved
rounds (eval/bench_vlm_methods.py, tokcomp.harness.timing: medians of the per-round ratios,
with their spread), next to the analytic MACs ratio, the selection's share of the MACs and
the share of the video's tokens kept (tokcomp.config_of(model, frames=N)).

The model: LLaVA-OneVision-7B's vision side (a SigLIP-so400m tower: 384 px, patch 14, 27 x 27 =
729 tokens per frame, width 1152, 16 heads, MLP 4304; 26 layers, as the released model and
transformers' LlavaOnevisionConfig keep them, its feature layer being the last of those 26;
SigLIP-so400m itself has 27), its MLP projector, and Qwen2-7B-wide decoder layers (hidden 3584,
28 heads, 4 KV heads, MLP 18944), 8 of 28 by default. The vocabulary is 4096 tokens, not
Qwen2's 152k: the LM head runs on one token, so its size does not change the measured cost,
and 152k x 3584 fp32 embeddings and head (4.4 GB) would not fit beside the rest in this
machine's 23 GB shared with other jobs. One video of 8 frames, each 2 x 2 bilinearly pooled
by the model to 14 x 14 = 196 tokens (transformers 5.24 `apply_pooling`: ceil(27 / 2)), 1568
tokens plus one newline, inside a 40-token prompt; fp32 on the CPU, 2 threads.

Budget: each method's own knob at 10% of the video's 1568 selectable tokens (`keep=0.1`,
random's `keep_ratio=0.1`, rounded as each method's released code rounds: 156); DyCoke's `k`
(the share of a pruned frame's tokens merged away) at the value whose kept share is nearest
10%: on 8 frames DyCoke prunes 5 frames (pairs 1, 3, 5, 7 and window frame 2) and keeps 3
whole, so even k = 1 keeps 3 x 196 = 588 tokens (37.5%), the share reported in its row. The
"kept" column is the share left after a method's last cut: FastV, PyramidDrop and DART run
their first layers on all tokens, and SparseVLM's keep is the per-layer average its released
budget labels name, so its last stage keeps fewer.

Amdahl bound (from config_of's MACs at 8 frames, 8 decoder layers): the tower runs on all 8 x
729 tokens whatever a method keeps. Unpruned prefill 5.81 T MACs: tower 2.57 T (44%),
projector 0.10 T, language model 3.15 T. At 10% with a free selection (random: 156 tokens and
the newline) 3.04 T: the time to first token is at most 1.92x faster by MACs, and 2.12x even
keeping a single visual token, so the issue's 3x floor is unreachable for every method acting
after the tower on this shape (with SigLIP's 27 layers: 1.89x; with Qwen2-7B's 28 decoder
layers the bound at 10% would be 3.46x). The LLM prefill's bound at 10% is 8.5x (3.15 T against
0.37 T; FastV keeps every token in its first 2 of 8 layers, so at most 8 / (2 + 6 x 0.12) =
2.9x there). The script prints the time-to-first-token bounds from config_of before timing.

`--tower tome:r=22,inflection=-1` also times each method with ToMe merging inside the tower
and unmerging at its end (docs/methods.md section 10.1), in rows "method+tome" of the same
rounds: ToMe's decreasing schedule (44 merges in the first block down to 0 in the last)
leaves the tower 46% of its MACs (169 of 729 tokens per frame after the last block), and the
bound by MACs at 10% becomes 3.5x.

    python eval/bench_vlm_video.py                # 56 minutes on 2 cores at load 5 (3 rounds)
    python eval/bench_vlm_video.py --methods random,dycoke --repeats 1
    python eval/bench_vlm_video.py --methods fastv --repeats 1 --tower tome:r=22,inflection=-1
    python eval/bench_vlm_video.py --tiny         # a seconds-long smoke run, tiny shapes
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench_encoders.py
os.environ.setdefault("TOKCOMP_VERIFY", "0")  # the kernels' first-call checks stay untimed

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vlm import PROMPT, materialise
from bench_vlm_methods import contenders, print_rows, table
from script_args import refusing, script_parser

import tokcomp
from tokcomp.bench import parse_variant
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.timing import interleaved
from tokcomp.methods import create_method, method_class
from tokcomp.methods.dycoke import merged_kept
from tokcomp.schedule.resolve import check_tower_method

CPU = torch.device("cpu")
SHARE = 0.1
PREFILL_FLOOR, TTFT_FLOOR = 5.0, 3.0
#: The visual-token methods that run on LLaVA-OneVision videos: all of them.
METHODS = tokcomp.methods("vlm")


@dataclass(frozen=True)
class Shape:
    """The model's widths: the SigLIP tower's, then the Qwen2 decoder's."""

    tower_layers: int
    tower_width: int
    tower_heads: int
    tower_mlp: int
    image: int
    patch: int
    width: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int


ONEVISION = Shape(26, 1152, 16, 4304, 384, 14, 3584, 28, 4, 18944, 4096)
#: Every layer type of ONEVISION at toy widths (6 x 6 patches, 9 pooled tokens a frame).
TINY = Shape(2, 32, 2, 64, 84, 14, 64, 4, 2, 128, 256)
_SIDES = [(i, j) for i in range(1, 7) for j in range(1, 7)]


def build(shape: Shape, layers: int) -> nn.Module:
    """The LLaVA-OneVision-shaped model of `shape` with `layers` decoder layers, random weights
    (built on the meta device, then materialised cheaply), eval mode."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=shape.tower_width,
        intermediate_size=shape.tower_mlp,
        num_hidden_layers=shape.tower_layers,
        num_attention_heads=shape.tower_heads,
        image_size=shape.image,
        patch_size=shape.patch,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=shape.width,
        intermediate_size=shape.mlp,
        num_hidden_layers=layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=32768,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=shape.vocab - 2,
        video_token_index=shape.vocab - 1,
        # the released grids (1 to 6 tower sides by 1 to 6), at this tower's side
        image_grid_pinpoints=[[shape.image * i, shape.image * j] for i, j in _SIDES],
    )
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    model.to_empty(device="cpu")
    materialise(model)
    return model.eval()


def tokens_per_frame(model: nn.Module) -> int:
    """A frame's tokens after the model's 2 x 2 pooling (`apply_pooling`: ceil of half a side)."""
    vision = model.config.vision_config
    return math.ceil(vision.image_size // vision.patch_size / 2) ** 2


def inputs(model: nn.Module, frames: int) -> dict[str, torch.Tensor]:
    """One video of `frames` tower-sized frames inside a PROMPT-token text (20 tokens before
    its placeholders: its pooled tokens and the newline)."""
    generator = torch.Generator().manual_seed(0)
    vocab, side = model.config.text_config.vocab_size, model.config.vision_config.image_size
    text = torch.randint(0, vocab - 2, (PROMPT,), generator=generator)
    video = torch.full((frames * tokens_per_frame(model) + 1,), model.config.video_token_id)
    ids = torch.cat([text[:20], video, text[20:]])[None]
    pixels = torch.randn(1, frames, 3, side, side, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixels}


def budgets(
    methods: list[str], tokens: int, frames: int, tower: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Each method's budget knob at SHARE of the video's `tokens` selectable tokens (DyCoke's k:
    the hundredth whose kept share is nearest); with `tower` (apply's tower and tower_options),
    each method again with it, labelled "method+tower method"."""
    out = {}
    for name in methods:
        knob = method_class(name).budget
        if name == "dycoke":
            out[name] = {knob: min(_hundredths(), key=lambda k: _dycoke_miss(k, tokens, frames))}
        else:
            out[name] = {knob: SHARE}
    if tower is not None:
        out.update({f"{name}+{tower['tower']}": {**out[name], **tower} for name in methods})
    return out


def tower_option(text: str) -> dict[str, Any]:
    """--tower 'tome:r=22,inflection=-1' as apply's tower and tower_options."""
    variant = parse_variant(text)
    return {"tower": variant.method, "tower_options": variant.options}


def _hundredths() -> list[float]:
    return [k / 100 for k in range(101)]


def _dycoke_miss(k: float, tokens: int, frames: int) -> float:
    return abs(merged_kept(tokens, frames, k) / tokens - SHARE)


def amdahl(
    model: nn.Module, frames: int, tower: dict[str, Any] | None = None
) -> tuple[float, float]:
    """Time-to-first-token bounds by config_of's MACs on a reference video of `frames` frames:
    at SHARE of the visual tokens with a free selection (random), and keeping one; with `tower`
    merging inside the tower."""
    bounds = []
    for ratio in (SHARE, 1e-9):
        patched = tokcomp.apply(model, "random", keep_ratio=ratio, **(tower or {}))
        config = tokcomp.config_of(patched, frames=frames)
        bounds.append(1 / config.macs_ratio)
    tokcomp.remove(model)
    return bounds[0], bounds[1]


def build_parser() -> argparse.ArgumentParser:
    """The script's command line."""
    parser = script_parser(__doc__)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--frames", type=positive_int, default=8)
    parser.add_argument(
        "--layers", type=positive_int, default=8, help="decoder layers (Qwen2-7B: 28)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=2, help="timed rounds after a warm-up"
    )
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--tiny", action="store_true", help="toy widths: a smoke run")
    parser.add_argument(
        "--tower",
        type=tower_option,
        default=None,
        help="also time each method with this method merging in the tower, e.g. "
        "tome:r=22,inflection=-1 (default: off)",
    )
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, --methods as a list of names; unknown methods and a tower method that
    cannot run in the tower are refused before the model is built."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.methods = [name for name in args.methods.split(",") if name]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: {unknown} are not visual-token methods; choose from {METHODS}")
    if args.tower is not None:
        with refusing(parser):
            check_tower_method(create_method(args.tower["tower"], **args.tower["tower_options"]))
    return args


def print_setting(args: argparse.Namespace, tokens: int) -> None:
    """The model, the video and how it is timed."""
    print(
        f"LLaVA-OneVision-shaped{' (tiny)' if args.tiny else ''}, random weights, fp32, "
        f"{args.layers} decoder layers, {args.threads} threads, one {args.frames}-frame video "
        f"({tokens} tokens + newline), {SHARE:.0%} kept, median of {args.repeats} interleaved "
        "rounds after a warm-up",
        flush=True,
    )


def print_bounds(model: nn.Module, frames: int, tower: dict[str, Any] | None) -> None:
    """The `amdahl` bounds, and with `tower` also those with it merging in the tower."""
    at_share, at_one = amdahl(model, frames)
    print(
        f"Amdahl bound by MACs (the tower sees every frame): time to first token {at_share:.2f}x "
        f"at {SHARE:.0%}, {at_one:.2f}x keeping one token (floor {TTFT_FLOOR}x; LLM prefill "
        f"floor {PREFILL_FLOOR}x)",
        flush=True,
    )
    if tower is not None:
        at_share, at_one = amdahl(model, frames, tower)
        print(
            f"with {tower['tower']} {tower['tower_options']} in the tower: "
            f"{at_share:.2f}x at {SHARE:.0%}, {at_one:.2f}x keeping one token",
            flush=True,
        )


def time_methods(
    model: nn.Module, options: dict[str, dict[str, Any]], frames: int, repeats: int
) -> tuple[dict[str, list[float]], list[dict[str, Any]]]:
    """The unpruned model and each method at its `options` in the same interleaved rounds on
    one video of `frames` frames: each run's seconds per round, and `table`'s rows."""
    prefill: dict[str, list[float]] = {}
    runs = contenders(model, inputs(model, frames), options, prefill)
    with torch.inference_mode():
        seconds = interleaved(list(runs.values()), repeats, CPU)
    totals = dict(zip(runs, seconds, strict=True))
    return totals, table(model, options, totals, prefill, frames=frames)


def print_report(
    totals: dict[str, list[float]], options: dict[str, dict[str, Any]], rows: list[dict[str, Any]]
) -> None:
    """The unpruned time to first token, each method's options, the table and the floors."""
    print(f"unpruned: time to first token {statistics.median(totals['unpruned']) * 1e3:.0f} ms")
    print(", ".join(f"{name} {opts}" for name, opts in options.items()))
    print_rows(rows)
    print("\n".join(floor_lines(rows)))


def main(argv: list[str] | None = None) -> int:
    """Time every selected method against the unpruned model on one video; print the table."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(TINY if args.tiny else ONEVISION, args.layers)
    tokens = args.frames * tokens_per_frame(model)
    print_setting(args, tokens)
    print_bounds(model, args.frames, args.tower)
    options = budgets(args.methods, tokens, args.frames, args.tower)
    totals, rows = time_methods(model, options, args.frames, args.repeats)
    print_report(totals, options, rows)
    return 0


def floor_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per floor, the methods whose speed-up reaches it; one whose spread is too wide to
    trust keeps its flag ("?")."""
    lines = []
    for label, key, floor in (
        ("LLM prefill", "prefill", PREFILL_FLOOR),
        ("TTFT", "ttft", TTFT_FLOOR),
    ):
        met = [
            row["method"] + ("" if row[key].trusted else "?")
            for row in rows
            if row[key].ratio >= floor
        ]
        lines.append(f"{label} speed-up >= {floor}x: {', '.join(met) or 'none'}")
    return lines


if __name__ == "__main__":
    sys.exit(main())

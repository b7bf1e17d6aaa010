"""Accuracy per question kind of the video-shapes model under visual-token methods, to see
which questions a method's choice of tokens loses (first / last frame, change) and so why
a method loses to random on this task (model card eval/models/vlm-videoshapes).

    python eval/video_question_kinds.py --methods divprune,random,vispruner --keep 0.25
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eval/bench_encoders.py

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from script_args import fraction, method_names, refusing, script_parser
from train_vlm_videoshapes import greedy_accuracy

import tokcomp
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.video_shapes import question_rows
from tokcomp.harness.vqa import VIDEO_MODEL, kept_share_option, model_location
from tokcomp.methods import create_method


def kept_share(parser: argparse.ArgumentParser, method: str) -> str:
    """`method`'s option for the share of the visual tokens it keeps (--keep sets it); a
    method without one (DyCoke's k is the share merged away) is refused through `parser`."""
    try:
        return kept_share_option(method)
    except ValueError:
        parser.error(
            f"--methods: {method} has no option for the share of the visual tokens it keeps, "
            "which --keep sets; compare it with tokcomp eval vqa --variant instead"
        )


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line per method: its accuracy per answer type, question kind and all."""
    parser = script_parser(__doc__)
    parser.add_argument(
        "--methods",
        type=method_names("vlm"),
        default="divprune,random,vispruner",
        help="visual-token methods, comma separated",
    )
    parser.add_argument("--keep", type=fraction, default=0.25, help="share of the visual tokens")
    parser.add_argument("--positions", default="keep", choices=("keep", "renumber"))
    parser.add_argument(
        "--clips", type=positive_int, default=50, help="test clips (6 questions each)"
    )
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    settings = {
        method: {kept_share(parser, method): args.keep, "positions": args.positions}
        for method in args.methods
    }
    with refusing(parser):  # each method's options and the model's folder, before it loads
        for method, options in settings.items():
            create_method(method, **options)
        where = model_location(VIDEO_MODEL)
    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(where)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(where).eval()
    rows = list(question_rows("test", args.clips, seed=0))
    print(json.dumps({"method": "unpruned", **greedy_accuracy(model, processor, rows)}))
    for method, options in settings.items():
        tokcomp.apply(model, method, **options)
        accuracy = greedy_accuracy(model, processor, rows)
        print(json.dumps({"method": method, **options, **accuracy}), flush=True)
        tokcomp.remove(model)


if __name__ == "__main__":
    main()

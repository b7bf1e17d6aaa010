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
from train_vlm_videoshapes import greedy_accuracy

import tokcomp
from tokcomp.harness.video_shapes import question_rows
from tokcomp.harness.vqa import VIDEO_MODEL
from tokcomp.methods import method_class


def budget(method: str, keep: float) -> dict[str, float]:
    """`keep` of each video's visual tokens in `method`'s budget knob."""
    return {method_class(method).budget: keep}


def main(argv: list[str] | None = None) -> None:
    """Print one JSON line per method: its accuracy per answer type, question kind and all."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="divprune,random,vispruner")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--positions", default="keep", choices=("keep", "renumber"))
    parser.add_argument("--clips", type=int, default=50, help="test clips (6 questions each)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(VIDEO_MODEL)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(VIDEO_MODEL).eval()
    rows = list(question_rows("test", args.clips, seed=0))
    print(json.dumps({"method": "unpruned", **greedy_accuracy(model, processor, rows)}))
    for method in args.methods.split(","):
        options = {**budget(method, args.keep), "positions": args.positions}
        tokcomp.apply(model, method, **options)
        accuracy = greedy_accuracy(model, processor, rows)
        print(json.dumps({"method": method, **options, **accuracy}), flush=True)
        tokcomp.remove(model)


if __name__ == "__main__":
    main()

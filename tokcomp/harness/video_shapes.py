"""video-shapes: a synthetic offline video QA task made of easy-VQA images.

A clip is FRAMES frames, each one 64x64 easy-VQA image (one coloured shape). It holds 2 to 4
distinct source images, each for a run of consecutive frames, so neighbouring frames repeat
(the temporal redundancy that video token-pruning methods exploit). Each clip asks one
question of every kind in QUESTIONS, each answered by one word that needs the frames: the
shape or colour in the first or the last frame, whether the shape changes, whether its colour
changes. Half the clips keep one shape throughout (the others show at least two) and,
independently, half keep one colour, so yes and no are equally likely. (A "how many frames
show a circle?" question, answered by a number word, was tried and dropped: the small
default model learnt it far more slowly than the rest; see the model card
eval/models/vlm-videoshapes/README.md.) An image's shape and colour are read from its
easy-VQA "what ..." questions (images without both are not used); train clips come from
easy-VQA's train split, test clips from its test split.

    write_video_shapes("test", Path("data"), clips=250, seed=0)  # data/video-shapes-test.jsonl
    tokcomp eval vqa --data video-shapes ...  # the same 250 test clips, no file written
    python -m tokcomp.harness.video_shapes --split test --clips 250 --seed 0 --out data

writes JSON lines {"video": [frame paths], "question", "answers", "answer_type",
"question_type", "question_id"}, frame paths absolute into the easy-VQA install.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokcomp.cli import OneLineParser
from tokcomp.errors import UsageError
from tokcomp.files import write_text_whole
from tokcomp.harness.arguments import check_new_file
from tokcomp.harness.data import easy_vqa_root

FRAMES = 8
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
#: Distinct source images per clip.
RUNS = (2, 3, 4)
#: Question kind -> (template, answer type).
QUESTIONS = {
    "first_shape": ("what shape is in the first frame?", "other"),
    "last_shape": ("what shape is in the last frame?", "other"),
    "first_color": ("what color is the shape in the first frame?", "other"),
    "last_color": ("what color is the shape in the last frame?", "other"),
    "shape_change": ("does the shape change?", "yes/no"),
    "color_change": ("does the shape change color?", "yes/no"),
}


@dataclass(frozen=True)
class Frame:
    """One easy-VQA image with its shape and colour."""

    path: Path
    shape: str
    colour: str


@dataclass(frozen=True)
class Clip:
    """FRAMES frames (runs of repeated images) and its questions: (kind, text, answer)."""

    frames: tuple[Frame, ...]
    questions: tuple[tuple[str, str, str], ...]


@functools.cache
def labelled_frames(split: str) -> tuple[Frame, ...]:
    """The images of easy-VQA's `split` whose "what ..." questions name both their shape and
    colour (a shape or colour word in the question or its answer), in image-id order."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = easy_vqa_root() / split
    shapes: dict[int, str] = {}
    colours: dict[int, str] = {}
    for text, answer, image in json.loads((folder / "questions.json").read_text()):
        if not text.startswith("what"):
            continue
        for word in {*re.findall("[a-z]+", text), answer}:
            if word in SHAPES:
                shapes[image] = word
            elif word in COLOURS:
                colours[image] = word
    return tuple(
        Frame(folder / "images" / f"{image}.png", shapes[image], colours[image])
        for image in sorted(shapes.keys() & colours.keys())
    )


def run_lengths(runs: int, rng: random.Random) -> list[int]:
    """A random split of FRAMES into `runs` positive run lengths."""
    cuts = sorted(rng.sample(range(1, FRAMES), runs - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, FRAMES], strict=True)]


def source_images(frames: tuple[Frame, ...], runs: int, rng: random.Random) -> list[Frame]:
    """`runs` distinct images: for half the clips all of one shape (else at least two shapes)
    and, independently, for half all of one colour (else at least two colours)."""
    one_shape, one_colour = rng.random() < 0.5, rng.random() < 0.5
    pool = list(frames)
    if one_shape:
        shape = rng.choice(SHAPES)
        pool = [frame for frame in pool if frame.shape == shape]
    if one_colour:
        colour = rng.choice(COLOURS)
        pool = [frame for frame in pool if frame.colour == colour]
    while True:
        sources = rng.sample(pool, runs)
        shapes, colours = {f.shape for f in sources}, {f.colour for f in sources}
        if (len(shapes) == 1) == one_shape and (len(colours) == 1) == one_colour:
            return sources


def make_clip(frames: tuple[Frame, ...], rng: random.Random) -> Clip:
    """One clip: 2-4 distinct images (see `source_images`) held for random runs, and one
    question of each kind."""
    runs = rng.choice(RUNS)
    sources = source_images(frames, runs, rng)
    lengths = run_lengths(runs, rng)
    clip = tuple(frame for frame, n in zip(sources, lengths, strict=True) for _ in range(n))
    return Clip(clip, questions(clip))


def questions(clip: tuple[Frame, ...]) -> tuple[tuple[str, str, str], ...]:
    """(kind, question, answer) of every kind in QUESTIONS."""
    answers = {
        "first_shape": clip[0].shape,
        "last_shape": clip[-1].shape,
        "first_color": clip[0].colour,
        "last_color": clip[-1].colour,
        "shape_change": "yes" if len({frame.shape for frame in clip}) > 1 else "no",
        "color_change": "yes" if len({frame.colour for frame in clip}) > 1 else "no",
    }
    return tuple((kind, text, answers[kind]) for kind, (text, _) in QUESTIONS.items())


def make_clips(split: str, clips: int, seed: int) -> list[Clip]:
    """`clips` clips of easy-VQA's `split`, the same for the same seed."""
    if clips < 1:
        raise ValueError(f"clips must be at least 1, not {clips}")
    frames = labelled_frames(split)
    rng = random.Random(f"video-shapes/{split}/{seed}")
    return [make_clip(frames, rng) for _ in range(clips)]


def question_rows(split: str, clips: int, seed: int) -> Iterator[dict[str, Any]]:
    """Every question of `clips` clips of `split`, as JSON-lines rows (the harness's format)."""
    for number, clip in enumerate(make_clips(split, clips, seed)):
        for kind, question, answer in clip.questions:
            yield {
                "video": [str(frame.path) for frame in clip.frames],
                "question": question,
                "answers": [answer],
                "answer_type": QUESTIONS[kind][1],
                "question_type": kind,
                "question_id": f"{split}-{number}-{kind}",
            }


def write_video_shapes(split: str, folder: Path, clips: int, seed: int) -> Path:
    """Write `clips` clips of `split` (every question of each) as JSON lines to
    folder/video-shapes-<split>.jsonl and return its path."""
    path = video_shapes_path(split, folder)
    write_text_whole(
        path, "".join(json.dumps(row) + "\n" for row in question_rows(split, clips, seed))
    )
    return path


def video_shapes_path(split: str, folder: Path) -> Path:
    """Where `write_video_shapes` writes `split` in `folder`."""
    return folder / f"video-shapes-{split}.jsonl"


def main(argv: list[str] | None = None) -> None:
    """Write one split's JSON-lines file and print its path."""
    parser = OneLineParser(description="Write video-shapes clips as JSON lines.")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--clips", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data"))
    parser.add_argument("--force", action="store_true", help="overwrite the split's file in --out")
    args = parser.parse_args(argv)
    try:
        check_new_file(video_shapes_path(args.split, args.out), args.force, "--out")
    except UsageError as err:
        parser.error(str(err))
    print(write_video_shapes(args.split, args.out, args.clips, args.seed))


if __name__ == "__main__":
    main()

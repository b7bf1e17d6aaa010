"""video-shapes (tokcomp.harness.video_shapes): deterministic clips of easy-VQA frames whose
answers follow from the frames' labels, read here again from easy-VQA's questions."""

from __future__ import annotations

import json
import re
from collections import Counter
from functools import cache
from itertools import groupby
from pathlib import Path

import pytest

from tokcomp.harness import video_shapes
from tokcomp.harness.data import easy_vqa_root
from tokcomp.harness.video_shapes import FRAMES, write_video_shapes
from tokcomp.harness.vqa import VIDEO_MODEL, default_model
from tokcomp.harness.vqa_data import open_vqa, read_jsonl


@cache
def labels(split: str) -> dict[Path, tuple[str, str]]:
    """(shape, colour) of each easy-VQA image of `split`, from its "what ..." questions,
    template by template."""
    folder = easy_vqa_root() / split
    shape, colour = {}, {}
    for text, answer, image in json.loads((folder / "questions.json").read_text()):
        path = folder / "images" / f"{image}.png"
        if text.startswith("what shape"):
            shape[path] = answer
        elif match := re.fullmatch(r"what is the (\w+) shape\?", text):
            colour[path], shape[path] = match[1], answer
        elif match := re.fullmatch(r"what (?:color is|is the color of) the (\w+)\?", text):
            colour[path] = answer
            if match[1] != "shape":
                shape[path] = match[1]
    return {path: (shape[path], colour[path]) for path in shape.keys() & colour.keys()}


def rows(split: str, folder: Path, clips: int, seed: int = 0) -> list[dict]:
    path = write_video_shapes(split, folder, clips, seed)
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_same_seed_writes_the_same_file_and_another_seed_another(tmp_path):
    first = write_video_shapes("train", tmp_path / "a", clips=20, seed=3).read_bytes()
    again = write_video_shapes("train", tmp_path / "b", clips=20, seed=3).read_bytes()
    other = write_video_shapes("train", tmp_path / "c", clips=20, seed=4).read_bytes()
    assert first == again
    assert first != other


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_answer_follows_from_the_labels_of_the_frames(tmp_path, split):
    known = labels(split)
    written = rows(split, tmp_path, clips=60)
    assert len(written) == 60 * 6
    for row in written:
        frames = [Path(p) for p in row["video"]]
        assert len(frames) == FRAMES
        assert all(
            p.is_absolute() and p.parent == easy_vqa_root() / split / "images" for p in frames
        )
        runs = [image for image, _ in groupby(frames)]
        assert 2 <= len(runs) <= 4 and len(set(runs)) == len(runs)  # distinct images, held
        shapes = [known[p][0] for p in frames]
        colours = [known[p][1] for p in frames]
        question, (answer,) = row["question"], row["answers"]
        expected = {
            "what shape is in the first frame?": shapes[0],
            "what shape is in the last frame?": shapes[-1],
            "what color is the shape in the first frame?": colours[0],
            "what color is the shape in the last frame?": colours[-1],
            "does the shape change?": "yes" if len(set(shapes)) > 1 else "no",
            "does the shape change color?": "yes" if len(set(colours)) > 1 else "no",
        }
        assert answer == expected[question]
        assert row["answer_type"] == ("yes/no" if answer in ("yes", "no") else "other")


def test_answers_are_balanced_enough(tmp_path):
    by_kind: dict[str, Counter] = {}
    for row in rows("train", tmp_path, clips=600):
        by_kind.setdefault(row["question_type"], Counter())[row["answers"][0]] += 1
    for kind in ("shape_change", "color_change"):
        assert set(by_kind[kind]) == {"yes", "no"}
        assert max(by_kind[kind].values()) < 0.6 * 600
    for kind, classes in (("first_shape", 3), ("last_shape", 3), ("first_color", 8)):
        assert len(by_kind[kind]) == classes
        assert max(by_kind[kind].values()) < 2 * 600 / classes


def test_bad_split_or_clip_count_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        write_video_shapes("val", tmp_path, clips=1, seed=0)
    with pytest.raises(ValueError, match="clips must be at least 1"):
        write_video_shapes("test", tmp_path, clips=0, seed=0)


def test_the_command_keeps_an_existing_file_unless_forced(tmp_path, capsys):
    path = tmp_path / "video-shapes-test.jsonl"
    path.write_text("a file of my own\n")
    argv = ["--clips", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as done:
        video_shapes.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1
    assert f"--out {path} exists; pass --force to overwrite it" in err
    assert path.read_text() == "a file of my own\n"
    video_shapes.main([*argv, "--force"])
    assert path.read_bytes() == write_video_shapes("test", tmp_path / "again", 1, 0).read_bytes()


def test_data_video_shapes_is_the_written_test_file_s_questions_and_picks_its_model(tmp_path):
    path = write_video_shapes("test", tmp_path, clips=250, seed=0)
    named = open_vqa("video-shapes")
    assert [vars(q) for q in named] == [vars(q) for q in read_jsonl(path)]
    assert named.visual_unit == "video" and len(named) == 250 * 6
    assert default_model("video-shapes") == VIDEO_MODEL != default_model("easy-vqa")
    assert (VIDEO_MODEL / "config.json").is_file()

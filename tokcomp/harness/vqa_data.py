"""VQA data: the official VQAv2 layout, JSON-lines files and the easy-VQA test split, read
into Question objects (see tokcomp.harness.vqa for the formats)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from tokcomp.harness.data import EASY_VQA, VIDEO_SHAPES, data_source, easy_vqa_root
from tokcomp.harness.fingerprint import file_identity


@dataclass(frozen=True)
class Question:
    """One question about one image or one video (its frames, in order; exactly one of the two)
    with its reference answers."""

    image: Path | None
    question: str
    answers: tuple[str, ...]
    answer_type: str | None = None
    question_type: str | None = None
    question_id: int | str | None = None
    video: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        if (self.image is None) == (self.video is None):
            raise ValueError(
                f"question {self.question_id} needs either an image or a video (a list of "
                "frame files), not both or neither"
            )
        if self.video is not None and not self.video:
            raise ValueError(f"question {self.question_id}: its video lists no frame files")

    @property
    def files(self) -> tuple[Path, ...]:
        """The question's image, or its video's frames."""
        return (self.image,) if self.video is None else self.video


class VQADataset(Dataset):
    """Questions in a fixed order; items are Question objects."""

    def __init__(self, questions: Sequence[Question]) -> None:
        self.questions = list(questions)

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> Question:
        return self.questions[index]

    def subset(self, indices: Sequence[int]) -> VQADataset:
        """The questions at `indices`, as a dataset of their own."""
        return VQADataset([self.questions[i] for i in indices])

    def kinds(self) -> list[str | None]:
        """Each question's type (what `--limit` spreads over, see `limited`)."""
        return [q.question_type for q in self.questions]

    def identities(self, indices: Sequence[int]) -> Iterator[list[Any]]:
        """Each question with its answers and its image or frame files (name, size, modification
        time of each)."""
        for index in indices:
            q = self.questions[index]
            yield [
                *(part for path in q.files for part in file_identity(path)),
                q.question,
                list(q.answers),
                q.answer_type,
                q.question_id,
            ]

    def describe(self) -> str:
        """One line: questions, images or videos, and answer types."""
        images = {q.image for q in self.questions if q.video is None}
        videos = {q.video for q in self.questions if q.video is not None}
        shown = [f"{len(images)} images"] if images or not videos else []
        shown += [_videos_shown(videos)] if videos else []
        return (
            f"{len(self)} questions on {' and '.join(shown)}; answer types "
            f"{list(answer_types(self))}"
        )

    @property
    def visual_unit(self) -> str:
        """What each question shows: 'image', 'video', or 'image/video' (a mixed dataset)."""
        kinds = sorted({"image" if q.video is None else "video" for q in self.questions})
        return "/".join(kinds)

    @property
    def video_frames(self) -> int | None:
        """The frames of every question's video when all questions show videos of one length;
        else None."""
        lengths = {None if q.video is None else len(q.video) for q in self.questions}
        return lengths.pop() if len(lengths) == 1 else None


def _videos_shown(videos: set[tuple[Path, ...]]) -> str:
    """'N videos of F frames' (or 'of F1-F2 frames')."""
    lengths = sorted({len(video) for video in videos})
    frames = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
    return f"{len(videos)} videos of {frames} frames"


def open_vqa(data: str, images: Path | None = None) -> VQADataset:
    """The questions of a --data value (see `data_source`): easy-vqa, video-shapes, a .jsonl
    file or a VQAv2 folder, every image checked to exist; `images` overrides the image folder of
    the VQAv2 layout."""
    source = data_source(data)
    if images is not None and source.kind != "folder":
        raise ValueError("--images applies to the VQAv2 layout only")
    if source.kind == EASY_VQA:
        questions = read_easy_vqa("test")
    elif source.kind == VIDEO_SHAPES:
        questions = read_video_shapes()
    elif source.kind == "jsonl" and source.path.is_file():
        questions = read_jsonl(source.path)
    elif source.kind == "folder" and source.path.is_dir():
        questions = read_vqav2(source.path, images)
    else:
        raise FileNotFoundError(
            f"--data {data}: expected {EASY_VQA}, {VIDEO_SHAPES}, a .jsonl file or a VQAv2 folder "
            "(questions JSON, annotations JSON and the image folder)"
        )
    check_images(questions)
    return VQADataset(questions)


def read_easy_vqa(split: str) -> list[Question]:
    """The easy-VQA questions of `split` ('train' or 'test'), in file order; answer type
    'yes/no' for yes/no answers, else 'other' (VQAv2's names)."""
    folder = easy_vqa_root() / split
    rows = json.loads((folder / "questions.json").read_text())
    return [
        Question(
            image=folder / "images" / f"{image_id}.png",
            question=text,
            answers=(answer,),
            answer_type="yes/no" if answer in ("yes", "no") else "other",
            question_id=index,
        )
        for index, (text, answer, image_id) in enumerate(rows)
    ]


def read_video_shapes() -> list[Question]:
    """The video-shapes test questions (tokcomp.harness.video_shapes: its default 250 clips,
    seed 0), built in memory from the installed easy-VQA images."""
    from tokcomp.harness.video_shapes import question_rows

    rows = question_rows("test", clips=250, seed=0)
    return [
        Question(
            image=None,
            video=tuple(Path(frame) for frame in row["video"]),
            question=row["question"],
            answers=tuple(row["answers"]),
            answer_type=row["answer_type"],
            question_type=row["question_type"],
            question_id=row["question_id"],
        )
        for row in rows
    ]


def read_jsonl(path: Path) -> list[Question]:
    """Questions of a JSON-lines file (see the module docstring); image and frame paths
    relative to the file's folder."""
    questions = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not a JSON object ({err})") from None
        missing = [key for key in ("question", "answers") if key not in row]
        if not ("image" in row or "video" in row):
            missing.insert(0, "image or video")
        answers = row.get("answers")
        if missing or not isinstance(answers, list) or not answers:
            raise ValueError(
                f"{where}: each line needs 'image' (a file) or 'video' (a list of frame files), "
                f"'question' and a non-empty list 'answers'"
                f"{f' (missing: {missing})' if missing else ''}"
            )
        _check_texts(row, where)
        if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in answers):
            raise ValueError(
                f"{where}: 'answers' must be a list of texts (or numbers), e.g. [\"yes\"], got "
                f"{answers!r:.80}"
            )
        questions.append(
            Question(
                **_visual_files(row, path.parent, where),
                question=row["question"],
                answers=tuple(str(answer) for answer in answers),
                answer_type=row.get("answer_type"),
                question_type=row.get("question_type"),
                question_id=row.get("question_id", number),
            )
        )
    return questions


def _check_texts(row: dict[str, Any], where: str) -> None:
    """Refuse a JSON-lines row whose text fields hold anything but text."""
    for key in ("image", "question", "answer_type", "question_type"):
        value = row.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{where}: '{key}' must be text, got {value!r}")


def _visual_files(row: dict[str, Any], folder: Path, where: str) -> dict[str, Any]:
    """The image or video of a JSON-lines row, as Question fields (paths under `folder`)."""
    if "image" in row and "video" in row:
        raise ValueError(
            f"{where} has both 'image' and 'video': a question shows one of them; split it into "
            "two lines"
        )
    if "image" in row:
        return {"image": folder / row["image"]}
    frames = row["video"]
    if not isinstance(frames, list) or not frames or not all(isinstance(f, str) for f in frames):
        raise ValueError(
            f"{where}: 'video' must be a non-empty list of frame file paths, in order, got "
            f"{frames!r}"
        )
    return {"image": None, "video": tuple(folder / frame for frame in frames)}


def read_vqav2(folder: Path, images: Path | None = None) -> list[Question]:
    """Questions of the official VQAv2 layout, in the questions file's order: answers,
    answer and question types from the annotations; images in `images`, by default
    <folder>/<data_subtype> (e.g. val2014)."""
    questions_file = _only(folder, "*questions.json")
    annotations_file = _only(folder, "*annotations.json")
    questions = _json_field(questions_file, "questions")
    subtype = _json_field(questions_file, "data_subtype")
    annotations = {a["question_id"]: a for a in _json_field(annotations_file, "annotations")}
    images = images or folder / subtype
    out = []
    for question in questions:
        annotation = annotations.get(question["question_id"])
        if annotation is None:
            raise ValueError(
                f"question {question['question_id']} of {questions_file} has no annotation in "
                f"{annotations_file}: use the annotations file of the same split"
            )
        out.append(
            Question(
                image=images / f"COCO_{subtype}_{question['image_id']:012d}.jpg",
                question=question["question"],
                answers=tuple(a["answer"] for a in annotation["answers"]),
                answer_type=annotation.get("answer_type"),
                question_type=annotation.get("question_type"),
                question_id=question["question_id"],
            )
        )
    return out


def _only(folder: Path, pattern: str) -> Path:
    """The one file in `folder` matching `pattern`."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FileNotFoundError(
            f"the VQAv2 folder {folder} must hold exactly one {pattern} file, found "
            f"{[p.name for p in found] or 'none'}"
        )
    return found[0]


def _json_field(path: Path, key: str) -> Any:
    """`key` of the JSON object in `path`, or an error naming the file."""
    content = json.loads(path.read_text())
    if not isinstance(content, dict) or key not in content:
        raise ValueError(f"{path} has no '{key}': is it an official VQAv2 file?")
    return content[key]


def check_images(questions: Sequence[Question]) -> None:
    """Raise FileNotFoundError naming the first image or video frame that does not exist."""
    seen = set()
    for question in questions:
        for path in question.files:
            if path in seen:
                continue
            if not path.is_file():
                what = "image" if question.video is None else "video frame"
                raise FileNotFoundError(
                    f"{what} {path} of question {question.question_id} does not exist; check "
                    "the image folder (VQAv2: --images DIR) or the question's file paths"
                )
            seen.add(path)


def answer_types(dataset: Dataset) -> tuple[str, ...]:
    """The answer types present in `dataset`, sorted (questions without one count only in
    the overall accuracy)."""
    found = {dataset[i].answer_type for i in range(len(dataset))}
    return tuple(sorted(kind for kind in found if kind is not None))

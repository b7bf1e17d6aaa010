"""The easy-VQA lmms-eval task's functions (see easyvqa.yaml), built on tokcomp's VQA harness
so that both give the same prompt and score; `python utils.py` writes questions.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from tokcomp.harness.data import easy_vqa_root, read_image
from tokcomp.harness.vqa_data import read_easy_vqa
from tokcomp.harness.vqa_metric import vqa_accuracy
from tokcomp.harness.vqa_prompt import POST_PROMPT

QUESTIONS = Path(__file__).with_name("questions.jsonl")


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The question's image, from the installed easy-vqa package."""
    return [read_image(str(easy_vqa_root() / doc["image"])).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    """The question between the task's pre- and post-prompt (default: `tokcomp eval vqa`'s)."""
    kwargs = lmms_eval_specific_kwargs or {}
    return kwargs.get("pre_prompt", "") + doc["question"] + kwargs.get("post_prompt", POST_PROMPT)


def doc_to_target(doc: dict[str, Any]) -> str:
    """The reference answer."""
    return doc["answers"][0]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """VQA accuracy of the answer, in percent (`tokcomp eval vqa`'s metric)."""
    return {"vqa": 100.0 * vqa_accuracy(results[0], doc["answers"])}


def write_questions(path: Path = QUESTIONS) -> None:
    """The easy-VQA test questions as JSON lines, in file order; images relative to the
    easy-vqa package's data folder."""
    root = easy_vqa_root()
    with path.open("w") as handle:
        for question in read_easy_vqa("test"):
            row = {
                "question_id": question.question_id,
                "question": question.question,
                "answers": list(question.answers),
                "answer_type": question.answer_type,
                "image": str(question.image.relative_to(root)),
            }
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_questions()

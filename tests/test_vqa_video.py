"""The VQA harness on videos: JSON-lines video questions, their frames through the model's
video processor, sweeps on tiny random LLaVA-OneVision and Qwen2-VL (visual tokens per video,
budgets per video, DyCoke), resume and refusals."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.vqa import (
    FRAMES,
    IMAGE_SIZE,
    PATCH_SIZE,
    ROWS,
    VIDEO_FAMILIES,
    VIDEO_ROWS,
    force_answer,
    frame_paths,
    save_tiny_llava,
    save_tiny_video_vlm,
    tiny_processor,
    tiny_video_vlm,
    write_image,
    write_jsonl,
    write_video_jsonl,
)
from PIL import Image

import tokcomp
from tokcomp.adapters.hf_vlm.families import video_classes
from tokcomp.cli import main
from tokcomp.harness import sweep
from tokcomp.harness.data import CorruptImageError, read_video
from tokcomp.harness.fingerprint import Fingerprint, samples_digest
from tokcomp.harness.results import ResultStore
from tokcomp.harness.vqa import VQATask, check_takes_videos, keep_budget, load_vlm
from tokcomp.harness.vqa_data import Question, VQADataset, open_vqa, read_jsonl
from tokcomp.harness.vqa_prompt import Prompts

CPU = torch.device("cpu")
#: DyCoke's default k: a pruned frame keeps int((1 - k) x its tokens).
DYCOKE_K = 0.7


def video_tokens(family: str) -> tuple[int, int, int]:
    """Visual tokens of one FRAMES-frame video (unpruned, half kept, DyCoke at its default k),
    from each family's geometry by hand."""
    if family == "llava_onevision_video":
        # each frame's patch grid 2 x 2-pooled, then one newline token, always kept
        per_frame, frames, fixed = (IMAGE_SIZE // PATCH_SIZE // 2) ** 2, FRAMES, 1
    else:
        # Qwen2-VL: 4 px patches, 2 x 2 merged, one temporal patch per 2 frames
        per_frame, frames, fixed = (IMAGE_SIZE // 4 // 2) ** 2, FRAMES // 2, 0
    selectable = per_frame * frames
    # DyCoke over so few frames prunes every odd frame against the one before it
    pruned = frames // 2
    dycoke = selectable - pruned * (per_frame - int((1 - DYCOKE_K) * per_frame))
    return selectable + fixed, selectable // 2 + fixed, dycoke + fixed


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_video_jsonl(tmp_path_factory.mktemp("videos") / "videos.jsonl")


# -- data -------------------------------------------------------------------------------------
def test_video_lines_are_parsed(tmp_path):
    path = write_video_jsonl(tmp_path / "data" / "videos.jsonl")
    questions = read_jsonl(path)
    assert [q.question for q in questions] == [row[1] for row in VIDEO_ROWS]
    first = questions[0]
    assert first.image is None and first.video == tuple(frame_paths(path.parent, 1))
    assert first.files == first.video and first.answer_type == "other"
    absolute = {"video": [str(p) for p in first.video], "question": "q?", "answers": ["a"]}
    path.write_text(json.dumps(absolute) + "\n")
    assert read_jsonl(path)[0].video == first.video
    dataset = VQADataset(questions)
    assert dataset.visual_unit == "video"
    assert dataset.describe().startswith(f"4 questions on 2 videos of {FRAMES} frames; ")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "a.png", "video": ["a.png"]}, "has both 'image' and 'video'.*two lines"),
        ({}, r"needs 'image' \(a file\) or 'video'.*missing: \['image or video'\]"),
        ({"video": "a.png"}, "'video' must be a non-empty list of frame file paths"),
        ({"video": []}, "'video' must be a non-empty list of frame file paths"),
    ],
)
def test_a_line_with_both_or_neither_is_refused(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({**row, "question": "q?", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:1.*{message}"):
        read_jsonl(path)


def test_a_question_shows_an_image_or_a_video():
    with pytest.raises(ValueError, match="either an image or a video"):
        Question(image=Path("a.png"), question="q", answers=("a",), video=(Path("a.png"),))
    with pytest.raises(ValueError, match="either an image or a video"):
        Question(image=None, question="q", answers=("a",))


def test_a_missing_frame_is_named(tmp_path, capsys):
    path = write_video_jsonl(tmp_path / "videos.jsonl")
    missing = frame_paths(tmp_path, 2)[3]
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"video frame {missing} of question 3 does not"):
        open_vqa(str(path))
    assert main(["eval", "vqa", "--data", str(path), "--model", str(tmp_path)]) == 2
    assert f"video frame {missing} of question 3" in capsys.readouterr().err


def test_frames_are_read_as_one_rgb_array_and_must_share_a_size(tmp_path):
    frames = frame_paths(tmp_path, 1, frames=2)
    for seed, frame in enumerate(frames):
        write_image(frame, seed)
    video = read_video(frames)
    expected = np.stack([np.asarray(Image.open(frame).convert("RGB")) for frame in frames])
    assert video.dtype == np.uint8 and np.array_equal(video, expected)
    Image.new("L", (8, 8)).save(frames[1])
    with pytest.raises(CorruptImageError, match=r"frames of the video starting with .*0.png"):
        read_video(frames)


def test_a_changed_frame_changes_the_fingerprint(tmp_path):
    path = write_video_jsonl(tmp_path / "videos.jsonl")
    before = samples_digest(open_vqa(str(path)))
    write_image(frame_paths(tmp_path, 2)[3], seed=999)
    assert samples_digest(open_vqa(str(path))) != before


def test_budgets_are_fractions_kept_so_dycoke_gives_its_k_as_a_variant():
    assert keep_budget("fastvid", 0.5) == "fastvid:keep=0.5"
    with pytest.raises(ValueError, match=r"dycoke's budget k is not the share.*dycoke:k=0.7"):
        keep_budget("dycoke", 0.5)


# -- the model's inputs -----------------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_prompts_give_the_frames_to_the_video_processor(data, family):
    questions = read_jsonl(data)
    _, processor = tiny_video_vlm(questions, family)
    sampling = processor.video_processor
    sampling.do_sample_frames, sampling.num_frames = True, 2  # the harness gives every frame
    inputs, _ = Prompts(processor)(questions)
    assert "pixel_values" not in inputs
    placeholders = (inputs["input_ids"] == processor.video_token_id).sum(dim=1)
    assert placeholders.tolist() == [video_tokens(family)[0]] * len(questions)
    frames = [np.stack([np.asarray(Image.open(f)) for f in q.video]) for q in questions]
    by_hand = sampling(videos=frames, do_sample_frames=False, return_tensors="pt")
    assert torch.equal(inputs["pixel_values_videos"], by_hand["pixel_values_videos"])


# -- sweeps -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_forced_answers_score_exactly_with_the_tokens_of_each_video(data, family):
    questions = read_jsonl(data)
    model, processor = tiny_video_vlm(questions, family)
    force_answer(model, processor.tokenizer.convert_tokens_to_ids("yes"))
    types = ("number", "other", "yes/no")
    task = VQATask(VQADataset(questions), processor, 3, 0, CPU, types, max_new_tokens=1)
    points = sweep.sweep_points(
        ["divprune"], [0.5], [sweep.parse_variant("dycoke:decode_layer=2")], budget=keep_budget
    )
    evaluation = sweep.task_evaluation(task, CPU, probe=sweep.SpeedProbe(1))
    plans = sweep.plan_points(model, points)
    rows = sweep.run_sweep(model, plans, evaluation, ResultStore(None, Fingerprint.of()))
    # "yes" is the answer of the 2nd question and one of the 4th's two: the others score 0
    for row in rows:
        assert row["vqa"] == 100 * 2 / 4 and row["vqa_yes_no"] == 100.0
        assert row["vqa_number"] == row["vqa_other"] == 0.0
    assert tuple(row["visual_tokens"] for row in rows) == video_tokens(family)


def vqa(model: Path, data: Path, output: Path, *options: str) -> int:
    """Run `tokcomp eval vqa` (no worker processes, one speed round); its exit code."""
    argv = ["--model", model, "--data", data, "--output", output, "--workers", 0]
    argv += ["--batch-size", 4, "--max-new-tokens", 2, "--speed-repeats", 1, *options]
    return main(["eval", "vqa", *map(str, argv)])


def evaluate(model: Path, data: Path, output: Path, *options: str) -> list[dict]:
    """Run `tokcomp eval vqa`; this run's rows from its CSV."""
    assert vqa(model, data, output, *options) == 0
    with open(output / "results.csv") as handle:
        return list(csv.DictReader(handle))


#: DyCoke's decoding pruning starts at layer 2 here: the tiny models have 3 decoder layers.
SWEEP = ("--methods", "divprune", "--budgets", "0.5")
SWEEP += ("--variant", "dycoke:k=0.7,decode_layer=2")
#: SWEEP's compressed points, as tokcomp.apply arguments.
SWEEP_POINTS = (("divprune", {"keep": 0.5}), ("dycoke", {"k": 0.7, "decode_layer": 2}))


def video_gmacs(folder: Path, points: tuple) -> list[float]:
    """GMACs of the model in `folder` on a reference FRAMES-frame video: unpruned, then under
    each of `points`."""
    model, _ = load_vlm(folder)
    unpruned = tokcomp.macs(model, frames=FRAMES)
    pruned = [
        tokcomp.config_of(tokcomp.apply(model, method, **options), frames=FRAMES).macs
        for method, options in points
    ]
    return [macs / 1e9 for macs in [unpruned, *pruned]]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_a_video_sweep_runs_end_to_end_with_budgets_per_video(data, family, tmp_path, capsys):
    model = save_tiny_video_vlm(tmp_path / "model", read_jsonl(data), family)
    rows = evaluate(model, data, tmp_path / "out", *SWEEP)
    assert [(r["method"], r["label"]) for r in rows] == [
        ("unpruned", ""),
        ("divprune", "keep=0.5"),
        ("dycoke", "k=0.7 decode_layer=2"),
    ]
    assert tuple(float(r["visual_tokens"]) for r in rows) == video_tokens(family)
    assert [float(r["gmacs"]) for r in rows] == pytest.approx(video_gmacs(model, SWEEP_POINTS))
    assert float(rows[2]["macs_ratio"]) < 1  # DyCoke merges frames: nothing on an image
    for row in rows:
        assert row["visual_tokens_per"] == "video" and int(row["samples"]) == len(VIDEO_ROWS)
        assert 0 <= float(row["vqa"]) <= 100 and float(row["ttft_ms"]) > 0
    saved = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    assert {row["visual_tokens_per"] for row in saved} == {"video"}
    out = capsys.readouterr().out
    assert f"4 questions on 2 videos of {FRAMES} frames" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("unpruned", "d"))]
    assert len(table) == 3 and all("video" in line for line in table)


def test_a_resumed_video_sweep_skips_finished_points_until_a_frame_changes(
    tmp_path, measured, capsys
):
    folder = tmp_path / "data"
    data = write_video_jsonl(folder / "videos.jsonl")
    model = save_tiny_video_vlm(tmp_path / "model", read_jsonl(data), VIDEO_FAMILIES[0])
    output = tmp_path / "out"
    first = evaluate(model, data, output, *SWEEP)
    measured.clear()
    assert evaluate(model, data, output, *SWEEP) == first and measured == []
    write_image(frame_paths(folder, 2)[3], seed=999)
    capsys.readouterr()
    assert vqa(model, data, output, *SWEEP) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert "were made from other inputs (data: 4 samples, sha256 " in line and "--fresh" in line
    evaluate(model, data, output, *SWEEP, "--fresh")
    dycoke = "[3/3] dycoke k=0.7 decode_layer=2"
    assert measured == ["[1/3] unpruned", "[2/3] divprune keep=0.5", dycoke]


def test_images_and_videos_in_one_sweep_count_each_question_s_own(tmp_path):
    images, videos = write_jsonl(tmp_path / "images.jsonl"), write_video_jsonl(tmp_path / "v.jsonl")
    data = tmp_path / "mixed.jsonl"
    data.write_text(images.read_text() + videos.read_text())  # batch 2 holds both kinds
    model = save_tiny_video_vlm(tmp_path / "model", read_jsonl(data), "qwen2_vl_video")
    rows = evaluate(model, data, tmp_path / "out", "--methods", "divprune", "--budgets", "0.5")
    # Qwen2-VL: a 32 px image is 8 x 8 patches of 4 px, 2 x 2 merged (videos: video_tokens)
    image, (video, half_video, _) = (IMAGE_SIZE // 4 // 2) ** 2, video_tokens("qwen2_vl_video")
    questions = len(ROWS) + len(VIDEO_ROWS)
    unpruned = (len(ROWS) * image + len(VIDEO_ROWS) * video) / questions
    halved = (len(ROWS) * image // 2 + len(VIDEO_ROWS) * half_video) / questions
    assert [float(r["visual_tokens"]) for r in rows] == pytest.approx([unpruned, halved])
    assert {r["visual_tokens_per"] for r in rows} == {"image/video"}
    # MACs per reference image: the questions' videos are not all there is
    assert float(rows[0]["gmacs"]) == pytest.approx(tokcomp.macs(load_vlm(model)[0]) / 1e9)


# -- refusals ---------------------------------------------------------------------------------
def test_videos_on_a_family_without_videos_are_refused_naming_those_with(data, tmp_path, capsys):
    model = save_tiny_llava(tmp_path / "llava", read_jsonl(data))
    assert vqa(model, data, tmp_path / "out") == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert "tokcomp gives LlavaForConditionalGeneration no videos" in line
    assert f"({', '.join(video_classes())})" in line
    assert "LlavaOnevisionForConditionalGeneration, Qwen2VLForConditionalGeneration" in line


def test_a_processor_without_a_video_processor_is_refused(data):
    questions = read_jsonl(data)
    model, _ = tiny_video_vlm(questions, VIDEO_FAMILIES[0])
    with pytest.raises(ValueError, match="the processor of here has no video processor"):
        check_takes_videos(model, tiny_processor(questions), "here")


# -- MACs per video ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_unpruned_macs_on_a_video_are_the_video_specs(data, family):
    model, _ = tiny_video_vlm(read_jsonl(data), family)
    image = tokcomp.macs(model)
    video = tokcomp.macs(model, frames=FRAMES)
    config = tokcomp.config_of(tokcomp.apply(model, "divprune", keep=0.5), frames=FRAMES)
    tokcomp.remove(model)
    assert video == config.base_macs != image
    assert tokcomp.macs(tokcomp.apply(model, "divprune", keep=0.5), frames=FRAMES) == config.macs

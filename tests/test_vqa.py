"""The VQA harness: the official VQA accuracy and its answer normalisation, VQAv2 / JSON-lines /
easy-VQA data, and sweeps of visual-token methods on a tiny random LLaVA (unpruned first,
resume, forced answers scored exactly, torchrun)."""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as hf
from fixtures.vqa import (
    ROWS,
    VISUAL_TOKENS,
    force_answer,
    save_tiny_llava,
    tiny_llava,
    tiny_processor,
    write_jsonl,
    write_vqav2,
)
from tokenizers import Tokenizer, models
from vlm_fixtures import IMAGE, IMAGE_BREAK, IMAGE_END, PAD, VOCAB, collate, sample, tiny_vlm

import tokcomp
from tokcomp.cli import main
from tokcomp.harness import sweep, vqa
from tokcomp.harness.distributed import World
from tokcomp.harness.fingerprint import Fingerprint
from tokcomp.harness.results import ResultStore
from tokcomp.harness.vqa import VQATask, generate, generated_lengths, keep_budget
from tokcomp.harness.vqa_data import VQADataset, open_vqa, read_easy_vqa, read_jsonl, read_vqav2
from tokcomp.harness.vqa_metric import CONTRACTIONS, normalize_answer, vqa_accuracy

CPU = torch.device("cpu")
TESTS = Path(__file__).resolve().parent
METHODS = "zoo,divprune,fastv,visionzip,random"


# -- the metric -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("agreeing", "accuracy"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]
)
def test_the_official_consensus_cases(agreeing, accuracy):
    humans = ["2"] * agreeing + ["3"] * (10 - agreeing)
    assert vqa_accuracy("2", humans) == pytest.approx(accuracy)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("yes.", "yes"),  # a trailing period goes
        ("Yes", "yes"),
        ("  no\n", "no"),
        ("two", "2"),  # number words become digits
        ("None", "0"),
        ("ten dogs", "10 dogs"),
        ("the red ball", "red ball"),  # articles go
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions get their apostrophe
        ("isnt it", "isn't it"),
        ("1,000", "1000"),  # a comma between digits goes
        ("3.5", "3.5"),  # a period before a digit stays
        ("3.", "3"),
        ("black/white", "black white"),  # punctuation touching no space becomes a space
        ("red, white", "red white"),  # punctuation touching a space goes
        ("one-way", "1 way"),
        ("a.m.", "am"),
        ("what?!", "what"),
        ("2,3-dimethyl", "23dimethyl"),  # a digit-comma-digit deletes all punctuation
    ],
)
def test_prediction_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_yes_with_a_period_counts_as_yes():
    assert vqa_accuracy("yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 1.0
    assert vqa_accuracy("1,000", ["1000"] * 10) == 1.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0


def test_human_answers_get_punctuation_processing_only_when_they_disagree():
    # disagreeing humans: punctuation processed ("yes." -> "yes"), not words ("two" stays)
    assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("two", ["two"] * 3 + ["no"] * 7) == 0.0
    # unanimous humans are compared as they are (official annotations are pre-normalised)
    assert vqa_accuracy("yes", ["yes."] * 10) == 0.0


def test_fewer_than_ten_answers_score_by_exact_match():
    assert vqa_accuracy("Two.", ["2"]) == 1.0  # both sides normalised
    assert vqa_accuracy("blue", ["red", "blue"]) == 1.0
    assert vqa_accuracy("green", ["red", "blue"]) == 0.0
    assert vqa_accuracy("red", ["red"] * 9) == 1.0
    with pytest.raises(ValueError, match="at least one reference answer"):
        vqa_accuracy("red", [])


def official_accuracy(prediction, humans):
    """GT-Vision-Lab's vqaEval.py for one question, transcribed loop for loop (answers as the
    annotation dicts, each with its own id)."""
    punct = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<"]
    punct += ["@", "`", ",", "?", "!"]
    numbers = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4"}
    numbers |= {"five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}

    def punctuation(text):
        out = text
        for p in punct:
            touches = p + " " in text or " " + p in text
            out = out.replace(p, "" if touches or re.search(r"(\d)(,)(\d)", text) else " ")
        return re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, count=re.UNICODE)

    def digit_article(text):
        words = [numbers.get(w, w) for w in text.lower().split()]
        words = [w for w in words if w not in ("a", "an", "the")]
        return " ".join(CONTRACTIONS.get(w, w) for w in words)

    res = digit_article(punctuation(prediction.replace("\n", " ").replace("\t", " ").strip()))
    gts = [{"answer": a, "answer_id": i} for i, a in enumerate(humans)]
    if len({a["answer"] for a in gts}) > 1:
        for g in gts:
            g["answer"] = punctuation(g["answer"])
    accs = []
    for g in gts:
        others = [o for o in gts if o != g]
        accs.append(min(1, len([o for o in others if o["answer"] == res]) / 3))
    return sum(accs) / len(accs)


def test_accuracy_is_the_official_scripts_on_random_questions():
    texts = ["yes", "Yes.", "no", "2", "two", "a dog", "the Dog!", "1,000", "1000", "3.5"]
    texts += ["dont", "don't", "black/white", "black white", "red.", "(red)", "x-ray", "none"]
    rng = random.Random(0)
    for _ in range(3000):
        prediction = rng.choice(texts) + rng.choice(["", " ", "\n", "?"])
        humans = [rng.choice(texts) for _ in range(rng.choice([10, 11]))]
        expected = official_accuracy(prediction, humans)
        assert vqa_accuracy(prediction, humans) == pytest.approx(expected), (prediction, humans)


# -- data -------------------------------------------------------------------------------------
def test_vqav2_files_are_parsed(tmp_path):
    root = write_vqav2(tmp_path / "vqa")
    questions = read_vqav2(root)
    assert [q.question for q in questions] == [row[1] for row in ROWS]
    first = questions[0]
    assert first.image == root / "val2014" / "COCO_val2014_000000000001.jpg"
    assert first.answers == ("red",) * 10 and first.answer_type == "other"
    assert (first.question_type, first.question_id) == ("what", 100)
    assert questions[2].answers == ("two",) * 2 + ("2",) * 8
    moved = tmp_path / "elsewhere"
    (root / "val2014").rename(moved)
    assert read_vqav2(root, moved)[0].image == moved / "COCO_val2014_000000000001.jpg"


def test_vqav2_errors_name_the_files(tmp_path):
    root = write_vqav2(tmp_path / "vqa")
    annotations = next(root.glob("*annotations.json"))
    content = json.loads(annotations.read_text())
    content["annotations"] = content["annotations"][1:]
    annotations.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"question 100 of .*questions.json has no annotation"):
        read_vqav2(root)
    annotations.write_text("{}")
    with pytest.raises(ValueError, match="has no 'annotations'"):
        read_vqav2(root)
    annotations.unlink()
    with pytest.raises(FileNotFoundError, match=r"exactly one \*annotations.json file"):
        read_vqav2(root)


def test_jsonl_is_parsed(tmp_path):
    path = write_jsonl(tmp_path / "data" / "vqa.jsonl")
    questions = read_jsonl(path)
    assert len(questions) == len(ROWS)
    assert questions[4].image == tmp_path / "data" / "images" / "3.png"
    assert questions[4].answers == ("circle", "round") and questions[4].answer_type == "other"
    assert questions[4].question_id == 5  # the line number when none is given
    absolute = json.dumps({"image": str(questions[0].image), "question": "q?", "answers": ["a"]})
    path.write_text(absolute + "\n\n")  # an absolute path; blank lines are skipped
    [only] = read_jsonl(path)
    assert only.image == questions[0].image and only.answer_type is None
    path.write_text(absolute + "\n\n" + json.dumps({"image": "x.png", "answers": []}) + "\n")
    with pytest.raises(ValueError, match=r"vqa.jsonl:3: each line needs .*missing: \['question'"):
        read_jsonl(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"vqa.jsonl:1 is not a JSON object"):
        read_jsonl(path)
    typed = {"image": "x.png", "question": "q?", "answers": ["a"], "answer_type": 5}
    path.write_text(absolute + "\n" + json.dumps(typed) + "\n")
    with pytest.raises(ValueError, match=r"vqa.jsonl:2: 'answer_type' must be text, got 5"):
        read_jsonl(path)
    annotated = {"image": "x.png", "question": "q?", "answers": [{"answer": "yes"}, None]}
    path.write_text(json.dumps(annotated) + "\n")
    with pytest.raises(ValueError, match=r"vqa.jsonl:1: 'answers' must be a list of texts"):
        read_jsonl(path)


@pytest.mark.parametrize("layout", ["vqav2", "jsonl"])
def test_a_missing_image_is_named(tmp_path, layout, capsys):
    if layout == "vqav2":
        data = write_vqav2(tmp_path / "vqa")
        missing = data / "val2014" / "COCO_val2014_000000000002.jpg"
    else:
        data = write_jsonl(tmp_path / "vqa.jsonl")
        missing = tmp_path / "images" / "2.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"image {missing} of question .* does not exist"):
        open_vqa(str(data))
    assert main(["eval", "vqa", "--data", str(data), "--model", str(tmp_path)]) == 2
    assert f"image {missing} of question" in capsys.readouterr().err


def test_the_easy_vqa_test_split():
    questions = read_easy_vqa("test")
    assert len(questions) == 9673 and len({q.image for q in questions}) == 1000
    first = questions[0]
    assert (first.question, first.answers, first.answer_type) == (
        "what is the red shape?",
        ("triangle",),
        "other",
    )
    assert first.image.name == "0.png" and first.image.is_file()
    assert sum(q.answer_type == "yes/no" for q in questions) == 7136  # the dataset's count


def test_budgets_are_fractions_of_the_visual_tokens():
    assert keep_budget("zoo", 0.25) == "zoo:keep=0.25"
    assert keep_budget("fastv", 0.5) == "fastv:keep=0.5"
    assert keep_budget("random", 0.5) == "random:keep_ratio=0.5"
    assert keep_budget("random", 0.5, "keep") == "random:keep_ratio=0.5,positions=keep"
    assert keep_budget("zoo", 0.25, "renumber") == "zoo:keep=0.25,positions=renumber"
    with pytest.raises(ValueError, match=r"tome acts inside the vision tower.*--variant"):
        keep_budget("tome", 0.5)


def test_generated_lengths_stop_at_the_first_end_token():
    new = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 2, 5, 2]])
    assert generated_lengths(new, [2]).tolist() == [2, 4, 1, 2]


def _processor(family: str) -> object:
    """A processor of `family` on the fixtures' vocabulary (token i is "t<i>"): Mistral 3's
    Pixtral processor (it names the image-break and image-end tokens), else LLaVA-NeXT's."""
    names = {IMAGE: "[IMG]", IMAGE_BREAK: "[IMG_BREAK]", IMAGE_END: "[IMG_END]", PAD: "<pad>"}
    vocab = {names.get(i, f"t{i}"): i for i in range(VOCAB)}
    tokenizer = hf.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")), pad_token="<pad>"
    )
    if family == "mistral3":
        images = hf.PixtralImageProcessor()
        return hf.PixtralProcessor(images, tokenizer, patch_size=8, spatial_merge_size=2)
    return hf.LlavaNextProcessor(hf.LlavaNextImageProcessor(), tokenizer, image_token="[IMG]")


@pytest.mark.parametrize("family", ["mistral3", "llava_next", "llava_onevision"])
@pytest.mark.parametrize("method", [None, "divprune", "zoo"])
@torch.no_grad()
def test_visual_tokens_are_those_of_the_images_in_the_language_model_s_input(family, method):
    """Per sample, the "vis tok" figure is the language model's input less the prompt's text
    (Mistral 3's image-break and image-end tokens are the image's, as the schedule counts them;
    LLaVA-NeXT/OneVision's image-newline tokens are placeholders), unpruned and pruned."""
    model, processor = tiny_vlm(family), _processor(family)
    if method:
        tokcomp.apply(model, method, keep=0.5)
    image_tokens = torch.tensor([IMAGE, IMAGE_BREAK, IMAGE_END])
    lengths = []
    first_layer = model.get_decoder().layers[0]
    hook = first_layer.register_forward_pre_hook(
        lambda _, args, kwargs: lengths.append((args or [kwargs["hidden_states"]])[0].shape[1]),
        with_kwargs=True,
    )
    for seed in range(3):
        one = sample(model, family, 2, 3, seed)
        lengths.clear()
        kept = generate(model, processor, collate(family, [one]), CPU, 1).visual_tokens
        text = int((~torch.isin(one.input_ids, image_tokens)).sum())
        assert kept == lengths[0] - text, seed
    hook.remove()


# -- sweeps on a tiny random LLaVA ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """(JSON-lines data, tiny LLaVA folder)."""
    root = tmp_path_factory.mktemp("tiny")
    data = write_jsonl(root / "vqa.jsonl")
    return data, save_tiny_llava(root / "model", read_jsonl(data))


def evaluate(model: Path, data: Path, output: Path, *options: str) -> list[dict]:
    """Run `tokcomp eval vqa` (no worker processes); this run's rows from its CSV."""
    argv = ["--model", model, "--data", data, "--output", output, "--workers", 0]
    argv += ["--batch-size", 4, "--max-new-tokens", 2]
    assert main(["eval", "vqa", *map(str, argv), *options]) == 0
    with open(output / "results.csv") as handle:
        return list(csv.DictReader(handle))


def test_a_sweep_runs_end_to_end_unpruned_first(tiny, tmp_path, capsys):
    data, model = tiny
    rows = evaluate(model, data, tmp_path, "--methods", METHODS, "--budgets", "0.5")
    assert [(r["method"], r["label"]) for r in rows] == [("unpruned", "")] + [
        (m, "keep_ratio=0.5" if m == "random" else "keep=0.5") for m in METHODS.split(",")
    ]
    tokens = [float(r["visual_tokens"]) for r in rows]
    assert tokens == [VISUAL_TOKENS] + [VISUAL_TOKENS / 2] * 5
    for row in rows:
        assert int(row["samples"]) == len(ROWS) and 0 <= float(row["vqa"]) <= 100
        assert float(row["prefill_ms"]) > 0 and float(row["ttft_ms"]) >= float(row["prefill_ms"])
        assert float(row["macs_ratio"]) > 0 and {"vqa_yes_no", "vqa_number"} <= row.keys()
    table = capsys.readouterr().out
    assert "Δvqa" in table and "TTFT ms" in table and "vis tok" in table
    assert "q/s" in table and "img/s" not in table  # questions answered per second


def test_an_interrupted_sweep_resumes_to_the_uninterrupted_table(
    tiny, tmp_path, monkeypatch, capsys
):
    data, model = tiny
    options = ("--methods", "zoo", "--budgets", "0.5,0.25", "--variant", "divprune:keep=4")
    whole = evaluate(model, data, tmp_path / "whole", *options)
    measured, interrupted = [], []
    real_measure = sweep.measure

    def measure_until_ctrl_c(model, task, device, desc, *rest):
        if desc.startswith("[3/4]") and not interrupted:
            interrupted.append(desc)
            raise KeyboardInterrupt
        measured.append(desc)
        return real_measure(model, task, device, desc, *rest)

    monkeypatch.setattr(sweep, "measure", measure_until_ctrl_c)
    output = tmp_path / "out"
    argv = ["--model", model, "--data", data, "--output", output, "--workers", 0]
    argv += ["--batch-size", 4, "--max-new-tokens", 2, *options]
    assert main(["eval", "vqa", *map(str, argv)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"tokcomp eval vqa: interrupted: finished points are saved in {output}; "
        "the same command resumes"
    )
    measured.clear()
    resumed = evaluate(model, data, output, *options)
    assert measured == ["[3/4] zoo keep=0.25", "[4/4] divprune keep=4"]
    unchanged = ("method", "label", "vqa", "vqa_yes_no", "visual_tokens", "samples")
    assert [{k: r[k] for k in unchanged} for r in resumed] == [
        {k: r[k] for k in unchanged} for r in whole
    ]


@pytest.mark.parametrize(
    ("option", "named"),
    [(("--limit", "3"), "limit: none then, 3 now"), (("--prompt", " Answer:"), "prompt: ")],
)
def test_a_sweep_with_other_inputs_is_refused_naming_them(tiny, tmp_path, capsys, option, named):
    data, model = tiny
    evaluate(model, data, tmp_path, "--variant", "zoo:keep=4")
    argv = ["--model", model, "--data", data, "--output", tmp_path, "--workers", 0, *option]
    capsys.readouterr()
    assert main(["eval", "vqa", *map(str, argv)]) == 2
    line = capsys.readouterr().err.splitlines()[-1]  # after the model's loading bar
    assert "were made from other inputs (" in line and named in line and "--fresh" in line


def test_positions_without_budgets_is_refused(tiny, tmp_path, capsys):
    data, model = tiny
    argv = ["eval", "vqa", "--model", str(model), "--data", str(data), "--output", str(tmp_path)]
    assert main([*argv, "--variant", "zoo:keep=4", "--positions", "keep"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "tokcomp eval vqa: error: --positions numbers the visual tokens of --budgets points; "
        "give --budgets too, or positions=keep in each --variant"
    ]
    assert not (tmp_path / "results.jsonl").exists()


@pytest.mark.parametrize("types", [("yes/no", "yes-no"), ("other", "other_count")])
def test_answer_types_whose_metric_names_clash_are_refused(tmp_path, types):
    questions = read_jsonl(write_jsonl(tmp_path / "vqa.jsonl"))
    with pytest.raises(ValueError, match="give clashing metric names"):
        VQATask(VQADataset(questions), tiny_processor(questions), 4, 0, CPU, types)


def test_forced_answers_score_exactly_at_every_budget(tmp_path):
    questions = read_jsonl(write_jsonl(tmp_path / "vqa.jsonl"))
    processor = tiny_processor(questions)
    model = tiny_llava(processor)
    force_answer(model, processor.tokenizer.convert_tokens_to_ids("yes"))
    types = ("number", "other", "yes/no")
    task = VQATask(VQADataset(questions), processor, 4, 0, CPU, types, max_new_tokens=1)
    points = sweep.sweep_points(["zoo", "fastv"], [0.25], budget=keep_budget)
    evaluation = sweep.task_evaluation(task, CPU)
    plans = sweep.plan_points(model, points)
    rows = sweep.run_sweep(model, plans, evaluation, ResultStore(None, Fingerprint.of()))
    # "yes" scores 0.9 (3 of 10 humans say it) and 1 (the single answer); the others 0
    for row in rows:
        assert row["vqa"] == pytest.approx(100 * 1.9 / 6)
        assert row["vqa_yes_no"] == pytest.approx(100 * 1.9 / 3)
        assert row["vqa_number"] == row["vqa_other"] == 0.0
        assert row["tokens_per_s"] == 0.0  # one token each: nothing decoded after the first
    assert [row["visual_tokens"] for row in rows] == [16, 4, 4]


def test_a_rank_other_than_0_prints_and_writes_no_table(tiny, tmp_path, monkeypatch, capsys):
    """Every rank evaluates its shard; rank 0 alone writes the table, CSV and plot."""

    def report(*args, **kwargs):
        raise AssertionError("rank 1 wrote the report")

    data, model = tiny
    world = World(rank=1, size=2)
    monkeypatch.setattr(vqa, "start_run", lambda args: (world, torch.device("cpu")))
    monkeypatch.setattr(vqa, "evaluate_sweep", lambda *args, **kwargs: [])
    monkeypatch.setattr(vqa, "report", report)
    argv = ["--model", model, "--data", data, "--output", tmp_path, "--methods", "zoo"]
    assert main(["eval", "vqa", *map(str, argv), "--budgets", "0.5"]) == 0
    assert capsys.readouterr().out == ""


def test_two_processes_count_exactly_what_one_process_counts(tiny, tmp_path):
    data, model = tiny
    options = ["--methods", "zoo", "--budgets", "0.5", "--threads", "1", "--limit", "5"]
    one = evaluate(model, data, tmp_path / "one", *options)
    argv = ["-m", "tokcomp", "eval", "vqa", "--model", str(model), "--data", str(data)]
    argv += ["--output", str(tmp_path / "two"), "--workers", "0", "--batch-size", "2"]
    argv += ["--max-new-tokens", "2", *options]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{TESTS.parent}:{TESTS}"}
    run = subprocess.run([*torchrun, "--nproc_per_node", "2", *argv], env=env, timeout=600)
    assert run.returncode == 0
    two = [json.loads(line) for line in (tmp_path / "two" / "results.jsonl").open()]
    for a, b in zip(one, two, strict=True):
        assert b["world_size"] == 2 and b["samples"] == int(a["samples"]) == 5
        assert b["vqa"] == pytest.approx(float(a["vqa"]))
        assert b["visual_tokens"] == pytest.approx(float(a["visual_tokens"]))

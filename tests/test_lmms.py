"""tokcomp as an lmms-eval model (`--model tokcomp`) and `tokcomp eval lmms`, offline: the
local easy-VQA task through `python -m lmms_eval` answers question by question what
`tokcomp eval vqa` answers, the sweep resumes and refuses other inputs, bad input is one line.
Run with lmms-eval installed (make test-lmms); without it, only the refusal to run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec, module_from_spec, spec_from_file_location
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as hf
from PIL import Image

import tokcomp
from tokcomp.cli import main
from tokcomp.errors import UsageError
from tokcomp.harness import lmms, sweep
from tokcomp.harness.vqa import DEFAULT_MODEL, VQATask, load_vlm
from tokcomp.harness.vqa_data import VQADataset, read_easy_vqa

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "eval" / "lmms_tasks"
CPU = torch.device("cpu")
#: The easy-VQA test questions both paths answer (the first N: lmms-eval's --limit).
QUESTIONS = 512
BATCH = 16
HAS_LMMS = find_spec("lmms_eval") is not None
needs_lmms = pytest.mark.skipif(not HAS_LMMS, reason="lmms-eval is not installed (make lmms)")


def offline_env(home: Path) -> dict[str, str]:
    """This environment with the Hugging Face libraries offline and an empty cache."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(home),
        "PYTHONPATH": str(ROOT),
    }


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """This process with the Hugging Face libraries offline and lmms-eval's datasets cached
    in a temporary folder."""
    for name, value in offline_env(tmp_path / "hf").items():
        if name.startswith("HF_"):
            monkeypatch.setenv(name, value)


def lmms_eval_run(tmp: Path, model_args: str) -> tuple[dict, list[dict]]:
    """`python -m lmms_eval` with tokcomp's model on the local easy-VQA task: its results
    and its per-question samples."""
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "tokcomp",
        "--model_args",
        model_args,
        "--tasks",
        "easyvqa",
        "--include_path",
        str(TASKS),
        "--limit",
        str(QUESTIONS),
        "--batch_size",
        str(BATCH),
        "--device",
        "cpu",
        "--output_path",
        str(tmp / "out"),
        "--log_samples",
        "--verbosity",
        "DEBUG",
    ]
    done = subprocess.run(command, env=offline_env(tmp / "hf"), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = (tmp / "out").rglob("*_results.json")
    (samples,) = (tmp / "out").rglob("*_samples_easyvqa.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return json.loads(results.read_text()), rows


def harness_answers(method: str, **options: object) -> tuple[float, list[str], tokcomp.Config]:
    """`tokcomp eval vqa`'s accuracy and answers (its task, measured as its sweep measures)
    on the same questions, batch size and compression; and the compression's config."""
    model, processor = load_vlm(DEFAULT_MODEL)
    tokcomp.apply(model, method, **options)
    questions = VQADataset(read_easy_vqa("test")[:QUESTIONS])
    task = VQATask(questions, processor, BATCH, 0, CPU, ("other", "yes/no"))
    answers = []
    forward = task.forward

    def answering(model, inputs):
        generation = forward(model, inputs)
        answers.extend(generation.answers)
        return generation

    task.forward = answering
    figures = sweep.measure(model, task, CPU, f"tokcomp eval vqa, {method} {options}")
    return figures["vqa"], answers[BATCH:], tokcomp.config_of(model)  # after the warm-up batch


@needs_lmms
def test_lmms_eval_finds_tokcomp_through_its_entry_point():
    from importlib.metadata import entry_points

    from lmms_eval.models import get_model

    from tokcomp.harness.lmms_model import TokcompModel

    (entry,) = entry_points(group="lmms_eval.models", name="tokcomp")
    assert entry.value == "tokcomp.harness.lmms_plugin:manifest"
    assert get_model("tokcomp") is TokcompModel


@needs_lmms
def test_python_m_lmms_eval_answers_each_question_as_tokcomp_eval_vqa(tmp_path, offline):
    args = f"pretrained={DEFAULT_MODEL},method=zoo,keep=8"
    results, samples = lmms_eval_run(tmp_path, args)
    accuracy, answers, config = harness_answers("zoo", keep=8)
    assert [row["doc_id"] for row in samples] == list(range(QUESTIONS))
    assert [row["filtered_resps"] for row in samples] == answers
    assert sum(row["vqa"] < 100 for row in samples) > 0  # the wrong answers agree too
    assert results["results"]["easyvqa"]["vqa,none"] == pytest.approx(accuracy, abs=1e-9)
    assert results["config"]["model_args"] == args
    throughput = results["throughput"]
    assert throughput["avg_tokcomp_visual_tokens"] == 8
    assert throughput["avg_tokcomp_gmacs"] == pytest.approx(config.macs / 1e9)
    assert throughput["avg_tokcomp_macs_ratio"] == pytest.approx(config.macs_ratio)
    assert throughput["avg_tokcomp_selection_share"] == pytest.approx(config.selection_share)
    assert throughput["avg_tokcomp_ttft_ms"] >= throughput["avg_tokcomp_prefill_ms"] > 0


def sweep_run(output: Path, *options: str) -> list[dict]:
    """`tokcomp eval lmms` on the first 32 easy-VQA questions; its saved rows."""
    argv = ["eval", "lmms", "--tasks", "easyvqa", "--limit", "32", "--output", str(output)]
    assert main([*argv, *options]) == 0
    return [json.loads(line) for line in (output / "results.jsonl").read_text().splitlines()]


@needs_lmms
def test_a_sweep_runs_lmms_eval_at_each_point_resumes_and_plots(tmp_path, monkeypatch, offline):
    import lmms_eval.evaluator

    calls = []
    evaluate = lmms_eval.evaluator.simple_evaluate

    def counting(**kwargs):
        calls.append(tokcomp.is_patched(kwargs["model"].model))
        return evaluate(**kwargs)

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", counting)
    options = ("--methods", "zoo,random", "--budgets", "0.25", "--variant", "divprune:keep=8")
    out = tmp_path / "out"
    rows = sweep_run(out, *options)
    assert [row["method"] for row in rows] == ["unpruned", "zoo", "random", "divprune"]
    assert calls == [False, True, True, True]
    assert [row["visual_tokens"] for row in rows] == [64, 16, 16, 8]
    assert rows[0]["macs_ratio"] == 1.0 and rows[2]["macs_ratio"] < 1.0
    for row in rows:
        assert row["headlines"] == ["easyvqa/vqa"]
        assert 0 <= row["easyvqa/vqa"] <= 100 and row["samples"] == 32
        assert row["ttft_ms"] >= row["prefill_ms"] > 0 and row["peak_memory_mb"] > 0
        assert row["images_per_s"] == pytest.approx(row["samples"] / row["generate_s"])
        saved = json.loads((out / "lmms" / f"{row['key']}.json").read_text())
        assert saved["results"]["easyvqa"]["vqa,none"] == row["easyvqa/vqa"]
    assert (out / "results.png").stat().st_size > 0
    assert (out / "results.csv").read_text().startswith("method,label,gmacs")
    calls.clear()
    assert sweep_run(out, *options) == rows
    assert calls == []


def _point(method: str, label: str, documents_per_s: float, tokens: float) -> dict:
    """A saved row of `tokcomp eval lmms` (its figures made up)."""
    return {
        "method": method,
        "label": label,
        "headlines": ["easyvqa/vqa"],
        "easyvqa/vqa": 90.0,
        "gmacs": 1.0,
        "macs_ratio": tokens / 64,
        "selection_share": 0.0,
        "images_per_s": documents_per_s,
        "peak_memory_mb": 10.0,
        "visual_tokens": tokens,
        "prefill_ms": 1.0,
        "ttft_ms": 2.0,
        "tokens_per_s": 3.0,
        "samples": 32,
        "schedule": None,
    }


def test_the_table_s_throughput_column_counts_documents(tmp_path):
    """A document holds any number of images (or none): the column is headed doc/s, not
    img/s, and holds the rows' documents per second (the CSV's images_per_s)."""
    from tokcomp.harness.lmms import write_report

    rows = [_point("unpruned", "", 8.0, 64), _point("zoo", "keep=16", 20.0, 16)]
    header, _, *lines = write_report(rows, tmp_path, "t").splitlines()
    assert "doc/s" in header.split() and "img/s" not in header
    column = header.index("doc/s") + len("doc/s")
    assert [float(line[column - 10 : column]) for line in lines[:2]] == [8.0, 20.0]
    saved = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [float(row["images_per_s"]) for row in saved] == [8.0, 20.0]


@needs_lmms
def test_a_sweep_refuses_saved_rows_of_other_inputs(tmp_path, capsys, offline):
    out = tmp_path / "out"
    sweep_run(out)
    capsys.readouterr()
    argv = ["eval", "lmms", "--tasks", "easyvqa", "--limit", "16", "--output", str(out)]
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "made from other inputs (limit: 32 then, 16 now)" in line and "--fresh" in line


@needs_lmms
def test_log_samples_refuses_saved_points_without_samples_until_fresh(tmp_path, capsys, offline):
    """Resuming skips saved points: those saved without --log-samples are named, not passed
    over silently, and left as they are; --fresh evaluates them again with their samples,
    setting the earlier rows' lmms-eval outputs aside with them."""
    out = tmp_path / "out"
    options = ("--limit", "8", "--variant", "zoo:keep=8")
    saved = sweep_run(out, *options)
    results = (out / "results.jsonl").read_text()
    capsys.readouterr()
    argv = ["eval", "lmms", "--tasks", "easyvqa", "--output", str(out), *options]
    assert main([*argv, "--log-samples"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--log-samples: the points unpruned, zoo keep=8 are saved in" in line
    assert "without per-question samples" in line and "--fresh" in line
    assert (out / "results.jsonl").read_text() == results
    assert not list((out / "lmms").glob("*.jsonl"))
    earlier = {path.name: path.read_bytes() for path in (out / "lmms").iterdir()}
    logged = sweep_run(out, *options, "--log-samples", "--fresh")
    assert [row["key"] for row in logged] == [row["key"] for row in saved]
    (aside,) = out.glob("lmms.*")  # the set-aside rows' lmms-eval results, as they were
    assert {path.name: path.read_bytes() for path in aside.iterdir()} == earlier
    for row in logged:
        samples = (out / "lmms" / f"{row['key']}.easyvqa.jsonl").read_text().splitlines()
        assert len(samples) == 8
    assert sweep_run(out, *options, "--log-samples") == logged  # their samples are saved


@needs_lmms
def test_a_config_file_from_tokcomp_export_is_model_args_config(tmp_path):
    from tokcomp.harness.lmms_model import TokcompModel

    path = tmp_path / "zoo-8.yaml"
    assert main(["export", "--vlm", str(DEFAULT_MODEL), "zoo:keep=8", "-o", str(path)]) == 0
    lm = TokcompModel.create_from_arg_string(f"pretrained={DEFAULT_MODEL},config={path}")
    assert tokcomp.config_of(lm.model) == tokcomp.Config.load(path)


@pytest.fixture(scope="module")
def unsupported_vlm(tmp_path_factory) -> Path:
    """A tiny PaliGemma (a VLM family tokcomp does not compress) with the easy-VQA
    processor."""
    folder = tmp_path_factory.mktemp("paligemma")
    vision = hf.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    text = hf.GemmaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    config = hf.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=127)
    hf.PaliGemmaForConditionalGeneration(config).save_pretrained(folder)
    for path in DEFAULT_MODEL.iterdir():
        if "processor" in path.name or "token" in path.name or "template" in path.name:
            shutil.copy(path, folder / path.name)
    return folder


@needs_lmms
@pytest.mark.parametrize(
    ("model_args", "named"),
    [
        ("method=nope", "unknown method 'nope'; known methods: "),
        ("method=zoo,kep=16", "unknown model_args ['kep']: tokcomp takes pretrained, method"),
        ("keep=16", "unknown model_args ['keep']: tokcomp takes pretrained, method, config"),
        ("config=zoo.json,method=zoo", "config=zoo.json is a whole compression: drop method="),
    ],
)
def test_bad_model_args_are_one_line_before_the_model_loads(model_args, named, monkeypatch):
    from tokcomp.harness import lmms_model

    monkeypatch.setattr(lmms_model, "load_vlm", None)  # loading would fail differently
    with pytest.raises(ValueError) as refused:
        lmms_model.TokcompModel.create_from_arg_string(model_args)
    assert named in str(refused.value) and "\n" not in str(refused.value)


@needs_lmms
def test_an_unsupported_family_is_one_line_naming_the_supported_ones(unsupported_vlm, capsys):
    from tokcomp.harness.lmms_model import TokcompModel

    with pytest.raises(ValueError, match="a PaliGemmaForConditionalGeneration, a family tokcomp"):
        TokcompModel.create_from_arg_string(f"pretrained={unsupported_vlm},method=zoo,keep=4")
    argv = ["eval", "lmms", "--tasks", "easyvqa", "--model", str(unsupported_vlm)]
    assert main(argv) == 2
    (line,) = [text for text in capsys.readouterr().err.splitlines() if "error" in text]
    supported = line.split("choose a model of one it does: Hugging Face VLMs ")[1]
    assert "LlavaForConditionalGeneration" in supported.split(", ")
    assert "PaliGemma" not in supported


@needs_lmms
@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--tasks", "vqav2_val"], "task vqav2_val needs the dataset lmms-lab-encoder/VQAv2"),
        (["--tasks", "vqav2"], "task vqav2_val needs the dataset lmms-lab-encoder/VQAv2"),
        (["--tasks", "nope"], "unknown lmms-eval task(s) ['nope']: python -m lmms_eval --tasks"),
        (["--tasks", "easyvqa", "--model", "llava-hf/none"], "needs the model llava-hf/none"),
    ],
)
def test_what_needs_the_hub_offline_is_one_line_naming_the_fix(argv, named, capsys, offline):
    assert main(["eval", "lmms", *argv]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert named in line
    if "needs the" in line:
        assert "HF_HUB_OFFLINE is set; download it once" in line and "hf download" in line


@needs_lmms
def test_the_fingerprint_holds_the_files_of_a_group_s_and_a_tag_s_tasks(tmp_path):
    from tokcomp.harness.lmms import resolve_tasks, task_files, task_manager

    shutil.copytree(TASKS / "easyvqa", tmp_path / "easyvqa")
    config = tmp_path / "easyvqa" / "easyvqa.yaml"
    config.write_text(config.read_text() + "tag: easy_tag\n")
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "easy.yaml").write_text("group: easy_group\ntask:\n- easyvqa\n")
    manager = task_manager([tmp_path])
    names = ["easy_group", "easy_tag"]
    assert resolve_tasks(manager, names) == names
    before = task_files(manager, names)
    questions = tmp_path / "easyvqa" / "questions.jsonl"
    questions.write_text(questions.read_text().replace('"triangle"', '"square"', 1))
    after = task_files(manager, names)
    assert before["easyvqa"] != after["easyvqa"]
    assert before["easy_group"] == after["easy_group"]  # the group's own folder


@needs_lmms
def test_loglikelihood_scores_the_continuation_after_pruned_visual_tokens():
    from lmms_eval.api.instance import Instance

    from tokcomp.harness.lmms_model import HFVLM
    from tokcomp.harness.vqa_prompt import POST_PROMPT

    task = json.loads((TASKS / "easyvqa" / "questions.jsonl").read_text().splitlines()[0])
    model, processor = load_vlm(DEFAULT_MODEL)
    lm = HFVLM(model, processor, "cpu")
    lm.task_dict = {"easyvqa": {"test": [task]}}
    context = task["question"] + POST_PROMPT

    def scores():
        requests = [
            Instance(
                "loglikelihood",
                (context, answer, _visual, 0, "easyvqa", "test"),
                i,
                {"task": "easyvqa", "doc_id": 0, "repeats": 1},
            )
            for i, answer in enumerate(["triangle", "circle"])
        ]
        (right, greedy), (wrong, other) = lm.loglikelihood(requests)
        assert greedy and not other  # the model answers "triangle"
        return right, wrong

    unpruned = scores()
    assert unpruned[0] > unpruned[1]
    tokcomp.apply(model, "divprune", keep=64)  # keeps every visual token: the same scores
    assert scores() == pytest.approx(unpruned)
    tokcomp.apply(model, "zoo", keep=8)
    pruned = scores()
    assert pruned != pytest.approx(unpruned) and pruned[0] > pruned[1]


@needs_lmms
@pytest.mark.parametrize("method", ["fastv", "pyramiddrop"])
def test_loglikelihood_scores_an_answer_with_the_visual_tokens_its_context_chose(method):
    """FastV and PyramidDrop rank visual tokens by the prompt's last text token: in one pass
    over context and answer that was the answer's own last token, so each choice was scored
    with visual tokens it chose (8 of 12 best choices changed)."""
    from tokcomp.harness.lmms_model import HFVLM
    from tokcomp.harness.vqa_prompt import encode

    docs = [json.loads(line) for line in (TASKS / "easyvqa" / "questions.jsonl").open()][:3]
    model, processor = load_vlm(DEFAULT_MODEL)
    tokcomp.apply(model, method, keep=4)
    lm = HFVLM(model, processor, "cpu")
    lm.task_dict = {"easyvqa": {"test": docs}}
    for answer in ("circle", "triangle"):  # one token each
        requests = _requests("loglikelihood", docs, _visual, answer)
        scores = [score for score, _ in lm.loglikelihood(requests)]
        for request, score in zip(requests, scores, strict=True):
            context, images = request.args[0], [_visual(docs[request.args[3]])]
            with torch.no_grad():
                logits = model(**encode(processor, [context], images)).logits[0, -1]
            token = encode(processor, [context], images, [answer])["input_ids"][0, -1]
            assert score == pytest.approx(logits.float().log_softmax(-1)[token].item(), abs=1e-4)


@needs_lmms
@pytest.mark.parametrize("kind", ["generate_until", "loglikelihood"])
def test_a_task_text_that_places_its_images_is_refused(kind):
    """lmms-eval's own models split such text at <image>; tokcomp puts the images first, so
    on a Qwen processor the mark stayed as text and the image moved, silently."""
    from tokcomp.harness.lmms_model import HFVLM

    docs = [json.loads(line) for line in (TASKS / "easyvqa" / "questions.jsonl").open()][:1]
    docs[0]["question"] = "<image> " + docs[0]["question"]
    model, processor = load_vlm(DEFAULT_MODEL)
    lm = HFVLM(model, processor, "cpu")
    lm.task_dict = {"easyvqa": {"test": docs}}
    second = {"max_new_tokens": 2} if kind == "generate_until" else " yes"
    with pytest.raises(UsageError, match=r"places its images with <image> .* non-interleaved"):
        getattr(lm, kind)(_requests(kind, docs, _visual, second))


@needs_lmms
def test_generation_options_follow_do_sample_and_keep_the_penalties():
    """A task's do_sample: false with a temperature sampled; top_k and repetition_penalty
    were dropped."""
    from tokcomp.harness.lmms_model import _sampling

    greedy = _sampling({"do_sample": False, "temperature": 0.5, "repetition_penalty": 1.2})
    assert greedy == {"do_sample": False, "num_beams": 1, "repetition_penalty": 1.2}
    sampled = _sampling({"temperature": 0.2, "top_p": 0.9, "top_k": 20})
    assert sampled == {
        "do_sample": True,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "num_beams": 1,
    }
    assert _sampling({}) == {"do_sample": False, "num_beams": 1}


def _requests(kind: str, docs: list[dict], visual, second=None) -> list:
    """lmms-eval's requests of `kind` for the easy-VQA documents `docs` (doc ids 0...):
    `second` is each request's continuation or generation options."""
    from lmms_eval.api.instance import Instance

    from tokcomp.harness.vqa_prompt import POST_PROMPT

    return [
        Instance(
            kind,
            (doc["question"] + POST_PROMPT, second or {}, visual, i, "easyvqa", "test"),
            0,
            {"task": "easyvqa", "doc_id": i, "repeats": 1},
        )
        for i, doc in enumerate(docs)
    ]


@needs_lmms
def test_loglikelihood_requests_count_their_visual_tokens_and_time():
    from tokcomp.harness.lmms_model import HFVLM

    docs = [json.loads(line) for line in (TASKS / "easyvqa" / "questions.jsonl").open()][:3]
    model, processor = load_vlm(DEFAULT_MODEL)
    tokcomp.apply(model, "zoo", keep=8)
    lm = HFVLM(model, processor, "cpu")
    lm.task_dict = {"easyvqa": {"test": docs}}
    scores = lm.loglikelihood(_requests("loglikelihood", docs, _visual, " yes"))
    assert len(scores) == 3
    tally = lm.tallies["easyvqa"]
    assert (tally.requests, tally.images) == (3, 3)
    figures = tally.figures()
    assert figures["visual_tokens"] == 8  # as generate_until counts them: the pruned model's
    assert figures["ttft_ms"] >= figures["prefill_ms"] > 0 and lm.peak_bytes > 0


@needs_lmms
def test_a_text_only_task_is_answered_without_images():
    from tokcomp.harness.lmms_model import HFVLM

    docs = [json.loads(line) for line in (TASKS / "easyvqa" / "questions.jsonl").open()][:4]
    model, processor = load_vlm(DEFAULT_MODEL)
    options = {"max_new_tokens": 4, "until": ["\n\n"]}

    def answers(visual) -> tuple[list[str], list]:
        lm = HFVLM(model, processor, "cpu", 2)
        lm.task_dict = {"easyvqa": {"test": docs}}
        texts = lm.generate_until(_requests("generate_until", docs, visual, options))
        return texts, lm.loglikelihood(_requests("loglikelihood", docs, visual, " yes"))

    # lmms-eval's doc_to_visual of a task without one gives None; a document without its
    # image (a None column) gives [None]
    without = answers(lambda doc: [])
    assert answers(lambda doc: None) == without
    assert answers(lambda doc: [None]) == without
    assert without != answers(_visual)


@needs_lmms
def test_a_16_bit_grayscale_image_reaches_the_model_with_its_contrast():
    """Pillow opens a 16-bit grayscale image as "I;16", whose conversion to RGB clipped every
    value above 255 (a white picture)."""
    from tokcomp.harness.lmms_model import HFVLM

    docs = [json.loads(line) for line in (TASKS / "easyvqa" / "questions.jsonl").open()][:1]
    gray = _visual(docs[0])[0].convert("L")
    deep = Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)
    assert deep.mode == "I;16"
    lm = HFVLM(*load_vlm(DEFAULT_MODEL), "cpu", 2)
    lm.task_dict = {"easyvqa": {"test": docs}}
    (request,) = _requests("generate_until", docs, lambda doc: [deep])
    (seen,) = lm._images(request)
    assert np.array_equal(np.asarray(seen), np.asarray(gray.convert("RGB")))


def _visual(doc: dict) -> list:
    """The easy-VQA task's images of a document (its doc_to_visual)."""
    spec = spec_from_file_location("easyvqa_utils", TASKS / "easyvqa" / "utils.py")
    functions = module_from_spec(spec)
    spec.loader.exec_module(functions)
    return functions.doc_to_visual(doc)


@pytest.mark.skipif(HAS_LMMS, reason="lmms-eval is installed here")
def test_without_lmms_eval_the_command_says_how_to_install_it(capsys):
    assert main(["eval", "lmms", "--tasks", "easyvqa"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "lmms-eval is not installed here: pip install 'tokcomp[lmms]'" in line


def test_a_missing_include_path_is_refused_in_one_line(tmp_path, capsys):
    """It was ignored (exit 0), and a task inside a mistyped folder was 'unknown'."""
    argv = ["eval", "lmms", "--tasks", "easyvqa", "--include-path", str(tmp_path / "tasks")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"--include-path: {tmp_path / 'tasks'}: no such folder" in line


def test_speed_repeats_is_not_an_option_of_the_command(tmp_path, capsys):
    """The command runs no speed probe (its speed figures time lmms-eval's own generation):
    --speed-repeats is not offered, so giving it is refused before any work, not ignored."""
    argv = ["eval", "lmms", "--tasks", "easyvqa", "--limit", "1", "--output", str(tmp_path)]
    assert main([*argv, "--speed-repeats", "3"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "unrecognized arguments: --speed-repeats 3" in line
    assert not (tmp_path / "results.jsonl").exists()
    main(["eval", "lmms", "--help"])
    assert "--speed-repeats" not in capsys.readouterr().out


def test_the_local_task_holds_every_easy_vqa_test_question():
    rows = [json.loads(line) for line in (TASKS / "easyvqa" / "questions.jsonl").open()]
    questions = read_easy_vqa("test")
    assert len(rows) == len(questions) == 9673
    for row, question in zip(rows, questions, strict=True):
        assert row["question"] == question.question
        assert row["answers"] == list(question.answers)
        assert row["answer_type"] == question.answer_type
        assert question.image.as_posix().endswith(row["image"])


def test_a_tasks_headline_is_its_first_metric_under_its_filter_or_its_first_number():
    """lmms-eval keys scores 'metric,filter': a named filter (illusionvqa's flexible-extract)
    and a first metric that is a submission file, not a number (vqav2_test), both had no
    'task/metric' score and the table failed on them."""
    results = {
        "results": {
            "illusionvqa": {
                "exact_match,flexible-extract": 41.0,
                "exact_match_stderr,flexible-extract": 2.0,
            },
            "vqav2_test": {"submission,none": None, "exact_match,none": 70.5},
            "easyvqa": {"vqa,none": 98.0},
        },
        "configs": {
            "illusionvqa": {"metric_list": [{"metric": "exact_match"}]},
            "vqav2_test": {"metric_list": [{"metric": "submission"}, {"metric": "exact_match"}]},
            "easyvqa": {"metric_list": [{"metric": "vqa"}]},
        },
    }
    scores = lmms.task_scores(results)
    heads = lmms.headlines(results, scores)
    assert heads == [
        "illusionvqa/exact_match/flexible-extract",
        "vqav2_test/exact_match",
        "easyvqa/vqa",
    ]
    assert [scores[head] for head in heads] == [41.0, 70.5, 98.0]

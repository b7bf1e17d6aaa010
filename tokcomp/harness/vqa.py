"""VQA evaluation under a sweep of compression settings (`tokcomp eval vqa`): the official VQA
accuracy (overall and per answer type), visual tokens kept per image or video, LLM prefill
time, time to first token and decoding speed of a Hugging Face VLM, unpruned and with every
visual-token method at every budget (a fraction of each image's or video's visual tokens).

Data (--data): the official VQAv2 layout, a folder holding one *questions.json, one
*annotations.json and the COCO images (<folder>/<data_subtype>/COCO_<data_subtype>_<12-digit
image id>.jpg, or --images DIR); a JSON-lines file, one question a line:
{"image": PATH, "question": TEXT, "answers": [TEXT, ...], optional "answer_type",
"question_type", "question_id"}, or for a question on a video, "video": [FRAME PATH, ...] (its
frames in order, all of one size) in place of "image" (paths relative to the file's folder or
absolute); or "easy-vqa" (the test split, read from the installed easy-vqa package's files;
answer types "yes/no" and "other"); or "video-shapes" (tokcomp.harness.video_shapes's 250
test clips, answered by default by eval/models/vlm-videoshapes). Video questions need a model
whose family tokcomp gives videos (`families.video_classes()`) and a processor with a video
processor. MACs
are per reference image, or per reference video of F frames (tokcomp.config_of(model,
frames=F)) when every question shows an F-frame video.

Generation: the model's own processor and chat template, one user turn (the image or the
video, then the question followed by lmms-eval's short-answer prompt), left padding, greedy
decoding of at most --max-new-tokens tokens; a video's frames go to the processor as one
(frames, height, width, 3) RGB array in `videos=`. Timings are per question at the batch size
(each question's figure is its batch's): LLM prefill = the first pass through the decoder
layers; time to first token = from generate() to the first token's logits (vision tower,
projector, token selection and prefill); tokens/s = tokens decoded after the first one over
the time from the first token to the end of generate() (0 when none followed). The table's
throughput column, q/s (`images_per_s` in the CSV), is questions answered per second: the
first batch's questions (one image or video each) over its median whole generate() call, and
the speed-up races those calls: each stops at its answers' end, so a method that makes answers
longer or shorter counts in it, as in serving (eval/bench_vlm_generate.py fixes the count).
Visual tokens ("vis tok") are those of the image or video in the language model's input, as
the schedule and MACs count them: its placeholders less those tokcomp pruned (LLaVA-NeXT's and
LLaVA-OneVision's image-newline tokens are placeholders, always kept), plus Mistral 3's
image-break and image-end tokens (text tokens of the prompt, always kept).
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tokcomp import visual_tokens_dropped
from tokcomp.adapters import find_adapter
from tokcomp.adapters.hf_vlm.families import video_classes
from tokcomp.errors import UsageError
from tokcomp.harness import hub
from tokcomp.harness.arguments import DTYPES, non_negative_int, positive_int
from tokcomp.harness.data import EASY_VQA, VIDEO_SHAPES, data_source, describe, limited
from tokcomp.harness.fingerprint import Fingerprint, folder_digest, samples_digest
from tokcomp.harness.results import Column, report
from tokcomp.harness.sweep import (
    Point,
    SpeedProbe,
    SweepRun,
    add_run_arguments,
    add_sweep_arguments,
    evaluate_sweep,
    quiet,
    start_run,
    sweep_points,
    task_evaluation,
)
from tokcomp.harness.timing import FirstToken, PrefillTimer, now
from tokcomp.harness.vqa_data import Question, answer_types, open_vqa
from tokcomp.harness.vqa_metric import vqa_accuracy
from tokcomp.harness.vqa_prompt import POST_PROMPT, Prompts
from tokcomp.methods import VisualMethod, method_class
from tokcomp.methods.visual import POSITIONS

#: The repository's offline default model (eval/train_vlm_easyvqa.py trains it).
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "eval" / "models" / "vlm-easyvqa"
#: The offline default VLM of --data video-shapes (a small LLaVA-OneVision trained on it).
VIDEO_MODEL = DEFAULT_MODEL.with_name("vlm-videoshapes")
#: The script that trains each offline default VLM.
TRAINED_BY = {
    DEFAULT_MODEL: "eval/train_vlm_easyvqa.py",
    VIDEO_MODEL: "eval/train_vlm_videoshapes.py",
}

#: The table columns of a VLM task (lmms-eval's too).
COLUMNS = (
    Column("visual_tokens", "vis tok"),
    Column("prefill_ms", "prefill ms", ".2f"),
    Column("ttft_ms", "TTFT ms", ".2f"),
    Column("tokens_per_s", "tok/s"),
)
#: The header of the throughput column: each question (one image or video) answered.
RATE = "q/s"
#: After "vis tok" in a VQA table: what a question's visual tokens are counted on.
VISUAL_UNIT = Column("visual_tokens_per", "counted per", "")


def axes(unit: str) -> tuple[tuple[str, str], ...]:
    """The plot's axes for questions on `unit` ('image', 'video' or 'image/video')."""
    return (("visual_tokens", f"visual tokens per {unit}"), ("ttft_ms", "time to first token (ms)"))


#: The plot's axes of questions on images (lmms-eval's tasks).
AXES = axes("image")


# -- generation -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """One batch's generate call: the decoded answers, the visual tokens of all its images and
    videos that reached the language model, and its timings (seconds)."""

    answers: list[str]
    visual_tokens: int
    prefill_s: float
    ttft_s: float
    decode_s: float
    decode_tokens: int


def visual_tokens_kept(cache: object, input_ids: torch.Tensor, visual_ids: list[int]) -> int:
    """Visual tokens of the whole batch that the language model holds after the prefill: the
    prompt's tokens of `visual_ids` (`visual_token_ids`), less those tokcomp pruned (its record
    on the generation's cache, one row per beam or sequence, each prompt counted once; FastV:
    the layers after K)."""
    ids = torch.tensor(visual_ids, device=input_ids.device)
    visual = int(torch.isin(input_ids, ids).sum())
    dropped = visual_tokens_dropped(cache)
    if dropped is None:
        return visual
    copies = dropped.shape[0] // input_ids.shape[0]
    return visual - int(dropped[::copies].sum())


#: Budget options that are the share of the visual tokens kept (what --budgets gives).
KEPT_FRACTIONS = ("keep", "keep_ratio")

#: The processor attributes naming an image's text tokens (not placeholders, so always kept)
#: that the schedule counts as visual: Mistral 3's image-break and image-end tokens.
TEXT_VISUAL = ("image_break_token_id", "image_end_token_id")

#: Greedy decoding, the harness's generation.
GREEDY = {"do_sample": False, "num_beams": 1}


def on_device(inputs: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A processor's batch on `device`, its pixels (of images and videos) in the model's
    `dtype`."""
    inputs = inputs.to(device)
    for name in ("pixel_values", "pixel_values_videos"):
        if name in inputs:
            inputs[name] = inputs[name].to(dtype)
    return inputs


def generate(
    model: nn.Module,
    processor: Any,
    inputs: Mapping[str, torch.Tensor],
    device: torch.device,
    max_new_tokens: int,
    sampling: Mapping[str, Any] = GREEDY,
) -> Generation:
    """The answers of one batch (`sampling`: generate's decoding options), timed, with the
    visual tokens its language model kept."""
    from transformers import LogitsProcessorList

    first = FirstToken(device)
    tokenizer = processor.tokenizer
    with PrefillTimer(model.get_decoder().layers, device) as prefill:
        start = now(device)
        out = model.generate(
            **inputs,
            **sampling,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            logits_processor=LogitsProcessorList([first]),
            return_dict_in_generate=True,
        )
        end = now(device)
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    lengths = generated_lengths(new, _eos_ids(model, tokenizer))
    return Generation(
        answers=processor.batch_decode(new, skip_special_tokens=True),
        visual_tokens=visual_tokens_kept(
            out.cache, inputs["input_ids"], visual_token_ids(model, processor)
        ),
        prefill_s=prefill.seconds,
        ttft_s=first.at - start,
        decode_s=end - first.at,
        decode_tokens=int((lengths - 1).clamp_min(0).sum()),
    )


def visual_token_ids(model: nn.Module, processor: Any) -> list[int]:
    """The token ids of the visual tokens in prompts `processor` encodes for `model`: its image
    and video placeholders and the image's text tokens of `TEXT_VISUAL` (those it has)."""
    config = model.config
    found = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    found += [getattr(processor, name, None) for name in TEXT_VISUAL]
    return [token for token in found if token is not None]


def generated_lengths(new_tokens: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """(B,) tokens each sample generated, up to and including its first end-of-sequence
    token (generate pads the samples that finished early)."""
    ended = torch.isin(new_tokens, torch.tensor(list(eos), device=new_tokens.device))
    after = ended.long().cumsum(dim=1) - ended.long()
    return (after == 0).sum(dim=1)


# -- the task ---------------------------------------------------------------------------------
def type_metric(answer_type: str) -> str:
    """The metric name of an answer type's accuracy ('yes/no' -> 'vqa_yes_no')."""
    return "vqa_" + re.sub(r"\W+", "_", answer_type).strip("_")


class VQATask:
    """Open-ended VQA by greedy generation: VQA accuracy (overall, per answer type), visual
    tokens per question (its image or video) and the timings of the module docstring."""

    def __init__(
        self,
        dataset: Dataset,
        processor: Any,
        batch_size: int,
        workers: int,
        device: torch.device,
        answer_types: Sequence[str] = (),
        max_new_tokens: int = 16,
        post_prompt: str = POST_PROMPT,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        processor.tokenizer.padding_side = "left"
        self.processor, self.device, self.dtype = processor, device, dtype
        self.answer_types = tuple(answer_types)
        self.max_new_tokens = max_new_tokens
        self.metrics = ("vqa", *map(type_metric, self.answer_types))
        counts = tuple(f"{name}_count" for name in self.metrics[1:])
        timing = ("visual_tokens", "prefill_s", "ttft_s", "decode_s", "decode_tokens")
        self.tallies = (*self.metrics, *counts, *timing)
        if len(set(self.tallies)) < len(self.tallies):
            raise ValueError(
                f"answer types {list(self.answer_types)} give clashing metric names "
                f"({', '.join(self.metrics[1:])}); make them differ in letters or digits"
            )
        self.loader = DataLoader(
            dataset,
            batch_size,
            num_workers=workers,
            collate_fn=Prompts(processor, post_prompt),
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.loader)

    def batches(self) -> Iterator[tuple[Mapping[str, torch.Tensor], list[Question]]]:
        """(processor outputs on the device, questions) batches."""
        for inputs, questions in self.loader:
            yield on_device(inputs, self.device, self.dtype), questions

    def forward(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> Generation:
        """Greedy answers of one batch, timed."""
        return generate(model, self.processor, inputs, self.device, self.max_new_tokens)

    def score(self, outputs: Generation, targets: Sequence[Question]) -> dict[str, float]:
        """Accuracy sums (overall, per answer type, with the type counts) and timing sums."""
        accuracy = [
            vqa_accuracy(answer, question.answers)
            for answer, question in zip(outputs.answers, targets, strict=True)
        ]
        tallies = {"vqa": sum(accuracy)}
        for kind, name in zip(self.answer_types, self.metrics[1:], strict=True):
            chosen = [a for a, q in zip(accuracy, targets, strict=True) if q.answer_type == kind]
            tallies[name], tallies[f"{name}_count"] = sum(chosen), len(chosen)
        questions = len(targets)
        return {
            **tallies,
            "visual_tokens": outputs.visual_tokens,
            "prefill_s": outputs.prefill_s * questions,
            "ttft_s": outputs.ttft_s * questions,
            "decode_s": outputs.decode_s,
            "decode_tokens": outputs.decode_tokens,
        }

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        """Accuracies (percent), visual tokens per question, per-question timings (ms) and
        decoding tokens/s from the totals of every batch and rank."""
        questions = totals["samples"]
        typed = {
            name: 100.0 * totals[name] / max(totals[f"{name}_count"], 1)
            for name in self.metrics[1:]
        }
        decode_s = totals["decode_s"]
        return {
            "vqa": 100.0 * totals["vqa"] / questions,
            **typed,
            "visual_tokens": totals["visual_tokens"] / questions,
            "prefill_ms": 1000.0 * totals["prefill_s"] / questions,
            "ttft_ms": 1000.0 * totals["ttft_s"] / questions,
            "tokens_per_s": totals["decode_tokens"] / decode_s if decode_s > 0 else 0.0,
        }


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """The token ids that end a generation (the model's generation config, else the
    tokenizer's)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


# -- budgets, model, command line -------------------------------------------------------------
def keep_budget(method: str, budget: float, positions: str | None = None) -> str:
    """A --budgets entry of a VQA sweep, as a variant: keep `budget` of each image's or
    video's visual tokens (the method's keep, or random's keep_ratio), numbered as `positions`
    says (None: the method's default)."""
    try:
        option = kept_share_option(method)
    except ValueError as err:
        raise ValueError(f"--budgets keep a fraction of the visual tokens; {err}") from None
    numbering = f",positions={positions}" if positions else ""
    return f"{method}:{option}={budget}{numbering}"


def kept_share_option(method: str) -> str:
    """The option of visual-token method `method` that sets the share of the visual tokens it
    keeps; a method without one is refused, naming its own options instead."""
    cls = method_class(method)
    if not issubclass(cls, VisualMethod):
        raise ValueError(
            f"{method} acts inside the vision tower: give its own options with --variant "
            f"(e.g. {method}:r=4)"
        )
    if cls.budget not in KEPT_FRACTIONS:
        default = cls.__dataclass_fields__[cls.budget].default
        raise ValueError(
            f"{method}'s budget {cls.budget} is not the share it keeps: give it with --variant "
            f"(e.g. {method}:{cls.budget}={default})"
        )
    return cls.budget


def load_vlm(source: str | Path, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """(model in eval mode, processor) of a local Hugging Face VLM folder or of a hub id (from
    the local Hugging Face cache, or downloaded); dtype "auto" keeps the checkpoint's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    where = model_location(source)
    processor = AutoProcessor.from_pretrained(where)
    weights_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model, loading = AutoModelForImageTextToText.from_pretrained(
        where, dtype=weights_dtype, output_loading_info=True
    )
    missing = sorted(loading["missing_keys"])
    if missing:  # transformers initialises them at random and only prints a report
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise UsageError(
            f"model {where} lacks weights its architecture needs ({shown}), which would be "
            "random: give the folder with its complete weights"
        )
    return model.eval(), processor


def model_location(source: str | Path) -> str:
    """What from_pretrained loads for `source`: a local folder with config.json, or a hub id
    that is cached or can be downloaded; else one line naming the fix."""
    folder = Path(source).expanduser()
    if (folder / "config.json").is_file():
        return str(folder)
    if not folder.exists() and hub.is_repo_id(str(source)):
        needed_by = f"--model {source} (no folder {folder} here, so a hub id)"
        hub.require(str(source), "model", "pass a local model folder", needed_by)
        return str(source)
    script = TRAINED_BY.get(folder.resolve())
    hint = f" train it: python {script}; or" if script else ""
    raise FileNotFoundError(
        f"no model in {folder} (config.json missing);{hint} pass a local Hugging Face VLM "
        "folder with its processor files, or a hub id such as llava-hf/llava-1.5-7b-hf"
    )


def model_identity(source: str | Path, model: nn.Module) -> str:
    """What identifies the weights of `source` in a fingerprint: a local folder's file
    contents, or a hub model's commit."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return f"files {folder_digest(folder)}"
    return f"hub {source}@{getattr(model.config, '_commit_hash', None)}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp eval vqa`."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        type=Path,
        help="local Hugging Face VLM folder (weights, config, processor files) or hub id; "
        "default: the offline video-shapes LLaVA-OneVision (eval/models/vlm-videoshapes) for "
        "--data video-shapes, else the offline easy-VQA LLaVA (eval/models/vlm-easyvqa)",
    )
    model.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="load the model's weights in this dtype"
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        help=f"{EASY_VQA} (its test split), {VIDEO_SHAPES} (its test clips), a .jsonl file "
        "(questions on images or videos), or "
        "a VQAv2 folder (questions and annotations JSON, images in <folder>/<data_subtype>/)",
    )
    data.add_argument("--images", type=Path, help="VQAv2: the COCO image folder")
    data.add_argument(
        "--limit", type=positive_int, help="evaluate N questions spread over the data"
    )
    data.add_argument("--batch-size", type=positive_int, default=16)
    data.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--max-new-tokens", type=positive_int, default=16)
    generation.add_argument(
        "--prompt", default=POST_PROMPT, help="text after each question (default: lmms-eval's)"
    )
    add_visual_sweep_arguments(parser)
    parser.set_defaults(run=run)


def add_visual_sweep_arguments(parser: argparse.ArgumentParser, speed_probe: bool = True) -> None:
    """The sweep and run options of a VLM task: --budgets keep fractions of the visual tokens,
    --positions numbers them (see `keep_budget`); --speed-repeats where it runs a speed probe."""
    sweep = add_sweep_arguments(
        parser,
        budgets="fractions of each image's or video's visual tokens to keep, e.g. 0.5,0.25,0.125",
        methods="zoo,divprune,fastv,visionzip,random",
        variant="zoo:keep=64",
    )
    sweep.add_argument(
        "--positions",
        choices=POSITIONS,
        help="with --budgets: number every method's kept visual tokens this way (default: "
        "each method's own; keep = original position ids, renumber = contiguous)",
    )
    add_run_arguments(parser, speed_probe)


def visual_points(args: argparse.Namespace) -> list[Point]:
    """The points of a VLM sweep's arguments (see `add_visual_sweep_arguments`)."""
    if args.positions and not args.budgets:
        raise UsageError(
            "--positions numbers the visual tokens of --budgets points; give --budgets too, "
            f"or positions={args.positions} in each --variant"
        )
    budget = functools.partial(keep_budget, positions=args.positions)
    return sweep_points(args.methods, args.budgets, args.variant, args.config, budget)


def default_model(data: str) -> Path:
    """The offline default VLM for a --data value: the video-shapes model for its task, else the
    easy-VQA LLaVA."""
    return VIDEO_MODEL if data_source(data).kind == VIDEO_SHAPES else DEFAULT_MODEL


def run(args: argparse.Namespace) -> None:
    """Evaluate the sweep the arguments describe, print its table, save its results.
    Under torchrun the questions are sharded over the ranks and rank 0 alone writes."""
    points = visual_points(args)
    args.model = args.model or default_model(args.data)
    world, device = start_run(args)
    dataset = limited(open_vqa(args.data, args.images), args.limit)
    model, processor = load_vlm(args.model, args.dtype)
    if "video" in dataset.visual_unit:
        check_takes_videos(model, processor, args.model)
    model.to(device)
    types = answer_types(dataset)
    name = f"{args.model.name}-{data_source(args.data).name}"
    output = args.output or Path("results") / name
    threads = torch.get_num_threads()
    say = print if world.is_main else quiet
    say(f"model {args.model}; data {args.data}: {describe(dataset)}")
    say(
        f"{len(points)} points on {device} x {world.size} process(es), {threads} threads, "
        f"batch {args.batch_size}, {args.dtype}; results in {output}"
    )
    task = VQATask(
        world.shard(dataset),
        processor,
        args.batch_size,
        args.workers,
        device,
        types,
        args.max_new_tokens,
        args.prompt,
        getattr(torch, args.dtype),
    )
    unit = dataset.visual_unit
    settings = dict(
        device=str(device),
        threads=threads,
        batch_size=args.batch_size,
        speed_repeats=args.speed_repeats,
        visual_tokens_per=unit,
    )
    sweep = SweepRun(output, _fingerprint(args, model, dataset, device), device, args.fresh)
    evaluation = task_evaluation(task, device, world, SpeedProbe(args.speed_repeats))
    rows = evaluate_sweep(model, points, evaluation, sweep, settings, world, dataset.video_frames)
    # rows saved before tokcomp recorded the unit: the same questions, so the same unit
    rows = [{"visual_tokens_per": unit, **row} for row in rows]
    columns = (COLUMNS[0], VISUAL_UNIT, *COLUMNS[1:])
    if world.is_main:  # rank 0 alone writes the table, CSV and plot
        print(report(rows, task.metrics, output, name, columns, axes(unit), rate=RATE))


def check_takes_videos(model: nn.Module, processor: Any, source: str | Path) -> None:
    """Raise ValueError unless tokcomp gives `model` videos and `processor` encodes them."""
    if not find_adapter(model).spec().takes_videos:
        raise ValueError(
            f"the data has questions on videos, and tokcomp gives {type(model).__name__} no "
            f"videos: use a model of a family that takes them ({', '.join(video_classes())})"
        )
    if getattr(processor, "video_processor", None) is None:
        raise ValueError(
            f"the data has questions on videos, and the processor of {source} has no video "
            "processor: save the model's processor with its video processor (e.g. "
            "LlavaOnevisionProcessor, Qwen2VLProcessor)"
        )


def _fingerprint(
    args: argparse.Namespace, model: nn.Module, dataset: Dataset, device: torch.device
) -> Fingerprint:
    """What decides this run's numbers: the model's weights, dtype, generation options,
    the questions with their image or frame files, and the device type."""
    return Fingerprint.of(
        task="vqa",
        model=args.model.resolve().name,
        weights=model_identity(args.model, model),
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        prompt=args.prompt,
        limit=args.limit,
        data=samples_digest(dataset),
        device=device.type,
    )

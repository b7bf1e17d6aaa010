"""tokcomp as an lmms-eval model: `python -m lmms_eval --model tokcomp --model_args
pretrained=PATH_OR_HUB_ID,method=zoo,keep=64[,option=value...] --tasks ...` evaluates any
Hugging Face VLM of a family tokcomp supports with that compression (`config=FILE`: a saved
config instead of method and options; neither: the unpruned model), batched with left padding,
through the model's own processor and chat template (the prompts of `tokcomp eval vqa`).

lmms-eval finds it through the Python entry-point group `lmms_eval.models` (setup.py names
tokcomp.harness.lmms_plugin.manifest), which its model registry reads when it starts
(lmms_eval/models/registry_v2.py, `load_entrypoint_manifests`): installing tokcomp beside
lmms-eval is all it takes.

Besides lmms-eval's scores, each run logs through lmms-eval's throughput metrics (the
results file's "throughput" section, averaged over its generate and log-likelihood calls):
the visual tokens per image the language model kept, MACs per image (the method's own work
included), their ratio to the unpruned model, LLM prefill time and time to first token per
request (a log-likelihood request's: its forward pass), and the peak memory of the first
batch (run once more before, untimed, as the VQA harness does).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from PIL import Image
from torch import nn
from transformers import LogitsProcessorList

from tokcomp.adapters.hf_vlm.adapter import HFVLMAdapter
from tokcomp.bench import peak_memory
from tokcomp.errors import UsageError
from tokcomp.harness.data import eight_bit
from tokcomp.harness.sweep import Point, compression
from tokcomp.harness.timing import PrefillTimer, now
from tokcomp.harness.vqa import (
    DEFAULT_MODEL,
    GREEDY,
    generate,
    load_vlm,
    on_device,
    visual_token_ids,
    visual_tokens_kept,
)
from tokcomp.harness.vqa_prompt import encode
from tokcomp.methods import method_class, option_names

#: The model_args tokcomp's model takes besides the method's options.
MODEL_ARGS = ("pretrained", "method", "config", "dtype", "device", "batch_size")
#: New tokens when a task's generation_kwargs set no max_new_tokens (lmms-eval's HF models').
MAX_NEW_TOKENS = 1024


@dataclass
class Tally:
    """What one task's requests cost: requests, images, visual tokens the language model
    kept, and time (seconds; prefill and time to first token per request, as the VQA
    harness counts them)."""

    requests: int = 0
    images: int = 0
    visual_tokens: int = 0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    generate_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens: int = 0

    def add(self, other: Tally) -> None:
        """Add `other`'s counts to these."""
        for field in fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def figures(self) -> dict[str, float]:
        """Visual tokens per image, prefill and time to first token per request (ms), decoding
        tokens/s and generation time (s)."""
        requests = max(self.requests, 1)
        return {
            "visual_tokens": self.visual_tokens / max(self.images, 1),
            "prefill_ms": 1000.0 * self.prefill_s / requests,
            "ttft_ms": 1000.0 * self.ttft_s / requests,
            "tokens_per_s": self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0,
            "generate_s": self.generate_s,
        }


class HFVLM(lmms):
    """An lmms-eval model around a loaded Hugging Face VLM and its processor (patched by
    tokcomp or not): image tasks, batched in the order lmms-eval gives the requests."""

    def __init__(
        self, model: nn.Module, processor: Any, device: str | None = None, batch_size: int = 1
    ) -> None:
        super().__init__()
        _refuse_processes()
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._model = model.to(self._device)
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.batch_size = _batch_size(batch_size)
        self.tallies: dict[str, Tally] = {}
        self.peak_bytes: int | None = None

    @property
    def model(self) -> nn.Module:
        """The Hugging Face model."""
        return self._model

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's answer: the model's greedy (or sampled, as the task asks) text, cut
        at the task's stop strings."""
        answers = [""] * len(requests)
        run = Tally()
        for indices, batch in self._batches(requests):
            contexts = [request.args[0] for request in batch]
            options = batch[0].args[1]
            images = [self._images(request) for request in batch]
            call = functools.partial(self._generate, contexts, images, options)
            outputs = self._tallied(call, batch[0].args[4], run)
            for index, text in zip(indices, outputs, strict=True):
                answers[index] = text
        self._log(run)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Each request's continuation: its log-probability after the context, and whether
        greedy decoding would produce it; tallied (one forward pass is its prefill and time to
        first token) as generate_until's requests are."""
        run = Tally()
        scores = [
            self._tallied(functools.partial(self._loglikelihood, request), request.args[4], run)
            for request in requests
        ]
        if requests:
            self._log(run)
        return scores

    def _tallied(self, call: Callable[[], tuple[Any, Tally]], task: str, run: Tally) -> Any:
        """What `call` returns beside its tally, which is added to `task`'s and to `run`; the
        first call of all is preceded by a warm-up that measures peak memory, as the VQA
        harness measures it."""
        if self.peak_bytes is None:
            self.peak_bytes = peak_memory(call, self.device)
        result, tally = call()
        self.tallies.setdefault(task, Tally()).add(tally)
        run.add(tally)
        return result

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        """Multi-round tasks are not supported."""
        raise UsageError(
            "tokcomp's lmms-eval model answers single-round tasks (generate_until and "
            "loglikelihood); choose tasks without multi-round generation"
        )

    def _batches(self, requests: list[Instance]) -> Iterator[tuple[list[int], list[Instance]]]:
        """(positions, requests) batches of up to batch_size requests of one task, split and
        generation options, in lmms-eval's order (so batches match the VQA harness's)."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            _, options, _, _, task, split = request.args
            groups.setdefault(repr((task, split, sorted(options.items()))), []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                yield chunk, [requests[i] for i in chunk]

    def _images(self, request: Instance) -> list[Image.Image]:
        """The images of a request's document, in RGB (none for a text-only task or document:
        lmms-eval's doc_to_visual gives None there, or None for a missing image)."""
        doc_to_visual, doc_id, task, split = request.args[2:]
        found = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
        visuals = [visual for visual in found or [] if visual is not None]
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise UsageError(
                    f"task {task} gives a {type(visual).__name__} where tokcomp's lmms-eval "
                    "model takes images (PIL); choose image tasks"
                )
        return [eight_bit(visual, f"{task} document {doc_id}").convert("RGB") for visual in visuals]

    def _generate(
        self, contexts: list[str], images: list[list[Image.Image]], options: Mapping[str, Any]
    ) -> tuple[list[str], Tally]:
        """The answers of one batch and what they cost."""
        _refuse_inline_images(contexts)
        inputs = on_device(encode(self.processor, contexts, images), self.device, self.dtype)
        new_tokens = int(options.get("max_new_tokens", MAX_NEW_TOKENS))
        generation = generate(
            self.model, self.processor, inputs, self.device, new_tokens, _sampling(options)
        )
        requests = len(contexts)
        tally = Tally(
            requests=requests,
            images=sum(map(len, images)),
            visual_tokens=generation.visual_tokens,
            prefill_s=generation.prefill_s * requests,
            ttft_s=generation.ttft_s * requests,
            generate_s=generation.ttft_s + generation.decode_s,
            decode_s=generation.decode_s,
            decode_tokens=generation.decode_tokens,
        )
        stops = _stops(options.get("until"))
        return [_cut(answer, stops) for answer in generation.answers], tally

    @torch.inference_mode()
    def _loglikelihood(self, request: Instance) -> tuple[tuple[float, bool], Tally]:
        """A request's (log-probability, greedy) and what its passes cost. The continuation is
        decoded after a prefill of the context alone, as generate would decode it: a method
        that chooses visual tokens by the prompt's last text token (FastV, PyramidDrop) sees
        the context's, not the scored answer's (in one pass over both, each answer chose the
        visual tokens it was scored with)."""
        context, continuation, _, doc_id, task, split = request.args
        if callable(continuation):
            continuation = continuation(self.task_dict[task][split][doc_id])
        images = [self._images(request)]
        _refuse_inline_images([context])
        prompt = encode(self.processor, [context], images)
        target = encode(self.processor, [context], images, [continuation])["input_ids"]
        length = prompt["input_ids"].shape[1]
        target = target[0, length:].to(self.device)
        inputs = on_device(prompt, self.device, self.dtype)
        with PrefillTimer(self.model.get_decoder().layers, self.device) as prefill:
            start = now(self.device)
            out = self.model.generate(
                **inputs,
                **GREEDY,
                max_new_tokens=len(target),
                pad_token_id=self.processor.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([_Forced(target, length)]),
                output_logits=True,
                return_dict_in_generate=True,
            )
            seconds = now(self.device) - start
        if len(out.logits) != len(target):
            raise UsageError(
                f"the continuation {continuation!r} holds the end-of-sequence token before its "
                "last token, where decoding stops: it cannot be scored token by token"
            )
        predicted = torch.cat(out.logits).float().log_softmax(-1)
        chosen = predicted.gather(-1, target[:, None]).sum()
        visual_ids = visual_token_ids(self.model, self.processor)
        kept = visual_tokens_kept(out.cache, inputs["input_ids"], visual_ids)
        tally = Tally(
            requests=1,
            images=len(images[0]),
            visual_tokens=kept,
            prefill_s=prefill.seconds or 0.0,
            ttft_s=seconds,
            generate_s=seconds,
        )
        return (float(chosen), bool((predicted.argmax(-1) == target).all())), tally

    @property
    def dtype(self) -> torch.dtype:
        """The model's floating-point type (its pixels are cast to it)."""
        return next(self.model.parameters()).dtype

    def _log(self, run: Tally) -> None:
        """One record of this generate call in lmms-eval's throughput metrics."""
        plan = compression(self.model)
        figures = {
            "gmacs": plan["gmacs"],
            "macs_ratio": plan["macs_ratio"],
            "selection_share": plan["selection_share"],
            "peak_memory_mb": (self.peak_bytes or 0) / 2**20,
        }
        log_metrics(
            total_elapsed_time=run.generate_s,
            total_gen_tokens=run.decode_tokens + run.requests,
            avg_speed=run.figures()["tokens_per_s"],
            additional_metrics={
                "tokcomp_method": plan["method"],
                **{f"tokcomp_{k}": v for k, v in {**run.figures(), **figures}.items()},
            },
        )


class TokcompModel(HFVLM):
    """`--model tokcomp`: a Hugging Face VLM loaded from `pretrained` (a local folder or a hub
    id) in `dtype` ("auto": the checkpoint's), compressed by `method` with `options` or by a
    saved `config` file (neither: unpruned)."""

    def __init__(
        self,
        pretrained: str = str(DEFAULT_MODEL),
        method: str | None = None,
        config: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        **options: Any,
    ) -> None:
        point = requested_point(method, config, options)
        model, processor = load_vlm(pretrained, dtype)
        refuse_unsupported(model, pretrained)
        point.apply_to(model)
        super().__init__(model, processor, device, batch_size)


def requested_point(method: str | None, config: str | None, options: dict[str, Any]) -> Point:
    """The compression model_args ask for, checked before any model is loaded."""
    if config is not None:
        if method is not None or options:
            raise UsageError(
                f"config={config} is a whole compression: drop method= and the options "
                f"{sorted(options)}, or drop config="
            )
        return Point(Path(config).name, config=Path(config))
    if method is None:
        if options:
            raise UsageError(
                f"unknown model_args {sorted(options)}: tokcomp takes {', '.join(MODEL_ARGS)} "
                "and, with method=NAME, that method's options"
            )
        return Point("")
    valid = option_names(method_class(method))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UsageError(
            f"unknown model_args {unknown}: tokcomp takes {', '.join(MODEL_ARGS)} and the "
            f"options of method {method}: {', '.join(valid)}"
        )
    return Point(",".join(f"{k}={v}" for k, v in options.items()), method, options)


def refuse_unsupported(model: nn.Module, pretrained: str) -> None:
    """One line naming the supported families when tokcomp cannot patch `model`."""
    if not HFVLMAdapter.recognises(model):
        raise UsageError(
            f"pretrained={pretrained} is a {type(model).__name__}, a family tokcomp does not "
            f"compress; choose a model of one it does: {HFVLMAdapter.supported}"
        )


def _refuse_processes() -> None:
    """tokcomp's lmms-eval model runs in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "tokcomp's lmms-eval model runs in one process: launch python -m lmms_eval "
            "without accelerate or torchrun (one GPU per run)"
        )


def _batch_size(value: int | str) -> int:
    """lmms-eval's --batch_size as a whole number (auto is refused)."""
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise UsageError(f"--batch_size {value}: give a whole number of at least 1")
    return size


def _sampling(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """generate's decoding options for a task's generation_kwargs: sampling where it sets
    do_sample, or else a temperature above 0 (its do_sample: false wins over a temperature, as
    in lmms-eval's llava_onevision); top_p and top_k when sampling; num_beams and
    repetition_penalty either way."""
    temperature = float(options.get("temperature") or 0.0)
    shared = {"num_beams": int(options.get("num_beams") or 1)}
    if options.get("repetition_penalty") is not None:
        shared["repetition_penalty"] = float(options["repetition_penalty"])
    if not options.get("do_sample", temperature > 0):
        return {**GREEDY, **shared}
    sampled = {"temperature": temperature or 1.0, "top_p": options.get("top_p")}
    if options.get("top_k") is not None:
        sampled["top_k"] = int(options["top_k"])
    return {"do_sample": True, **sampled, **shared}


#: Where an interleaved task's text places an image (MMMU's interleaved format, mmmu_pro).
IMAGE_MARK = "<image>"


def _refuse_inline_images(contexts: Sequence[str]) -> None:
    """Refuse task text that places its images itself: tokcomp puts a request's images before
    its text, so they would move (a Qwen processor keeps the mark as plain text)."""
    if any(IMAGE_MARK in context for context in contexts):
        raise UsageError(
            f"this task's text places its images with {IMAGE_MARK} (an interleaved format), "
            "and tokcomp's lmms-eval model puts every image before the text: run the task's "
            "non-interleaved variant"
        )


class _Forced:
    """A logits processor that makes generate pick `target`'s tokens in turn after a prompt of
    `start` tokens (the raw logits, which generate also returns, are left as the model gave
    them)."""

    def __init__(self, target: torch.Tensor, start: int) -> None:
        self.target = target
        self.start = start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Every token but the target's next one to -inf."""
        forced = torch.full_like(scores, -torch.inf)
        forced[:, self.target[input_ids.shape[1] - self.start]] = 0
        return forced


def _stops(until: str | Sequence[str] | None) -> list[str]:
    """A task's stop strings as a list."""
    if until is None:
        return []
    return [until] if isinstance(until, str) else list(until)


def _cut(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of `stops`."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text

"""Speed of visual-token pruning on a LLaVA-1.5-shaped VLM with random weights (speed does not
depend on them): CLIP ViT-L/14-336 tower (24 layers, width 1024, 576 patch tokens), an MLP
projector and LLaMA-7B-wide decoder layers (hidden 4096, MLP 11008, 32 heads); one image and
a 40-token prompt; fp32 on the CPU, one thread by default. The model is built on the meta
device and materialised without the slow default init. 16 decoder layers when free memory
allows, else 12 (said in the output).

Measured in the same run, medians of interleaved repeats after a warm-up, each repeat one
generate(max_new_tokens=1) per variant (unpruned; ZOO-Prune at 64 of 576 visual tokens: its
default, whose second-layer product is bfloat16 where the CPU multiplies it in hardware, the
float32 product, and sketch=256), forward hooks timing the vision tower and the language model
in it. A speed-up is the median of the per-round ratios against the unpruned run of the same
round, with their spread ("?": too wide to trust, tokcomp.harness.timing):
- LLM prefill: the language model on the 616-token prompt vs the 104-token pruned one.
  Floor: 4x.
- Time to first token (vision tower, ZOO-Prune's selection and the prefill), ZOO-Prune's
  default. Floor: 2.5x.
- ZOO-Prune's own cost (sensitivity and greedy selection) per variant as a share of the
  unpruned LLM prefill, and each variant's agreement with the float32 scores on a few random
  images: Spearman rank correlation of the sensitivities, overlap of the 64 most sensitive
  tokens, and the Jaccard index of the 64 kept tokens; "float32 seed=1" (other random
  directions) is the method's own noise, the yardstick for the others.
- Greedy max-min at N=576, k=64: the reference loop vs the dispatched op.

    python eval/bench_vlm.py                 # about 5-10 minutes on 2 (shared) cores
    python eval/bench_vlm.py --layers 1 --repeats 1 --images 1    # a quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # script_args
from script_args import script_parser

import tokcomp
from tokcomp.bench import timed
from tokcomp.harness.arguments import positive_int
from tokcomp.harness.timing import TRUSTED_SPREAD, Contender, Speedup, interleaved
from tokcomp.methods import VisualTokens, create_method
from tokcomp.ops import cosine_distances, greedy_maxmin, greedy_maxmin_reference

PROMPT, KEEP, IMAGE_TOKEN = 40, 64, 32000
CPU = torch.device("cpu")
PREFILL_FLOOR, TTFT_FLOOR = 4.0, 2.5
#: ZOO-Prune's settings compared with the float32 product (the exact scores), by label.
AGREEMENT = {
    "default": {},
    "float32 seed=1": {"precision": "float32", "seed": 1},
    **{f"sketch={size}": {"sketch": size} for size in (64, 256, 1024)},
}


def build(layers: int) -> nn.Module:
    """The LLaVA-1.5-shaped model with `layers` decoder layers, random weights, eval mode."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        image_seq_length=576,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = Llava(config)
    model.to_empty(device="cpu")
    materialise(model)
    return model.eval()


@torch.no_grad()
def materialise(model: nn.Module) -> None:
    """Cheap random weights (N(0, 0.02), norms at one) and the buffers the meta build left
    empty (position ids, rotary frequencies)."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            param.normal_(0.0, 0.02)
    for module in model.modules():
        if hasattr(module, "position_ids") and hasattr(module, "num_positions"):
            module.position_ids.copy_(torch.arange(module.num_positions).expand(1, -1))
        if hasattr(module, "inv_freq"):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            module.inv_freq.copy_(inv_freq)
            module.original_inv_freq.copy_(inv_freq)


def layers_that_fit() -> int:
    """16 decoder layers when about 16 GB (weights plus headroom) are free, else 12."""
    from pathlib import Path

    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    free_gb = int(meminfo["MemAvailable"].split()[0]) / 2**20
    return 16 if free_gb > 17.5 else 12


def inputs() -> dict[str, torch.Tensor]:
    """One 336x336 image and a 40-token prompt (a system part, the 576 image tokens, text)."""
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(2, 30000, (PROMPT,), generator=generator)
    ids = torch.cat([text[:20], torch.full((576,), IMAGE_TOKEN), text[20:]])[None]
    pixels = torch.randn(1, 3, 336, 336, generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


class Stopwatch:
    """Forward hooks timing the vision tower and the language model inside each run."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.spent: dict[str, float] = {}
        self._started: dict[str, float] = {}
        for label, module in modules.items():
            module.register_forward_pre_hook(lambda *_, k=label: self._start(k))
            module.register_forward_hook(lambda *_, k=label: self._stop(k))

    def _start(self, label: str) -> None:
        self._started[label] = time.perf_counter()

    def _stop(self, label: str) -> None:
        self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - self._started[label]

    def run(self, forward: Callable[[], Any]) -> dict[str, float]:
        """Seconds of `forward` in all ("total") and in each timed module."""
        self.spent = {}
        _, total = timed(forward, CPU)
        return {"total": total, **self.spent}


def first_token_runs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Contender]:
    """generate(max_new_tokens=1): unpruned, ZOO default, float32 product and sketched, each
    applying or removing its patch before the timed call."""

    def generate() -> Any:
        return model.generate(**batch, max_new_tokens=1, do_sample=False)

    def patching(method: dict[str, Any] | None) -> Contender:
        def prepare() -> None:
            if tokcomp.is_patched(model):
                tokcomp.remove(model)
            if method is not None:
                tokcomp.apply(model, "zoo", **method)

        return Contender(generate, prepare)

    return {
        "unpruned": patching(None),
        "zoo default": patching({"keep": KEEP}),
        "zoo float32": patching({"keep": KEEP, "precision": "float32"}),
        "zoo sketch=256": patching({"keep": KEEP, "sketch": 256}),
    }


def rounds(
    runs: dict[str, Contender], watch: Stopwatch, repeats: int
) -> dict[str, list[dict[str, float]]]:
    """Per run, the seconds of each part in each of `repeats` interleaved rounds after a
    warm-up round (tokcomp.harness.timing), in round order: the runs of a round pair up."""
    parts: dict[str, list[dict[str, float]]] = {label: [] for label in runs}

    def recorded(label: str, run: Contender) -> Contender:
        return Contender(lambda: parts[label].append(watch.run(run.forward)), run.prepare)

    interleaved([recorded(label, run) for label, run in runs.items()], repeats, CPU, warmup=1)
    return {label: records[1:] for label, records in parts.items()}  # the warm-up dropped


def medians(records: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per run, the median seconds of each part over its rounds."""
    return {
        label: {part: statistics.median(r[part] for r in rows) for part in rows[0]}
        for label, rows in records.items()
    }


def speedup(records: dict[str, list[dict[str, float]]], label: str, part: str) -> Speedup:
    """The speed-up of `label`'s `part` over the unpruned run's: the median of the per-round
    ratios, with their spread."""
    return Speedup.paired([r[part] for r in records["unpruned"]], [r[part] for r in records[label]])


def floors_hold(prefill: Speedup, first: Speedup) -> bool:
    """Whether ZOO's prefill and time-to-first-token speed-ups both reach their floors with a
    spread narrow enough to trust."""
    reached = prefill.ratio >= PREFILL_FLOOR and first.ratio >= TTFT_FLOOR
    return reached and prefill.trusted and first.trusted


def ratio_text(speedup: Speedup) -> str:
    """'2.76x (spread 3.1%)', with '?' for 'x' when the spread is too wide to trust."""
    return f"{speedup.ratio:.2f}{'x' if speedup.trusted else '?'} (spread {speedup.spread:.1%})"


def visual_tokens(model: nn.Module, pixels: torch.Tensor) -> VisualTokens:
    """What ZOO-Prune sees for `pixels`: penultimate-layer features and projector outputs."""
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    features = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    chain = (projector.linear_1, projector.act, projector.linear_2)
    return VisualTokens(projector(features), chain, features=features)


def agreement(model: nn.Module, images: int) -> tuple[dict[str, float], list[tuple]]:
    """ZOO-Prune's selection on `images` random images with the float32 product and with each
    setting of AGREEMENT: the median seconds of each, and per setting the mean Spearman
    correlation of its sensitivities with the float32 ones, the mean overlap of the 64 most
    sensitive tokens and the mean Jaccard index of the 64 kept tokens."""
    generator = torch.Generator().manual_seed(1)
    methods = {"float32": create_method("zoo", keep=KEEP, precision="float32")}
    methods |= {label: create_method("zoo", keep=KEEP, **opts) for label, opts in AGREEMENT.items()}
    seconds: dict[str, list[float]] = {label: [] for label in methods}
    stats: dict[str, list[tuple[float, float, float]]] = {label: [] for label in methods}
    for _ in range(images):
        visual = visual_tokens(model, torch.randn(1, 3, 336, 336, generator=generator))
        results = {}
        for label, method in methods.items():
            start = time.perf_counter()
            scores = method.sensitivity(visual)
            results[label] = (scores[0], method.choose(visual, scores, KEEP)[0])
            seconds[label].append(time.perf_counter() - start)
        reference, chosen = results.pop("float32")
        for label, (scores, picked) in results.items():
            top = _overlap(reference.topk(KEEP).indices, scores.topk(KEEP).indices)
            stats[label].append((_spearman(reference, scores), top, _jaccard(chosen, picked)))
    means = [
        (label, *(statistics.mean(column) for column in zip(*rows, strict=True)))
        for label, rows in stats.items()
        if rows
    ]
    return {label: statistics.median(values) for label, values in seconds.items()}, means


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / len(a)


def _jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    first, second = set(a.tolist()), set(b.tolist())
    return len(first & second) / len(first | second)


def greedy_runs(visual: VisualTokens) -> dict[str, Callable]:
    """Greedy max-min at N=576, k=64: the reference loop and the dispatched op."""
    dist = cosine_distances(visual.outputs)
    weight, first = torch.rand(dist.shape[:2]), torch.zeros(1, dtype=torch.long)
    return {
        "max-min reference": lambda: greedy_maxmin_reference(dist, weight, first, KEEP),
        f"max-min {tokcomp.backend()}": lambda: greedy_maxmin(dist, weight, first, KEEP),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The script's options."""
    parser = script_parser(__doc__)
    parser.add_argument(
        "--layers", type=positive_int, default=None, help="decoder layers (default: fit)"
    )
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (1: on a shared 2-core machine the second core is busy elsewhere, "
        "and the pruned prefill's short matmuls scale worse over two)",
    )
    parser.add_argument(
        "--images", type=positive_int, default=3, help="images for ZOO's cost and sketch"
    )
    return parser.parse_args(argv)


def first_token_records(
    model: nn.Module, batch: dict[str, torch.Tensor], repeats: int
) -> dict[str, list[dict[str, float]]]:
    """`rounds` of `first_token_runs`, timing the vision tower and the LLM prefill in each."""
    inner = model.model
    watch = Stopwatch({"tower": inner.vision_tower, "prefill": inner.language_model})
    return rounds(first_token_runs(model, batch), watch, repeats)


def greedy_medians(model: nn.Module, pixels: torch.Tensor) -> dict[str, float]:
    """Median seconds of five calls of each of `greedy_runs` on the visual tokens of `pixels`."""
    visual = visual_tokens(model, pixels)
    return {
        label: statistics.median(timed(run, CPU)[1] for _ in range(5))
        for label, run in greedy_runs(visual).items()
    }


def print_times(times: dict[str, dict[str, float]]) -> None:
    """The median milliseconds of each run's first token, vision tower and LLM prefill."""
    print(f"{'':16s} {'first token':>12s} {'vision tower':>13s} {'LLM prefill':>12s}")
    for label, parts in times.items():
        print(
            f"{label:16s} {parts['total'] * 1e3:10.0f} ms {parts['tower'] * 1e3:10.0f} ms "
            f"{parts['prefill'] * 1e3:10.0f} ms",
            flush=True,
        )


def print_speedups(
    records: dict[str, list[dict[str, float]]], config: tokcomp.Config
) -> tuple[Speedup, Speedup]:
    """The MACs and the speed-ups against the floors; ZOO default's prefill and
    time-to-first-token speed-ups."""
    prefill = speedup(records, "zoo default", "prefill")
    first = speedup(records, "zoo default", "total")
    others = ", ".join(
        f"{label}: {ratio_text(speedup(records, label, 'total'))}"
        for label in records
        if label not in ("unpruned", "zoo default")
    )
    print(
        f"MACs (tower + projector + prefill): {config.base_macs / 1e12:.2f} T unpruned, "
        f"{config.macs / 1e12:.2f} T at 64 visual tokens, ZOO's selection included "
        f"({config.macs_ratio:.3f})"
    )
    print(
        f"LLM prefill speed-up at 64/576 visual tokens: {ratio_text(prefill)} "
        f"(floor {PREFILL_FLOOR}x)"
    )
    print(
        f"time to first token speed-up, ZOO default: {ratio_text(first)} (floor {TTFT_FLOOR}x); "
        f"{others}"
    )
    print(
        f'"?": the per-round speed-ups spread over more than {TRUSTED_SPREAD:.0%} of their '
        "median (IQR)"
    )
    return prefill, first


def print_selection_costs(costs: dict[str, float], unpruned_prefill: float) -> None:
    """ZOO-Prune's product dtype here, and each setting's selection time against the
    unpruned LLM prefill's."""
    product = create_method("zoo").product_dtype(CPU)
    print(f"ZOO default's second-layer product here: {product}")
    for label, seconds in costs.items():
        print(
            f"ZOO {label:14s} selection {seconds * 1e3:8.0f} ms = "
            f"{seconds / unpruned_prefill:.1%} of the unpruned LLM prefill"
        )


def print_greedy(greedy: dict[str, float]) -> None:
    """The reference greedy max-min's time against the dispatched op's."""
    (reference, slow), (dispatched, fast) = greedy.items()
    print(
        f"greedy max-min N=576 k=64: {reference} {slow * 1e3:.2f} ms, {dispatched} "
        f"{fast * 1e3:.2f} ms ({slow / fast:.1f}x)"
    )


def print_agreements(agreements: list[tuple], images: int) -> None:
    """Each setting's agreement with ZOO-Prune's float32 scores (see `agreement`)."""
    print(f"agreement with ZOO's float32 scores (seed 0) over {images} images:")
    for label, spearman, top, kept in agreements:
        print(
            f"  {label:14s} Spearman {spearman:.4f}, top-64 overlap {top:.3f}, "
            f"Jaccard of the 64 kept {kept:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Time the first token unpruned and with ZOO-Prune, then ZOO-Prune's own cost and
    agreement; 1 when a floor is missed."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    layers = args.layers or layers_that_fit()
    print(
        f"LLaVA-1.5-shaped, random weights, fp32, {layers} decoder layers, {args.threads} "
        f"threads, median of {args.repeats} after a warm-up",
        flush=True,
    )
    model, batch = build(layers), inputs()
    with torch.inference_mode():
        records = first_token_records(model, batch, args.repeats)
        times = medians(records)
        print_times(times)
        costs, agreements = agreement(model, args.images)
        greedy = greedy_medians(model, batch["pixel_values"])
    config = tokcomp.config_of(tokcomp.apply(model, "zoo", keep=KEEP))
    prefill, first = print_speedups(records, config)
    print_selection_costs(costs, times["unpruned"]["prefill"])
    print_greedy(greedy)
    print_agreements(agreements, args.images)
    return 0 if floors_hold(prefill, first) else 1


if __name__ == "__main__":
    sys.exit(main())

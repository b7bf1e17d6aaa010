"""Zero-TPrune's settings chosen per model on training images (METHODS.md section 4).

Zero-shot pruning changes no weights, so the paper tunes its settings for each model: one
trial is one forward pass over a few thousand images. This search tries each share of a
block's cut made by the similarity stage (and, when asked, each list of pruning blocks) at
a MACs target, and keeps the setting with the lowest cross-entropy.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokcomp.api import apply, config_of, remove
from tokcomp.config import Config
from tokcomp.harness.data import describe
from tokcomp.harness.imagenet import topk_correct
from tokcomp.search.common import add_model_and_data_arguments, model_and_training_images

#: The similarity stage's shares tried by default: from importance only to similarity only.
DEFAULT_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Trial:
    """One setting tried: its zero_tprune options, mean cross-entropy and top-1 (%)."""

    options: dict[str, Any]
    loss: float
    top1: float


def search_zero_tprune(
    model: nn.Module,
    batches: Batches,
    target_macs: float,
    shares: Sequence[float] = DEFAULT_SHARES,
    layer_sets: Sequence[list[int] | None] = (None,),
    progress: bool = True,
) -> tuple[Config, list[Trial]]:
    """Try every similarity share in `shares` with every list of pruning blocks in
    `layer_sets` (None: the method's default blocks) at `target_macs` on the labelled
    `batches`; returns the config of the trial with the lowest cross-entropy and all trials.
    The model is left as it was given (unpatched)."""
    if not shares or not layer_sets:
        raise ValueError("zero_tprune search: give at least one similarity share and block list")
    settings = [_options(target_macs, share, layers) for layers in layer_sets for share in shares]
    trials = [
        _trial(model, batches, options)
        for options in tqdm(settings, disable=not progress, desc="zero_tprune search")
    ]
    best = min(trials, key=lambda trial: trial.loss)
    apply(model, "zero_tprune", **best.options)
    config = config_of(model)
    remove(model)
    config.notes = (
        f"Zero-TPrune search: target {target_macs:.3f} of the unpruned MACs; lowest "
        f"cross-entropy {best.loss:.4f} (top-1 {best.top1:.2f}%) of {len(trials)} settings "
        f"(similarity shares {list(shares)}, blocks {_blocks_text(layer_sets)})"
    )
    return config, trials


def _options(target_macs: float, share: float, layers: list[int] | None) -> dict[str, Any]:
    options: dict[str, Any] = {"target_macs": target_macs, "similarity_share": share}
    if layers is not None:
        options["layers"] = list(layers)
    return options


def _trial(model: nn.Module, batches: Batches, options: dict[str, Any]) -> Trial:
    apply(model, "zero_tprune", **options)
    try:
        loss, top1 = score(model, batches)
    finally:
        remove(model)
    return Trial(options, loss, top1)


@torch.inference_mode()
def score(model: nn.Module, batches: Batches) -> tuple[float, float]:
    """Mean cross-entropy and top-1 (%) of `model` (in eval mode) on labelled batches."""
    model.eval()
    device = next(model.parameters()).device
    loss, correct, count = 0.0, 0, 0
    for images, labels in batches:
        logits = model(images.to(device))
        labels = labels.to(device)
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += topk_correct(logits, labels, ks=(1,))["top1"]
        count += len(labels)
    if count == 0:
        raise ValueError("zero_tprune search: no images to score (check --data and --limit)")
    return loss / count, 100 * correct / count


def _blocks_text(layer_sets: Sequence[list[int] | None]) -> str:
    return ", ".join("default" if layers is None else str(layers) for layers in layer_sets)


def format_trials(trials: Sequence[Trial]) -> str:
    """The trials as a table, best (lowest cross-entropy) marked."""
    best = min(trials, key=lambda trial: trial.loss)
    lines = [f"{'share':>6} {'loss':>7} {'top1':>6}  blocks"]
    for trial in trials:
        share = trial.options["similarity_share"]
        blocks = trial.options.get("layers", "default")
        mark = "  <- best" if trial is best else ""
        lines.append(f"{share:>6.2f} {trial.loss:>7.4f} {trial.top1:>6.2f}  {blocks}{mark}")
    return "\n".join(lines)


def _shares(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


def _blocks(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp search zero_tprune`."""
    add_model_and_data_arguments(parser)
    parser.add_argument("--target-macs", type=float, required=True, help="fraction of unpruned")
    parser.add_argument(
        "--shares",
        type=_shares,
        default=list(DEFAULT_SHARES),
        help="similarity-stage shares to try, e.g. 0,0.5,1 (default: 0 to 1 in steps of 0.25)",
    )
    parser.add_argument(
        "--layers",
        type=_blocks,
        action="append",
        help="a list of pruning blocks to try, e.g. 3,6,9 (repeatable; default: the method's)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-o", "--output", type=Path, required=True, help=".json or .yaml")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Search, print every trial, save the best one's config."""
    model, dataset = model_and_training_images(args)
    model.to(args.device)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    print(f"searching on {args.data}: {describe(dataset)}")
    config, trials = search_zero_tprune(
        model, loader, args.target_macs, args.shares, args.layers or [None]
    )
    print(format_trials(trials))
    path = config.save(args.output)
    print(
        f"reached {config.macs / 1e9:.3f} GMACs = {config.macs_ratio:.3f} of unpruned "
        f"(target {args.target_macs:.3f}); schedule {config.schedule}; wrote {path}"
    )

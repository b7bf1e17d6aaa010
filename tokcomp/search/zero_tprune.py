"""Zero-TPrune's settings chosen per model on training images (docs/methods.md section 4).

Zero-shot pruning changes no weights, so the paper tunes its settings for each model: one
trial is one forward pass over a few thousand images. This search tries each share of a
block's cut made by the similarity stage (and, when asked, each list of pruning blocks) at
a MACs target, and keeps the setting with the lowest cross-entropy (or, where the
difference is within noise, the one that prunes at fewer blocks).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from tokcomp.api import apply, config_of, remove
from tokcomp.config import Config
from tokcomp.errors import UsageError, interruption_says
from tokcomp.harness.arguments import check_config_output, fractions, names
from tokcomp.harness.data import describe
from tokcomp.harness.imagenet import topk_correct
from tokcomp.search.common import (
    add_model_and_data_arguments,
    model_and_training_images,
    search_state,
)
from tokcomp.search.state import SearchState

#: The similarity stage's shares tried by default: from importance only to similarity only.
DEFAULT_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Trial:
    """One setting tried: its zero_tprune options, the blocks it prunes at, each image's
    cross-entropy and the top-1 (%)."""

    options: dict[str, Any]
    layers: list[int]
    losses: torch.Tensor
    top1: float

    @property
    def loss(self) -> float:
        """Mean cross-entropy over the images."""
        return self.losses.mean().item()


def search_zero_tprune(
    model: nn.Module,
    batches: Batches,
    target_macs: float,
    shares: Sequence[float] = DEFAULT_SHARES,
    layer_sets: Sequence[list[int] | None] = (None,),
    sizes: Sequence[bool | None] = (None,),
    progress: bool = True,
    state: SearchState | None = None,
) -> tuple[Config, list[Trial]]:
    """Try every similarity share in `shares` with every list of pruning blocks in
    `layer_sets` and each `similarity_sizes` setting in `sizes` (None: the default, the
    model's own where it carries one) at `target_macs` on the labelled `batches`; returns
    the config of the chosen trial (`choose`) and all trials. The model
    is left as it was given (unpatched). state: where each finished trial is saved and
    taken from instead of being run again; it is kept when the search finishes, for the
    caller to discard once the config is safely written, so a failed write loses no trial.
    A state saved for another target or from other inputs (its fingerprint) is refused."""
    if not shares or not layer_sets or not sizes:
        raise ValueError(
            "zero_tprune search: give at least one similarity share, block list and sizes setting"
        )
    settings = [
        _options(target_macs, share, layers, carry)
        for layers in layer_sets
        for carry in sizes
        for share in shares
    ]
    for options in settings:  # every setting resolves before any trial runs
        remove(apply(model, "zero_tprune", **options))
    saved = _Trials(state.with_parts(target_macs=target_macs) if state else None)
    with tqdm(settings, disable=not progress, desc="zero_tprune search") as bar:
        trials = [
            saved.get(options) or saved.add(_trial(model, batches, options)) for options in bar
        ]
    chosen = choose(trials)
    apply(model, "zero_tprune", **chosen.options)
    config = config_of(model)
    remove(model)
    config.notes = (
        f"Zero-TPrune search: target {target_macs:.3f} of the unpruned MACs; cross-entropy "
        f"{chosen.loss:.4f} (top-1 {chosen.top1:.2f}%) on {len(chosen.losses)} images, chosen "
        f"of {len(trials)} settings (similarity shares {list(shares)}, blocks "
        f"{_blocks_text(layer_sets)}, similarity sizes {list(sizes)})"
    )
    return config, trials


class _Trials:
    """The finished trials of a search, by their options, kept in a SearchState."""

    def __init__(self, state: SearchState | None) -> None:
        self.state = state
        saved = state.load() if state is not None else None
        trials = [Trial(**trial) for trial in (saved or {}).get("trials", [])]
        self.by_options = {_key(trial.options): trial for trial in trials}

    def get(self, options: dict[str, Any]) -> Trial | None:
        """The saved trial of `options`, if it finished before."""
        return self.by_options.get(_key(options))

    def add(self, trial: Trial) -> Trial:
        """Keep a finished trial (saved at once); returns it."""
        self.by_options[_key(trial.options)] = trial
        if self.state is not None:
            self.state.save({"trials": [asdict(t) for t in self.by_options.values()]})
        return trial


def _key(options: dict[str, Any]) -> str:
    return json.dumps(options, sort_keys=True)


def choose(trials: Sequence[Trial]) -> Trial:
    """The trial with the lowest cross-entropy, unless one that prunes at fewer blocks is
    within one standard error of it (paired over the images): the MACs are equal, but every
    pruning block computes its full attention matrix, so fewer of them run faster."""
    best = min(trials, key=lambda trial: trial.loss)

    def level_with_best(trial: Trial) -> bool:
        gap = trial.losses - best.losses
        noise = gap.std().item() / len(gap) ** 0.5 if len(gap) > 1 else 0.0
        return gap.mean().item() <= noise

    level = [trial for trial in trials if level_with_best(trial)]
    return min(level, key=lambda trial: (len(trial.layers), trial.loss))


def _options(
    target_macs: float, share: float, layers: list[int] | None, sizes: bool | None
) -> dict[str, Any]:
    options: dict[str, Any] = {"target_macs": target_macs, "similarity_share": share}
    if layers is not None:
        options["layers"] = list(layers)
    if sizes is not None:
        options["similarity_sizes"] = sizes
    return options


def _trial(model: nn.Module, batches: Batches, options: dict[str, Any]) -> Trial:
    apply(model, "zero_tprune", **options)
    try:
        layers = config_of(model).options["layers"]
        losses, top1 = score(model, batches)
    finally:
        remove(model)
    return Trial(options, layers, losses, top1)


@torch.inference_mode()
def score(model: nn.Module, batches: Batches) -> tuple[torch.Tensor, float]:
    """Each image's cross-entropy and the top-1 (%) of `model` (in eval mode) on labelled
    batches."""
    model.eval()
    device = next(model.parameters()).device
    losses, correct = [], 0
    for images, labels in batches:
        logits = model(images.to(device))
        labels = labels.to(device)
        losses.append(F.cross_entropy(logits, labels, reduction="none").float().cpu())
        correct += topk_correct(logits, labels, ks=(1,))["top1"]
    if not losses:
        raise ValueError("zero_tprune search: no images to score (check --data and --limit)")
    losses = torch.cat(losses)
    return losses, 100 * correct / len(losses)


def _blocks_text(layer_sets: Sequence[list[int] | None]) -> str:
    return ", ".join("default" if layers is None else str(layers) for layers in layer_sets)


def format_trials(trials: Sequence[Trial]) -> str:
    """The trials as a table, the chosen one marked."""
    chosen = choose(trials)
    lines = [f"{'share':>6} {'sizes':>5} {'loss':>7} {'top1':>6}  blocks"]
    for trial in trials:
        share = trial.options["similarity_share"]
        sizes = {True: "on", False: "off", None: "-"}[trial.options.get("similarity_sizes")]
        mark = "  <- chosen" if trial is chosen else ""
        lines.append(
            f"{share:>6.2f} {sizes:>5} {trial.loss:>7.4f} {trial.top1:>6.2f}  {trial.layers}{mark}"
        )
    return "\n".join(lines)


def _blocks(text: str) -> list[int]:
    """'3,6,9' -> [3, 6, 9]: distinct block indices, in order."""
    return sorted({int(name) for name in names(text)})


def _switches(text: str) -> list[bool]:
    settings = {"off": False, "on": True}
    chosen = names(text)
    unknown = [name for name in chosen if name not in settings]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"give off, on or off,on (got {text!r})")
    return [settings[name] for name in chosen]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp search zero_tprune`."""
    add_model_and_data_arguments(parser)
    parser.add_argument("--target-macs", type=float, required=True, help="fraction of unpruned")
    parser.add_argument(
        "--shares",
        type=fractions,
        default=list(DEFAULT_SHARES),
        help="similarity-stage shares to try, e.g. 0,0.5,1 (default: 0 to 1 in steps of 0.25)",
    )
    parser.add_argument(
        "--layers",
        type=_blocks,
        action="append",
        help="a list of pruning blocks to try, e.g. 3,6,9 (repeatable; default: the method's)",
    )
    parser.add_argument(
        "--sizes",
        type=_switches,
        default=[None],
        help="similarity_sizes settings to try: off, on or off,on (default: the model's own "
        "setting, else off as in the paper)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Search, print every trial, save the chosen one's config. Each finished trial is saved
    next to the output until the config is written; rerunning the same command resumes
    (other inputs are refused)."""
    check_config_output(args.output, args.force)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "tokcomp search zero_tprune runs in one process (its trials are forward passes): "
            "run it without torchrun"
        )
    model, dataset = model_and_training_images(args, args.device)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    print(f"searching on {args.data}: {describe(dataset)}")
    state = search_state(args, model, dataset)
    layer_sets = args.layers or [None]
    with interruption_says(
        f"the finished trials are saved in {state.path}; the same command resumes"
    ):
        config, trials = search_zero_tprune(
            model, loader, args.target_macs, args.shares, layer_sets, args.sizes, state=state
        )
    print(format_trials(trials))
    path = config.save(args.output, overwrite=args.force)
    state.discard()
    print(
        f"reached {config.macs / 1e9:.3f} GMACs = {config.macs_ratio:.3f} of unpruned "
        f"(target {args.target_macs:.3f}); schedule {config.schedule}; wrote {path}"
    )

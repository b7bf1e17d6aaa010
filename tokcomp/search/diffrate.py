"""DiffRate's rate search: learn per-block prune and merge counts on a frozen model so its
MACs reach a target with the least loss (Chen et al., ICCV 2023; docs/methods.md section 3)."""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import Mixup
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from tokcomp.adapters import find_adapter
from tokcomp.api import apply, config_of, remove
from tokcomp.config import Config
from tokcomp.errors import interruption_says
from tokcomp.harness.arguments import check_config_output, positive_int
from tokcomp.harness.data import describe
from tokcomp.harness.distributed import SINGLE, World
from tokcomp.methods.diffrate import DiffRate
from tokcomp.methods.diffrate_search import DiffRateRates, DiffRateSearch, min_ste
from tokcomp.schedule import ModelSpec, block_macs, head_macs_at, model_macs, selection_macs
from tokcomp.search.common import (
    add_model_and_data_arguments,
    model_and_training_images,
    search_state,
)
from tokcomp.search.state import SearchState

#: DeiT-S's MACs in GMACs: the MACs penalty is measured in units of (model MACs / this), which
#: is exactly the paper's GMACs for DeiT-S and keeps its strength relative to other models.
_REFERENCE_GMACS = 4.6

#: DeiT's training augmentation, under which DiffRate's released search trains the rates
#: (timm's create_transform options; `--augment deit`). DeiT's colour jitter is left out:
#: timm turns it off under RandAugment.
DEIT_AUGMENT: dict[str, Any] = {
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": 0.25,
    "re_mode": "pixel",
    "re_count": 1,
    "interpolation": "bicubic",
}
#: DeiT's mixup and cutmix, with label smoothing (timm's Mixup options).
DEIT_MIXUP: dict[str, Any] = {
    "mixup_alpha": 0.8,
    "cutmix_alpha": 1.0,
    "prob": 1.0,
    "switch_prob": 0.5,
    "mode": "batch",
    "label_smoothing": 0.1,
}


@dataclass
class SearchSettings:
    """The search's knobs; defaults are the paper's (lambda 5, AdamW lr 0.01 -> 0.001). Its
    1,024 images per step are the command line's --batch-size, 64 by default.

    fit: scale the searched counts so the schedule's MACs are the largest not above the
    target (the MACs penalty is soft, so the raw search can land a few percent off it).
    micro_batch: run each batch's forward and backward passes in chunks of at most this many
    images and sum their gradients: the same step as one pass, with the memory of a chunk
    (None: the whole batch at once).
    start: "uniform" (the paper's: every candidate count equally likely, so each block starts
    at half the tokens) or "gradual" (tokcomp's warm start: merging only, the same number of
    tokens per block, at the target's MACs; docs/methods.md section 3.2).
    """

    target_macs: float
    epochs: int = 3
    lr: float = 0.01
    lr_min: float = 0.001
    lam: float = 5.0
    granularity: int = 4
    max_steps: int | None = None
    progress: bool = True
    fit: bool = True
    micro_batch: int | None = None
    start: str = "uniform"

    def __post_init__(self) -> None:
        if self.start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a positive learning rate, got {self.lr}")
        if not 0 <= self.lr_min <= self.lr:
            raise ValueError(
                f"lr_min is where the cosine schedule ends, between 0 and lr {self.lr}; "
                f"got {self.lr_min}"
            )
        if not 0 <= self.lam < math.inf:  # a negative weight would reward missing the target
            raise ValueError(f"lam weighs the MACs loss and must be >= 0, got {self.lam}")
        for name in ("epochs", "max_steps", "micro_batch"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive whole number, got {value!r}")


#: How the rates start: DiffRate's uniform logits, or centred on an even merging schedule.
STARTS = ("uniform", "gradual")


def expected_macs(spec: ModelSpec, rates: DiffRateRates) -> torch.Tensor:
    """Differentiable MACs per image under the rates: attention at the incoming count, then
    min_STE(count, prune_kept, merge_kept), MLP at the new count; plus stem and head (an
    attention-pooling head's per-token part at the last block's count, as `encoder_macs`)."""
    tokens = rates.prune[0].candidates.new_tensor(float(spec.tokens))
    total = tokens.new_tensor(float(spec.stem_macs))
    for index in range(spec.depth):
        reduced = min_ste(tokens, *rates.kept(index))
        total = total + block_macs(spec, tokens, reduced)
        tokens = reduced
    return total + head_macs_at(spec, tokens)


def search_diffrate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: SearchSettings,
    rates: DiffRateRates | None = None,
    world: World = SINGLE,
    state: SearchState | None = None,
) -> Config:
    """Learn DiffRate's rates on `model` (weights frozen, untouched) from labelled `batches`
    (re-iterated once per epoch, moved to the model's device; labels are class indices, or
    class probabilities as `MixedBatches` gives them); returns the config of the searched
    schedule (fitted to the target unless settings.fit is off).

    rates: continue from these (trained in place). world: under torchrun, the rates are
    trained data-parallel (DistributedDataParallel over the rates only; the frozen weights
    are broadcast from rank 0). state: where the search saves itself after every epoch and
    resumes from (a finished one gives its rates back at once). It is kept when the search
    finishes, for the caller to discard once the config is safely written, so a failed write
    loses no work; a state saved with other settings or from other inputs (its fingerprint)
    is refused.
    """
    adapter = find_adapter(model)
    spec, whole_last = adapter.spec(), adapter.pools_by_average()
    _check_settings(spec, settings)
    device = next(model.parameters()).device
    if rates is None:
        rates = _starting_rates(spec, settings, whole_last)
    rates = rates.to(device)
    with _weights_frozen(model):
        try:
            search = DiffRateSearch(rates=rates, schedule=[spec.tokens] * spec.depth)
            apply(model.eval(), search)
            objective = _Objective(model, rates, spec)
            if world.size > 1:
                ids = [device] if device.type == "cuda" else None
                objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
            checkpoint = _Checkpoint(state.with_parts(**_deciding(settings)) if state else None)
            _optimise(objective, rates, spec, batches, settings, world, checkpoint)
        finally:
            remove(model)
    return _searched_config(model, spec, rates, settings, world)


def _check_settings(spec: ModelSpec, settings: SearchSettings) -> None:
    """Raise ValueError for a target no schedule reaches or a granularity that leaves no
    choice of kept counts."""
    check_reachable(spec, settings.target_macs)
    patches = spec.tokens - spec.protected
    if not 0 < settings.granularity < patches:
        raise ValueError(
            f"granularity {settings.granularity} leaves no choice of kept counts among "
            f"{patches} patch tokens: give a granularity below {patches}"
        )


def _starting_rates(spec: ModelSpec, settings: SearchSettings, whole_last: bool) -> DiffRateRates:
    """New rates: the paper's uniform start, or the gradual one at the target's MACs."""
    rates = DiffRateRates(spec, settings.granularity, whole_last)
    if settings.start == "gradual":
        start = gradual_counts(spec, settings.target_macs, whole_last)
        rates.start_at(*start, 2 * settings.granularity)
    return rates


@contextmanager
def _weights_frozen(model: nn.Module) -> Iterator[None]:
    """The model's trainable weights frozen within the block, trainable again after it."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _searched_config(
    model: nn.Module, spec: ModelSpec, rates: DiffRateRates, settings: SearchSettings, world: World
) -> Config:
    """The config of the rates' schedule, fitted to the target unless settings.fit is off,
    with notes on how it was searched."""
    prune_kept, merge_kept = rates.kept_lists()
    notes = (
        f"DiffRate search: target {settings.target_macs:.3f} of the unpruned MACs, "
        f"{settings.epochs} epoch(s), lr {settings.lr}, lambda {settings.lam}, "
        f"granularity {settings.granularity}, {settings.start} start, {world.size} process(es)"
    )
    if settings.fit:
        searched = total_macs(spec, prune_kept, merge_kept) / model_macs(spec)
        scale, prune_kept, merge_kept = fit_counts(
            spec, prune_kept, merge_kept, settings.target_macs
        )
        notes += f"; searched counts reached {searched:.3f}, scaled by {scale:.3f} to fit"
    apply(model, "diffrate", prune_kept=prune_kept, merge_kept=merge_kept)
    config = config_of(model)
    remove(model)
    config.notes = notes
    return config


def check_reachable(spec: ModelSpec, target_macs: float) -> None:
    """Raise ValueError unless some DiffRate schedule (block 0 is never compressed) has at
    most `target_macs` of the unpruned MACs."""
    if not 0 < target_macs <= 1:
        raise ValueError(
            f"target_macs is a fraction of the unpruned MACs in (0, 1], got {target_macs}"
        )
    smallest = [spec.tokens] + [spec.protected + 1] * (spec.depth - 1)
    floor = total_macs(spec, smallest, smallest) / model_macs(spec)
    if target_macs < floor:
        raise ValueError(
            f"target_macs {target_macs} is below {floor:.3f}, the MACs left when every block "
            "after block 0 keeps a single patch token; raise the target"
        )


def total_macs(spec: ModelSpec, prune_kept: list[int], merge_kept: list[int]) -> int:
    """MACs per image of DiffRate at these counts: the model's and DiffRate's own work
    (class-attention rows, merge matching), what `target_macs` is a fraction of."""
    method = DiffRate(prune_kept=prune_kept, merge_kept=merge_kept)
    return model_macs(spec, merge_kept) + selection_macs(spec, method, merge_kept)


def gradual_counts(
    spec: ModelSpec, target_macs: float, whole_last: bool = False
) -> tuple[list[int], list[int]]:
    """(prune_kept, merge_kept) of the gradual start: every block from 1 (to the one before the
    last with `whole_last`) merges the same number of tokens (as ToMe's constant r) and prunes
    none, the fewest merges within `target_macs`."""
    check_reachable(spec, target_macs)
    merging = spec.depth - int(whole_last)

    def counts(per_block: float) -> tuple[list[int], list[int]]:
        merge_kept = [
            max(spec.protected + 1, round(spec.tokens - per_block * min(index, merging - 1)))
            for index in range(spec.depth)
        ]
        return [spec.tokens, *merge_kept[:-1]], merge_kept

    budget = target_macs * model_macs(spec)

    def within(per_block: float) -> bool:
        return total_macs(spec, *counts(per_block)) <= budget

    return counts(boundary(within, float(spec.tokens), 0.0))


def fit_counts(
    spec: ModelSpec, prune_kept: list[int], merge_kept: list[int], target_macs: float
) -> tuple[float, list[int], list[int]]:
    """Scale the compressible part of every block's counts (blocks 1 on) by one factor, the
    largest whose schedule stays within `target_macs` of the unpruned MACs (DiffRate's own
    work included: total_macs); keeps the
    searched per-block shape. Returns (factor, prune_kept, merge_kept)."""
    patches = spec.tokens - spec.protected

    def scaled(counts: list[int], factor: float) -> list[int]:
        kept = [min(patches, max(1, round(factor * (c - spec.protected)))) for c in counts[1:]]
        return [counts[0], *(k + spec.protected for k in kept)]

    check_reachable(spec, target_macs)
    budget = target_macs * model_macs(spec)
    fewest = min(c - spec.protected for c in merge_kept)

    def within(factor: float) -> bool:
        return total_macs(spec, scaled(prune_kept, factor), scaled(merge_kept, factor)) <= budget

    factor = boundary(within, 0.0, patches / fewest)  # the latter keeps every token
    return factor, scaled(prune_kept, factor), scaled(merge_kept, factor)


def boundary(within: Callable[[float], bool], inside: float, outside: float) -> float:
    """Bisection (40 halvings) between a value `within` accepts and one it refuses, for a
    `within` that flips once between them: the accepted value nearest the flip."""
    for _ in range(40):
        middle = (inside + outside) / 2
        if within(middle):
            inside = middle
        else:
            outside = middle
    return inside


class _Objective(nn.Module):
    """What is differentiated: the patched model's logits and the expected MACs. The rates
    are its only trainable parameters (what DistributedDataParallel synchronises)."""

    def __init__(self, model: nn.Module, rates: DiffRateRates, spec: ModelSpec) -> None:
        super().__init__()
        self.model, self.rates, self.spec = model, rates, spec

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(images), expected_macs(self.spec, self.rates)


def _deciding(settings: SearchSettings) -> dict[str, Any]:
    """The settings that decide the searched rates (micro-batching takes the same steps;
    fitting and progress bars act after or beside the search)."""
    ignored = ("progress", "fit", "micro_batch")
    return {name: value for name, value in asdict(settings).items() if name not in ignored}


class _Checkpoint:
    """The search's rates, optimiser and schedule after each epoch, in a SearchState."""

    def __init__(self, state: SearchState | None) -> None:
        self.state = state

    def restore(self, rates: nn.Module, optimizer: Any, scheduler: Any) -> int:
        """Load the saved state if there is one; the number of finished epochs."""
        saved = self.state.load() if self.state is not None else None
        if saved is None:
            return 0
        rates.load_state_dict(saved["rates"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        return saved["epoch"]

    def save(self, epoch: int, rates: nn.Module, optimizer: Any, scheduler: Any) -> None:
        """Save the state after `epoch` finished epochs."""
        if self.state is not None:
            self.state.save(
                {
                    "epoch": epoch,
                    "rates": rates.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                }
            )


def _optimise(objective, rates, spec, batches, settings, world, checkpoint) -> None:
    per_epoch = len(batches)
    total = min(settings.max_steps or math.inf, per_epoch * settings.epochs)
    optimizer = torch.optim.AdamW(rates.parameters(), lr=settings.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, total, eta_min=settings.lr_min
    )
    start = checkpoint.restore(rates, optimizer, scheduler)
    base = model_macs(spec)
    unit, target = base / _REFERENCE_GMACS, settings.target_macs * base
    step = start * per_epoch

    def penalty(macs: torch.Tensor) -> torch.Tensor:
        return settings.lam * ((macs - target) / unit) ** 2

    progress = settings.progress and world.is_main
    with tqdm(total=total, initial=step, disable=not progress, desc="diffrate search") as bar:
        for epoch in range(start, settings.epochs):
            if step >= total:  # a resumed search max_steps ended (mid-epoch, saved as done)
                break
            _set_epoch(batches, epoch)
            for images, labels in batches:
                optimizer.zero_grad(set_to_none=True)
                ce, macs = _backward(objective, images, labels, penalty, settings.micro_batch)
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update()
                bar.set_postfix(ce=f"{ce:.3f}", macs=f"{macs / base:.3f}")
                if step >= total:
                    break
            checkpoint.save(epoch + 1, rates, optimizer, scheduler)


def _backward(objective, images, labels, penalty, micro_batch) -> tuple[float, float]:
    """Accumulate the gradient of mean cross-entropy + penalty(MACs) on one batch, in chunks of
    at most `micro_batch` images (under DistributedDataParallel, synchronised once, on the
    last chunk). Returns the batch's cross-entropy and MACs."""
    device = next(objective.parameters()).device
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    size = micro_batch or len(images)
    chunks = list(zip(images.split(size), labels.split(size), strict=True))
    total = 0.0
    for index, (part, part_labels) in enumerate(chunks):
        last = index == len(chunks) - 1
        sync = nullcontext() if last or not hasattr(objective, "no_sync") else objective.no_sync()
        with sync:
            logits, macs = objective(part)
            ce = F.cross_entropy(logits, part_labels, reduction="sum") / len(images)
            loss = ce + penalty(macs) if last else ce
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    "diffrate search diverged (loss is not finite): lower --lr or --lam and "
                    "rerun with --fresh"
                )
            loss.backward()
        total += ce.item()
    return total, macs.item()


class MixedBatches:
    """Batches whose images are mixed pairwise by DeiT's mixup or cutmix, so their labels
    become class probabilities (smoothed); len() and the sampler pass through."""

    def __init__(self, batches: DataLoader, classes: int, seed: int) -> None:
        self.batches, self.sampler, self.seed = batches, batches.sampler, seed
        self.mix = Mixup(num_classes=classes, **DEIT_MIXUP)

    def set_epoch(self, epoch: int) -> None:
        """A new shuffle, and augmentation and mixing draws seeded by (seed, epoch): an epoch
        draws the same whether or not the search was interrupted before it."""
        self.sampler.set_epoch(epoch)
        epoch_seed = self.seed * 1_000_003 + epoch
        random.seed(epoch_seed)  # RandAugment's draws (in this process)
        np.random.seed(epoch_seed)  # mixup's
        torch.manual_seed(epoch_seed)  # random erasing's noise (in this process)
        self.batches.generator.manual_seed(epoch_seed)  # the workers' seeds

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.batches:
            yield self.mix(images, labels)


def _set_epoch(batches: Iterable, epoch: int) -> None:
    """Give the batches (or their distributed sampler) their epoch: a new shuffle each epoch,
    the same on all ranks."""
    target = batches if hasattr(batches, "set_epoch") else getattr(batches, "sampler", None)
    if hasattr(target, "set_epoch"):
        target.set_epoch(epoch)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp search diffrate`."""
    add_model_and_data_arguments(parser)
    parser.add_argument("--target-macs", type=float, required=True, help="fraction of unpruned")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lr-min", type=float, default=0.001)
    parser.add_argument("--lam", type=float, default=5.0, help="weight of the MACs loss")
    parser.add_argument("--granularity", type=positive_int, default=4, help="candidate count step")
    parser.add_argument(
        "--start",
        choices=STARTS,
        default="uniform",
        help="how the rates start: uniform (the paper's; each block starts at half the tokens, "
        "which a short search does not leave) or gradual (merging the same number of tokens "
        "in every block at the target's MACs, then searched from there)",
    )
    parser.add_argument(
        "--micro-batch",
        type=positive_int,
        help="forward/backward each batch in chunks of this many images (same step, less "
        "memory: a large --batch-size on a small machine)",
    )
    parser.add_argument(
        "--no-fit",
        action="store_true",
        help="write the searched counts as they are, not scaled to the largest schedule "
        "within --target-macs",
    )
    parser.add_argument(
        "--augment",
        choices=("none", "deit"),
        default="none",
        help="deit: train the rates on images augmented as DeiT is trained (RandAugment, "
        "random erasing, mixup/cutmix, label smoothing), as the paper's search does; suits "
        "models trained that way (none: the model's evaluation preprocessing)",
    )
    parser.set_defaults(run=run)


def training_batches(
    args: argparse.Namespace, dataset: Dataset, world: World, mixed_classes: int = 0
) -> DataLoader | MixedBatches:
    """This rank's shuffled shard of `dataset` in --batch-size batches (whole ones when there
    is at least one per rank), mixed pairwise over `mixed_classes` classes when that is set
    (DeiT's mixup/cutmix, seeded per rank like its augmentation). The shards leave out the
    last images of the shuffle (fewer than one per rank) rather than repeat some on two
    ranks, which would train on them twice in an epoch."""
    sampler = DistributedSampler(
        dataset,
        num_replicas=world.size,
        rank=world.rank,
        shuffle=True,
        seed=args.seed,
        drop_last=True,
    )
    whole_batches = len(dataset) >= args.batch_size * world.size
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=whole_batches,
        generator=torch.Generator(),
    )
    if not mixed_classes:
        return loader
    per_process = args.batch_size if whole_batches else len(sampler)
    if per_process % 2:
        raise ValueError(
            f"--augment deit mixes images in pairs, but each process gets batches of "
            f"{per_process}: give an even --batch-size (and --limit)"
        )
    return MixedBatches(loader, mixed_classes, seed=args.seed + world.rank)


def run(args: argparse.Namespace) -> None:
    """Search, save the config, print what it reached. Under torchrun the batches are
    split over the ranks (each rank a different shuffle shard) and rank 0 writes. The
    search saves its state next to the output after every epoch; rerunning the same
    command resumes from it; other inputs or settings are refused. Rank 0 deletes the state
    only once the config is written: a rerun after a failed write finishes at once."""
    check_config_output(args.output, args.force)
    settings = SearchSettings(
        target_macs=args.target_macs,
        epochs=args.epochs,
        lr=args.lr,
        lr_min=args.lr_min,
        lam=args.lam,
        granularity=args.granularity,
        fit=not args.no_fit,
        micro_batch=args.micro_batch,
        start=args.start,
    )
    world = World.from_env(args.device)
    augment = DEIT_AUGMENT if args.augment == "deit" else None
    device = world.device(args.device)
    model, dataset = model_and_training_images(args, device, augment)
    batches = training_batches(args, dataset, world, model.num_classes if augment else 0)
    if world.is_main:
        print(f"searching on {args.data}: {describe(dataset)}, {world.size} process(es)")
    state = search_state(args, model, dataset, world, augment).with_parts(
        seed=args.seed,
        batch_size=args.batch_size,
        processes=world.size,
        # each loader worker draws its own augmentations: their number changes the images
        workers=args.workers if augment else None,
    )
    saved = f"the rates after each finished epoch are saved in {state.path}"
    with interruption_says(f"{saved}; the same command resumes"):
        config = search_diffrate(model, batches, settings, world=world, state=state)
    config.notes += f"; batch {args.batch_size} per process, {len(dataset)} images of {args.data}"
    if augment:
        config.notes += "; DeiT augmentation (RandAugment, random erasing, mixup/cutmix)"
    if world.is_main:
        path = config.save(args.output, overwrite=args.force)
        state.discard()
        print(
            f"reached {config.macs / 1e9:.3f} GMACs = {config.macs_ratio:.3f} of unpruned "
            f"(target {args.target_macs:.3f}); schedule {config.schedule}; wrote {path}"
        )

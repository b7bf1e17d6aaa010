"""DiffRate's rate search: learn per-block prune and merge counts on a frozen model so its
MACs reach a target with the least loss (Chen et al., ICCV 2023; METHODS.md section 3)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tokcomp.adapters import find_adapter
from tokcomp.api import apply, config_of, remove
from tokcomp.config import Config
from tokcomp.harness.data import describe, limited, open_dataset
from tokcomp.harness.imagenet import data_config, eval_transform
from tokcomp.methods.diffrate_search import DiffRateRates, DiffRateSearch, min_ste
from tokcomp.models import create_model
from tokcomp.schedule import ModelSpec, block_macs, model_macs

#: DeiT-S's MACs in GMACs: the MACs penalty is measured in units of (model MACs / this), which
#: is exactly the paper's GMACs for DeiT-S and keeps its strength relative to other models.
_REFERENCE_GMACS = 4.6


@dataclass
class SearchSettings:
    """The search's knobs; defaults are the paper's (lambda 5, AdamW lr 0.01 -> 0.001)."""

    target_macs: float
    epochs: int = 3
    lr: float = 0.01
    lr_min: float = 0.001
    lam: float = 5.0
    granularity: int = 4
    max_steps: int | None = None
    progress: bool = True


def expected_macs(spec: ModelSpec, rates: DiffRateRates) -> torch.Tensor:
    """Differentiable MACs per image under the rates: attention at the incoming count, then
    min_STE(count, prune_kept, merge_kept), MLP at the new count; plus stem and head."""
    tokens = rates.prune[0].candidates.new_tensor(float(spec.tokens))
    total = tokens.new_tensor(float(spec.stem_macs + spec.head_macs))
    for index in range(spec.depth):
        reduced = min_ste(tokens, *rates.kept(index))
        total = total + block_macs(spec, tokens, reduced)
        tokens = reduced
    return total


def search_diffrate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    settings: SearchSettings,
    rates: DiffRateRates | None = None,
) -> Config:
    """Learn DiffRate's rates on `model` (weights frozen, untouched) from labelled `batches`
    (re-iterated once per epoch); returns the config of the searched schedule. Pass `rates`
    to continue from earlier ones (they are trained in place)."""
    spec = find_adapter(model).spec()
    if not 0 < settings.target_macs <= 1:
        raise ValueError(
            f"target_macs is a fraction of the unpruned MACs in (0, 1], got {settings.target_macs}"
        )
    rates = rates if rates is not None else DiffRateRates(spec, settings.granularity)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for parameter in frozen:
        parameter.requires_grad_(False)
    try:
        apply(model.eval(), DiffRateSearch(rates=rates, schedule=[spec.tokens] * spec.depth))
        _optimise(model, batches, rates, spec, settings)
    finally:
        remove(model)
        for parameter in frozen:
            parameter.requires_grad_(True)
    prune_kept, merge_kept = rates.kept_lists()
    apply(model, "diffrate", prune_kept=prune_kept, merge_kept=merge_kept)
    config = config_of(model)
    remove(model)
    config.notes = (
        f"DiffRate search: target {settings.target_macs:.3f} of the unpruned MACs, "
        f"{settings.epochs} epoch(s), lr {settings.lr}, lambda {settings.lam}, "
        f"granularity {settings.granularity}"
    )
    return config


def _optimise(model, batches, rates, spec, settings) -> None:
    steps_per_epoch = len(batches) if hasattr(batches, "__len__") else None
    total = settings.max_steps or (steps_per_epoch or 1) * settings.epochs
    optimizer = torch.optim.AdamW(rates.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=settings.lr_min)
    base = model_macs(spec)
    unit = base / _REFERENCE_GMACS
    target = settings.target_macs * base
    step = 0
    with tqdm(total=total, disable=not settings.progress, desc="diffrate search") as bar:
        while step < total:
            for images, labels in batches:
                macs = expected_macs(spec, rates)
                ce = F.cross_entropy(model(images), labels)
                loss = ce + settings.lam * ((macs - target) / unit) ** 2
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update()
                bar.set_postfix(ce=f"{ce.item():.3f}", macs=f"{macs.item() / base:.3f}")
                if step >= total:
                    return
            if not math.isfinite(loss.item()):
                raise FloatingPointError("diffrate search diverged (loss is not finite)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp search diffrate`."""
    parser.add_argument("--model", help="timm model name (random weights unless loaded)")
    parser.add_argument("--checkpoint", type=Path, help="local .safetensors/.pth weights")
    parser.add_argument("--pretrained", action="store_true", help="timm's weights (network)")
    parser.add_argument(
        "--data",
        required=True,
        help="training images: an image folder (one sub-folder per class) or 'fashion-mnist' "
        "(its train split)",
    )
    parser.add_argument("--target-macs", type=float, required=True, help="fraction of unpruned")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, help="search on this many images (spread evenly)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--lr-min", type=float, default=0.001)
    parser.add_argument("--lam", type=float, default=5.0, help="weight of the MACs loss")
    parser.add_argument("--granularity", type=int, default=4, help="candidate count step")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("-o", "--output", type=Path, required=True, help=".json or .yaml")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Search, save the config, print what it reached."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = create_model(args.model, args.checkpoint, pretrained=args.pretrained)
    transform = eval_transform(data_config(model))
    dataset = limited(open_dataset(args.data, transform, split="train"), args.limit)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
        drop_last=len(dataset) >= args.batch_size,
    )
    print(f"searching on {args.data}: {describe(dataset)}")
    settings = SearchSettings(
        target_macs=args.target_macs,
        epochs=args.epochs,
        lr=args.lr,
        lr_min=args.lr_min,
        lam=args.lam,
        granularity=args.granularity,
    )
    config = search_diffrate(model, loader, settings)
    path = config.save(args.output)
    print(
        f"reached {config.macs / 1e9:.3f} GMACs = {config.macs_ratio:.3f} of unpruned "
        f"(target {args.target_macs:.3f}); schedule {config.schedule}; wrote {path}"
    )

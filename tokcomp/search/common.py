"""What every search takes from the command line: a model, its training images, the config
file to write, the seed, and the state the search resumes from."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tokcomp.harness.arguments import add_model_arguments, device, non_negative_int, positive_int
from tokcomp.harness.data import limited
from tokcomp.harness.distributed import SINGLE, World
from tokcomp.harness.fingerprint import Fingerprint, samples_digest
from tokcomp.harness.imagenet import model_dataset, model_parts, refuse_headless
from tokcomp.models import create_model
from tokcomp.search.state import SearchState


def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--checkpoint/--pretrained, the training images, how to read them, the device,
    the seed, and the output config (-o, --force, --fresh)."""
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        help="training images: an image folder (one sub-folder per class) or 'fashion-mnist' "
        "(its train split)",
    )
    parser.add_argument(
        "--limit", type=positive_int, help="search on this many images (spread evenly)"
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=64,
        help="images per batch (64, for a CPU's memory; DiffRate's paper steps on 1024: "
        "--batch-size 1024 --micro-batch 64 takes that step with a chunk's memory)",
    )
    parser.add_argument("--workers", type=non_negative_int, default=0)
    parser.add_argument("--threads", type=positive_int)
    parser.add_argument("--device", type=device, default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds a --model's random weights (without --checkpoint or --pretrained, so a "
        "rerun resumes) and any draws the search makes",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help=".json or .yaml")
    parser.add_argument("--force", action="store_true", help="overwrite an existing -o file")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard the saved state of an earlier search with this -o and start again",
    )


def model_and_training_images(
    args: argparse.Namespace, device: str | torch.device, augment: dict[str, Any] | None = None
) -> tuple[nn.Module, Dataset]:
    """The model the arguments name, on `device` (--device, or a rank's own GPU under
    torchrun), and its training images, preprocessed as it expects (augmented with timm's
    training transform when `augment` gives its options); a model with random weights is
    drawn from --seed, so the same command gets the same weights and resumes its search."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = create_model(args.model, args.checkpoint, pretrained=args.pretrained)
    refuse_headless(model, args.checkpoint or args.model, "a search scores")
    dataset = limited(model_dataset(args.data, model, "train", augment), args.limit)
    return model.to(device), dataset


def search_state(
    args: argparse.Namespace,
    model: nn.Module,
    dataset: Dataset,
    world: World = SINGLE,
    augment: dict[str, Any] | None = None,
) -> SearchState:
    """The state beside -o of this search on these inputs (model, weights, preprocessing,
    the exact training images); under --fresh an earlier state is discarded first."""
    fingerprint = Fingerprint.of(
        task=f"search {args.method}",
        **model_parts(model, args.checkpoint, augment),
        limit=args.limit,
        data=samples_digest(dataset),
    )
    state = SearchState.beside(args.output, fingerprint, world)
    if args.fresh and state.discard():
        print(f"--fresh: discarded the earlier search state {state.path}")
    return state

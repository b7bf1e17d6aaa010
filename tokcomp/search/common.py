"""What every search takes from the command line: a model and its training images."""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from tokcomp.harness.data import limited
from tokcomp.harness.imagenet import model_dataset
from tokcomp.models import create_model


def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--model/--checkpoint/--pretrained, the training images, how to read them and the device."""
    parser.add_argument("--model", help="timm model name (random weights unless loaded)")
    parser.add_argument("--checkpoint", help="local .safetensors/.pth weights")
    parser.add_argument("--pretrained", action="store_true", help="timm's weights (network)")
    parser.add_argument(
        "--data",
        required=True,
        help="training images: an image folder (one sub-folder per class) or 'fashion-mnist' "
        "(its train split)",
    )
    parser.add_argument("--limit", type=int, help="search on this many images (spread evenly)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def model_and_training_images(
    args: argparse.Namespace, device: str | torch.device, augment: dict[str, Any] | None = None
) -> tuple[nn.Module, Dataset]:
    """The model the arguments name, on `device` (--device, or a rank's own GPU under
    torchrun), and its training images, preprocessed as it expects (augmented with timm's
    training transform when `augment` gives its options)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(args.model, args.checkpoint, pretrained=args.pretrained)
    dataset = limited(model_dataset(args.data, model, "train", augment), args.limit)
    return model.to(device), dataset

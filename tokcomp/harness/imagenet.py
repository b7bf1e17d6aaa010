"""ImageNet evaluation under a sweep of compression settings (`tokcomp eval imagenet`):
top-1/top-5, MACs, throughput and peak memory of the unpruned model and of every method at
every budget, on an ImageNet-style folder, any image folder, or the Fashion-MNIST test set.

Preprocessing is timm's evaluation transform from the model's data config, resolved as
timm's validate.py does; a .safetensors checkpoint may override it with a "data_config"
metadata entry (JSON of timm data-config keys: input_size, interpolation, mean, std,
crop_pct, crop_mode). A model trained on Fashion-MNIST garments pasted on a larger black
canvas names that canvas there too (`fashion_mnist_canvas`), and its Fashion-MNIST images
are pasted the same way, each at one fixed place.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from timm.data import auto_augment, create_transform, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from tokcomp.errors import UsageError
from tokcomp.harness.arguments import DTYPES, add_model_arguments, non_negative_int, positive_int
from tokcomp.harness.data import FASHION_MNIST, data_source, describe, limited, open_dataset
from tokcomp.harness.fashion_mnist import CANVAS_KEY
from tokcomp.harness.fingerprint import Fingerprint, file_digest, samples_digest, weights_digest
from tokcomp.harness.results import report
from tokcomp.harness.sweep import (
    SpeedProbe,
    SweepRun,
    add_compile_argument,
    add_run_arguments,
    add_sweep_arguments,
    evaluate_sweep,
    quiet,
    start_run,
    sweep_points,
    task_evaluation,
)
from tokcomp.models import create_model

METRICS = ("top1", "top5")


def topk_correct(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, int]:
    """How many targets are among the k highest logits, for each k ('top1', 'top5').

    Ties count against the model (a target tied with others ranks below them all), a NaN
    logit ranks above everything, and a NaN target logit is never right.
    """
    targets = targets.to(logits.device)
    if targets.numel() and not 0 <= int(targets.min()) <= int(targets.max()) < logits.shape[1]:
        raise ValueError(
            f"labels {int(targets.min())}..{int(targets.max())} do not fit a model with "
            f"{logits.shape[1]} outputs: they are the data's class indices (an image folder's "
            "are its synsets' ImageNet-1k indices, its folder numbers or its sorted-name "
            "positions); check that --data holds the classes the model was trained on"
        )
    target_logit = logits.gather(1, targets[:, None])
    rank = ((logits >= target_logit) | logits.isnan()).sum(1)
    valid = ~target_logit[:, 0].isnan()
    return {f"top{k}": int(((rank <= k) & valid).sum()) for k in ks}


class ClassificationTask:
    """Image classification on a dataset of (image, label): top-1 and top-5 accuracy; with a
    lower precision `dtype`, the model runs under autocast to it."""

    metrics = METRICS

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        workers: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device, self.dtype = device, dtype
        self.loader = DataLoader(
            dataset,
            batch_size,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=workers > 0,
        )

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.loader)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images on the device, labels) batches."""
        for images, labels in self.loader:
            yield images.to(self.device), labels

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """The model's logits (under autocast to the task's dtype when it is not float32)."""
        with autocast_to(self.device, self.dtype):
            return model(inputs)

    def score(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Top-1 and top-5 hits in the batch."""
        return topk_correct(outputs.float().cpu(), targets)


def autocast_to(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    """Autocast to `dtype` on `device`, switched off for float32."""
    return torch.autocast(device.type, dtype, enabled=dtype != torch.float32)


def add_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """--dtype: run the model under autocast to a lower precision."""
    parser.add_argument_group("precision").add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="run the model under autocast to this dtype (CPU: bfloat16; CUDA: both)",
    )


def data_config(model: nn.Module) -> dict[str, Any]:
    """The model's evaluation data config as timm's validate.py resolves it (a tokcomp
    checkpoint's own data config is already in the model's pretrained_cfg)."""
    return resolve_data_config(model=model, use_test_size=True)


def model_dataset(
    data: str, model: nn.Module, split: str = "test", augment: dict[str, Any] | None = None
) -> Dataset:
    """The --data images as `model` takes them: its evaluation transform (or, given
    `augment`, timm's training transform with those options), on the canvas its
    Fashion-MNIST garments were pasted on in training if there was one, its class folders
    numbered to fit its outputs."""
    transform = model_transform(data_config(model), **(augment or {}))
    outputs = getattr(model, "num_classes", None) or None  # 0: no classifier, labels unused
    return open_dataset(data, transform, split, canvas=canvas_of(model), outputs=outputs)


def refuse_headless(model: nn.Module, name: str, scored: str) -> None:
    """Refuse a model without a classifier where its class predictions are `scored`: its
    features would be read as logits."""
    if not getattr(model, "num_classes", 0):
        raise UsageError(
            f"{name} has no classifier (num_classes 0), and {scored} its class predictions: "
            "give --checkpoint of it with a head (tokcomp eval backbone --save-head FILE "
            "writes one), or evaluate its features with tokcomp eval backbone"
        )


def canvas_of(model: nn.Module) -> int | None:
    """The Fashion-MNIST canvas `model` was trained on, if its data config names one."""
    return (getattr(model, "pretrained_cfg", None) or {}).get(CANVAS_KEY)


def model_transform(config: dict[str, Any], **augment: Any) -> transforms.Compose:
    """PIL image -> model input: colour mode from the input channels, then timm's eval
    transform (resize, centre crop, normalise), or its training transform when `augment`
    gives training options (timm's create_transform keywords, e.g. auto_augment)."""
    mode = "L" if config["input_size"][0] == 1 else "RGB"
    options = {**config, "is_training": True, **augment} if augment else config
    transform = create_transform(**options)
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transforms.Compose([functools.partial(Image.Image.convert, mode=mode), transform])


def _augment_ops(transform: Any) -> Iterator[Any]:
    """The operations of the RandAugment / AutoAugment steps in a timm transform."""
    for step in getattr(transform, "transforms", ()):
        yield from getattr(step, "ops", ())


def _posterize(image: Image.Image, bits: int, **_: Any) -> Image.Image:
    """Posterize keeping `bits` bits, 0 giving a black image: what timm's RandAugment asks
    for at its top magnitude, and what Pillow did before it began refusing 0 bits."""
    return Image.new(image.mode, image.size) if bits < 1 else auto_augment.posterize(image, bits)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp eval imagenet`."""
    add_model_arguments(parser.add_argument_group("model"))
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        required=True,
        help="image folder root/<class>/<image> (ImageNet synset folders get the standard "
        "indices, or sorted-name ones for a model trained on just those folders) or "
        f"{FASHION_MNIST}[:ROOT] (its test set)",
    )
    data.add_argument("--limit", type=positive_int, help="evaluate N images spread over the data")
    data.add_argument("--batch-size", type=positive_int, default=64)
    data.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes")
    add_dtype_argument(parser)
    add_sweep_arguments(parser, budgets="target MACs fractions, e.g. 0.9,0.75")
    add_compile_argument(add_run_arguments(parser))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate the sweep the arguments describe, print its table, save its results.
    Under torchrun the data is sharded over the ranks and rank 0 alone writes."""
    points = sweep_points(args.methods, args.budgets, args.variant, args.config)
    world, device = start_run(args)
    model = create_model(args.model, args.checkpoint, pretrained=args.pretrained).to(device)
    refuse_headless(model, args.checkpoint or args.model, "top-1 and top-5 score")
    dataset = limited(model_dataset(args.data, model), args.limit)
    name = f"{_model_name(args)}-{data_source(args.data).name}"
    output = args.output or Path("results") / name
    say = print if world.is_main else quiet
    say(f"model {_model_name(args)}; data {args.data}: {describe(dataset)}")
    canvas = canvas_of(model)
    placed = f"; garments pasted on a {canvas} px canvas" if canvas else ""
    say(f"preprocessing {data_config(model)}{placed}")
    threads = torch.get_num_threads()
    compiled = ", compiled (inductor)" if args.compile else ""
    say(
        f"{len(points)} points on {device} x {world.size} process(es), {threads} threads, "
        f"batch {args.batch_size}, {args.dtype}{compiled}; results in {output}"
    )
    fingerprint = Fingerprint.of(
        task="imagenet",
        **model_parts(model, args.checkpoint),
        limit=args.limit,
        data=samples_digest(dataset),
        device=device.type,
        compile=args.compile,
        dtype=args.dtype,
    )
    dtype = getattr(torch, args.dtype)
    task = ClassificationTask(world.shard(dataset), args.batch_size, args.workers, device, dtype)
    settings = dict(
        device=str(device),
        threads=threads,
        batch_size=args.batch_size,
        speed_repeats=args.speed_repeats,
    )
    sweep = SweepRun(output, fingerprint, device, args.fresh)
    probe = SpeedProbe(args.speed_repeats, args.compile)
    evaluation = task_evaluation(task, device, world, probe)
    rows = evaluate_sweep(model, points, evaluation, sweep, settings, world)
    if world.is_main:  # rank 0 alone writes the table, CSV and plot
        print(report(rows, task.metrics, output, title=name))


def model_parts(
    model: nn.Module, checkpoint: Path | None, augment: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The fingerprint parts of a timm model as the harness reads images for it: its
    architecture, its weights (the checkpoint file's content, else the parameters') and its
    preprocessing (data config, Fashion-MNIST canvas, training augmentation if any)."""
    preprocessing = {**data_config(model), "canvas": canvas_of(model), "augment": augment}
    return {
        "model": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
        "weights": weights_identity(model, checkpoint),
        "preprocessing": json.dumps(preprocessing, sort_keys=True, default=str),
    }


def weights_identity(model: nn.Module, checkpoint: Path | None) -> str:
    """The fingerprint part of a model's weights: the content of the file they were loaded
    from, else the parameters' (timm's initialisation is random, unseeded)."""
    return f"file {file_digest(checkpoint)}" if checkpoint else f"tensors {weights_digest(model)}"


def _model_name(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    checkpoint = args.checkpoint  # a Hugging Face style <name>/model.safetensors is <name>
    return checkpoint.parent.name if checkpoint.stem == "model" else checkpoint.stem

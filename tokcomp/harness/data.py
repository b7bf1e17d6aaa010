"""Labelled image datasets for evaluation: image folders (ImageNet synset folders get their
standard class indices), the Fashion-MNIST test set, and a deterministic `--limit` subset."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder

from tokcomp.harness.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from tokcomp.harness.fashion_mnist import FashionMNIST

FASHION_MNIST = "fashion-mnist"


class CorruptImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


@functools.cache
def imagenet_synsets() -> tuple[str, ...]:
    """The 1000 ImageNet-1k synset ids (n01440764, ...) in standard class-index order."""
    return tuple(ImageNetInfo("imagenet-1k").label_names())


def imagenet_indices(classes: Sequence[str]) -> dict[str, int] | None:
    """Each class's standard ImageNet-1k index when every class is a 1k synset, else None."""
    index = {synset: i for i, synset in enumerate(imagenet_synsets())}
    if all(name in index for name in classes):
        return {name: index[name] for name in classes}
    return None


def read_image(path: str) -> Image.Image:
    """Decode an image file completely, or raise CorruptImageError naming it."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(
            f"cannot decode image {path} ({err}); replace or delete the file"
        ) from None
    return image


class LabelledImageFolder(ImageFolder):
    """root/<class>/<image> folders. When every class folder is an ImageNet-1k synset, each
    maps to its standard index (a subset of the synsets keeps them); otherwise classes are
    numbered in sorted folder-name order, like torchvision's ImageFolder."""

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {root} does not exist")
        super().__init__(str(root), transform=transform, loader=read_image)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Class folder names and their label indices (standard ones for ImageNet synsets)."""
        try:
            classes, by_name = super().find_classes(directory)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no class folders in {directory}: an image folder holds one sub-folder of "
                "images per class (root/<class>/<image>); ImageNet's flat validation folder "
                "must first be sorted into one folder per synset (e.g. n01440764/)"
            ) from None
        return classes, imagenet_indices(classes) or by_name

    @property
    def uses_imagenet_indices(self) -> bool:
        """Whether labels are the standard ImageNet-1k indices of synset folders."""
        return imagenet_indices(self.classes) is not None


def data_source(data: str) -> tuple[str, Path]:
    """(kind, absolute folder) of a --data value: an image folder ('folder'), or
    'fashion-mnist' ('fashion-mnist:ROOT' for IDX files elsewhere)."""
    name, _, root = data.partition(":")
    if name == FASHION_MNIST:
        return FASHION_MNIST, Path(root or FASHION_MNIST_ROOT).resolve()
    return "folder", Path(data).resolve()


def open_dataset(
    data: str,
    transform: Callable[[Any], Any] | None = None,
    split: str = "test",
    canvas: int | None = None,
) -> Dataset:
    """The labelled images of a --data value (see `data_source`); `split` picks the
    Fashion-MNIST split (an image folder is whatever split the user points at) and `canvas`
    the black canvas its garments are pasted on (see `FashionMNIST`)."""
    kind, root = data_source(data)
    if kind == FASHION_MNIST:
        return FashionMNIST(root, split, transform, canvas=canvas)
    return LabelledImageFolder(root, transform)


def describe(dataset: Dataset) -> str:
    """One line: how many images and classes, and how labels were assigned."""
    if isinstance(dataset, Subset):
        return f"{len(dataset)} of {describe(dataset.dataset)}"
    if isinstance(dataset, LabelledImageFolder):
        labels = "ImageNet-1k indices" if dataset.uses_imagenet_indices else "sorted names"
        return f"{len(dataset)} images, {len(dataset.classes)} classes ({labels})"
    return f"{len(dataset)} images, {len(dataset.classes)} classes"


def limited(dataset: Dataset, limit: int | None) -> Dataset:
    """The first of every len/limit images: a subset spread over the whole (sorted) data,
    the same on every run. None keeps everything."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {limit}")
    return Subset(dataset, [i * len(dataset) // limit for i in range(limit)])

"""Evaluation data: what a --data value points at (an image folder, Fashion-MNIST, easy-VQA,
a JSON-lines file), labelled image datasets (ImageNet synset folders get their standard
class indices, or sorted-name ones for a model trained on just those folders), one-line
descriptions, and a deterministic `--limit` subset."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from timm.data import ImageNetInfo
from torch.utils.data import Dataset, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from tokcomp.errors import TokcompError, UsageError
from tokcomp.harness.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from tokcomp.harness.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from tokcomp.harness.fashion_mnist import FashionMNIST
from tokcomp.harness.fingerprint import file_identity

FASHION_MNIST = "fashion-mnist"
EASY_VQA = "easy-vqa"
EASY_VQA_PIN = "easy-vqa==1.0"
#: The video QA task made of easy-VQA images (tokcomp.harness.video_shapes), its test clips.
VIDEO_SHAPES = "video-shapes"
#: How LabelledImageFolder numbered its classes, as `describe()` says it.
GIVEN_LABELS = "the training split's indices"
IMAGENET_LABELS = "ImageNet-1k indices"
FOLDER_NUMBERS = "folder numbers"
SORTED_NAMES = "sorted names"
#: Classes of an ImageNet-1k model, whose label space the synset folders' standard indices are.
IMAGENET_CLASSES = 1000


class CorruptImageError(TokcompError, ValueError):
    """An image file that cannot be decoded, or frames that make no video; the message names
    the file (a runtime error: found while the run reads its data)."""


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


def numbered_indices(classes: Sequence[str]) -> dict[str, int] | None:
    """Each class's own number when every class folder is named by a decimal number
    (ImageNetV2's 0/ ... 999/), else None."""
    if classes and all(name.isdecimal() and name.isascii() for name in classes):
        return {name: int(name) for name in classes}
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
    return eight_bit(image, path)


#: Pillow's modes for 16-bit grayscale (a 16-bit grayscale PNG opens as "I;16").
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def eight_bit(image: Image.Image, name: str) -> Image.Image:
    """`image` with 8-bit channels, so that converting it to RGB or L keeps its contrast:
    16-bit grayscale keeps its high byte (as Pillow reads 16-bit colour PNGs); 32-bit integer
    or float pixels outside 0-255, which the conversion would clip, are refused naming `name`."""
    if image.mode in SIXTEEN_BIT_MODES:
        return Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), "L")
    if image.mode in ("I", "F"):
        low, high = image.getextrema()
        if low < 0 or high > 255:
            raise CorruptImageError(
                f"image {name} has {image.mode} pixels from {low} to {high}, which converting "
                "to RGB would clip to 0-255; save it with 8 or 16 bits per channel"
            )
    return image


def read_video(paths: Sequence[Path]) -> np.ndarray:
    """A video's frame files, decoded as RGB, as one (frames, height, width, 3) uint8 array
    (the form processors take in `videos=`); frames of different sizes are refused."""
    frames = [np.asarray(read_image(str(path)).convert("RGB")) for path in paths]
    sizes = sorted({frame.shape[:2] for frame in frames})
    if len(sizes) > 1:
        raise CorruptImageError(
            f"the frames of the video starting with {paths[0]} differ in size ({sizes}, height "
            "x width); resize them to one size"
        )
    return np.stack(frames)


class LabelledImageFolder(ImageFolder):
    """root/<class>/<image> folders. When every class folder is an ImageNet-1k synset, each
    maps to its standard index (a subset of the synsets keeps them), unless those indices do
    not fit the model's `outputs` (see `synset_indices`); when every one is named by a number
    (ImageNetV2's layout), that number is its index; otherwise classes are numbered in sorted
    folder-name order, like torchvision's ImageFolder. `labels` gives the indices instead
    (another split's, so that both agree); a class folder it lacks is refused."""

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Any], Any] | None = None,
        labels: Mapping[str, int] | None = None,
        outputs: int | None = None,
    ) -> None:
        self.given_labels = None if labels is None else dict(labels)
        self.outputs = outputs
        self.labelled_by = ""  # set by find_classes, which ImageFolder's __init__ calls
        root = Path(root)
        if root.is_file():
            raise UsageError(
                f"--data {root} is a file; images are read from a folder of class folders "
                "(root/<class>/<image>)"
            )
        if not root.is_dir():
            raise FileNotFoundError(
                f"data folder {root} does not exist; give a folder of class folders, or "
                f"{FASHION_MNIST} for the built-in Fashion-MNIST test set"
            )
        super().__init__(
            str(root), transform=transform, loader=read_image, is_valid_file=_visible_image(root)
        )

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        """Class folder names and their label indices (standard ones for ImageNet synsets);
        hidden folders (.ipynb_checkpoints, .thumbs) are no classes."""
        try:
            classes, _ = super().find_classes(directory)
            classes = [name for name in classes if not name.startswith(".")]
            if not classes:
                raise FileNotFoundError
            by_name = {name: index for index, name in enumerate(classes)}
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no class folders in {directory}: an image folder holds one sub-folder of "
                "images per class (root/<class>/<image>); ImageNet's flat validation folder "
                "must first be sorted into one folder per synset (e.g. n01440764/)"
            ) from None
        if self.given_labels is not None:
            self.labelled_by = GIVEN_LABELS
            return classes, given_indices(classes, self.given_labels, directory)
        _refuse_stray_folders(classes, directory)
        synsets = synset_indices(classes, self.outputs, directory)
        if synsets is not None:
            indices, self.labelled_by = synsets
            return classes, indices
        numbered = numbered_indices(classes)
        self.labelled_by = FOLDER_NUMBERS if numbered else SORTED_NAMES
        indices = numbered or by_name
        _refuse_unfit_labels(indices, self.outputs, self.labelled_by, directory)
        return classes, indices

    @property
    def uses_imagenet_indices(self) -> bool:
        """Whether labels are the standard ImageNet-1k indices of synset folders."""
        return self.labelled_by == IMAGENET_LABELS

    def identities(self, indices: Sequence[int]) -> Iterator[list[Any]]:
        """Each sample's file (relative path, size, modification time) and label."""
        for index in indices:
            path, label = self.samples[index]
            yield [*file_identity(Path(path), Path(self.root)), label]

    def describe(self) -> str:
        """One line: images, classes and how labels were assigned."""
        return f"{len(self)} images, {len(self.classes)} classes ({self.labelled_by})"


def _visible_image(root: Path) -> Callable[[str], bool]:
    """Whether a file under `root` is an image ImageFolder reads, outside hidden folders and
    not hidden itself (a notebook's .ipynb_checkpoints copies are no samples)."""

    def visible(path: str) -> bool:
        hidden = any(part.startswith(".") for part in Path(path).relative_to(root).parts)
        return not hidden and has_file_allowed_extension(path, IMG_EXTENSIONS)

    return visible


def _refuse_stray_folders(classes: Sequence[str], directory: str | Path) -> None:
    """Refuse ImageNet synset folders beside others: one other folder turned the standard
    indices into sorted-name ones, every synset's label shifted."""
    synsets = set(imagenet_synsets())
    others = [name for name in classes if name not in synsets]
    if others and len(others) < len(classes) / 2:
        raise UsageError(
            f"{directory} holds {len(classes) - len(others)} ImageNet synset folders and "
            f"{len(others)} other folder{'s' * (len(others) > 1)} ({', '.join(others[:3])}), "
            "which would renumber every class: move them out"
        )


def _refuse_unfit_labels(
    indices: Mapping[str, int], outputs: int | None, how: str, directory: str | Path
) -> None:
    """Refuse sorted-name labels of another number of classes than the model's `outputs`:
    fewer folders fit its outputs and were scored as its first classes. (Folder numbers past
    the outputs are refused by `topk_correct`, naming them.)"""
    if outputs is not None and how == SORTED_NAMES and len(indices) != outputs:
        raise UsageError(
            f"{directory} holds {len(indices)} class folders, numbered by sorted name, but the "
            f"model has {outputs} outputs: give the {outputs} class folders it was trained on"
        )


def synset_indices(
    classes: Sequence[str], outputs: int | None, directory: str | Path
) -> tuple[dict[str, int], str] | None:
    """(labels, how they were assigned) of synset class folders for a model with `outputs`
    classes (None: not known), or None when not every folder is a synset. The standard
    ImageNet-1k indices for a 1000-class model (one of another label space, ImageNet-21k's or
    -12k's, orders its classes otherwise); else, when the model has one output per folder,
    sorted-name order (torchvision's ImageFolder order, in which tokcomp trains, and timm's
    training for synset names, e.g. ImageNette's 10); else UsageError naming the counts."""
    standard = imagenet_indices(classes)
    if standard is None:
        return None
    highest = max(standard.values())
    if outputs is None or outputs == IMAGENET_CLASSES:
        return standard, IMAGENET_LABELS
    if outputs == len(classes):
        why = f"ImageNet-1k indices up to {highest} do not fit the model's {outputs} outputs"
        return {name: i for i, name in enumerate(sorted(classes))}, f"{SORTED_NAMES}: {why}"
    raise UsageError(
        f"{directory} holds {len(classes)} ImageNet synset folders (ImageNet-1k indices up to "
        f"{highest}) but the model has {outputs} outputs: evaluate a 1000-class ImageNet "
        f"model, or give exactly the {outputs} class folders the model was trained on"
    )


def given_indices(
    classes: Sequence[str], labels: Mapping[str, int], directory: str | Path
) -> dict[str, int]:
    """`labels` of `classes`, or UsageError naming a class folder that `labels` lacks."""
    unknown = [name for name in classes if name not in labels]
    if unknown:
        raise UsageError(
            f"class folders {unknown[:3]} of {directory} are not among the training classes "
            f"({len(labels)} folders): test on classes the training folder has"
        )
    return {name: labels[name] for name in classes}


@dataclass(frozen=True)
class DataSource:
    """Where a --data value points: its kind (FASHION_MNIST, EASY_VQA, "jsonl" for a
    JSON-lines file, "folder" for anything else) and its absolute path."""

    kind: str
    path: Path

    @property
    def name(self) -> str:
        """A short name for result folders: a named set's name, else the file's stem."""
        return self.kind if self.kind in (FASHION_MNIST, EASY_VQA, VIDEO_SHAPES) else self.path.stem

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def data_source(data: str) -> DataSource:
    """What a --data value points at: 'fashion-mnist' ('fashion-mnist:ROOT' for IDX files
    elsewhere), 'easy-vqa' (the installed package's data folder), a .jsonl file or a folder
    (an image folder, or the VQAv2 layout); 'video-shapes' (the easy-VQA images' video task).
    Each task's reader accepts the kinds it reads."""
    name, _, root = data.partition(":")
    if name == FASHION_MNIST:
        return DataSource(FASHION_MNIST, Path(root or FASHION_MNIST_ROOT).resolve())
    if data in (EASY_VQA, VIDEO_SHAPES):
        return DataSource(data, easy_vqa_root())
    path = Path(data).resolve()
    return DataSource("jsonl" if path.suffix == ".jsonl" else "folder", path)


def easy_vqa_root() -> Path:
    """The data folder of the installed easy-vqa package (its files; the package is not
    imported)."""
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise FileNotFoundError(f"easy-vqa is not installed: pip install {EASY_VQA_PIN}")
    return Path(spec.submodule_search_locations[0]) / "data"


def open_dataset(
    data: str,
    transform: Callable[[Any], Any] | None = None,
    split: str = "test",
    canvas: int | None = None,
    labels: Mapping[str, int] | None = None,
    outputs: int | None = None,
) -> Dataset:
    """The labelled images of a --data value (see `data_source`): an image folder or
    Fashion-MNIST; `split` picks the Fashion-MNIST split (an image folder is whatever split
    the user points at), `canvas` the black canvas its garments are pasted on (see
    `FashionMNIST`), `labels` an image folder's class indices and `outputs` the number of
    classes the model predicts, if known (see `LabelledImageFolder`)."""
    source = data_source(data)
    if source.kind == FASHION_MNIST:
        _refuse_other_class_counts(data, outputs)
        return FashionMNIST(source.path, split, transform, canvas=canvas)
    if source.kind != "folder":
        raise ValueError(
            f"--data {data} holds questions, not labelled images: give an image folder "
            f"(root/<class>/<image>) or {FASHION_MNIST}"
        )
    return LabelledImageFolder(source.path, transform, labels, outputs)


def _refuse_other_class_counts(data: str, outputs: int | None) -> None:
    """Refuse Fashion-MNIST for a model that predicts another number of classes: its labels
    0-9 would be read as that model's first ten classes, and every score would be noise."""
    if outputs is not None and outputs != len(FASHION_MNIST_CLASSES):
        raise UsageError(
            f"--data {data} has {len(FASHION_MNIST_CLASSES)} classes, but the model predicts "
            f"{outputs}: give a model trained on it (--checkpoint "
            "eval/models/vit-fmnist/model.safetensors, or one with a 10-class head, which "
            "tokcomp eval backbone --save-head writes), or score its features with tokcomp "
            "eval backbone"
        )


def describe(dataset: Dataset) -> str:
    """One line: how many samples of what (a dataset's own `describe()` where it has one)."""
    if isinstance(dataset, Subset):
        return f"{len(dataset)} of {describe(dataset.dataset)}"
    own = getattr(dataset, "describe", None)
    if own is not None:
        return own()
    return f"{len(dataset)} images, {len(dataset.classes)} classes"


def limited(dataset: Dataset, limit: int | None) -> Dataset:
    """The first of every len/limit samples: a subset spread over the whole (sorted) data, the
    same on every run (the dataset's own `subset` where it has one). A dataset that names each
    sample's kind (`kinds()`: a question's type) is spread kind by kind, so that each kind keeps
    its share whatever order the kinds come in (video-shapes asks its six kinds of every clip in
    one order, which one stride over the whole meets at the same few places). None keeps
    everything."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"--limit must be a positive number of images, got {limit}")
    order = grouped_by_kind(dataset)
    indices = sorted(order[i * len(order) // limit] for i in range(limit))
    subset = getattr(dataset, "subset", None)
    return subset(indices) if subset is not None else Subset(dataset, indices)


def grouped_by_kind(dataset: Dataset) -> list[int]:
    """The dataset's indices, grouped by kind (kinds in order of first appearance, each kind's
    samples in order); in order when the dataset names no kinds."""
    kinds = getattr(dataset, "kinds", None)
    if kinds is None:
        return list(range(len(dataset)))
    rank: dict[Any, int] = {}
    keys = [(rank.setdefault(kind, len(rank)), index) for index, kind in enumerate(kinds())]
    return [index for _, index in sorted(keys)]

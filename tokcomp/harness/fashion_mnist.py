"""Offline reader for the Fashion-MNIST IDX gzip files.

The Debian package ``dataset-fashion-mnist`` installs the four standard files at
``/usr/share/datasets/fashion-mnist``::

    train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
    t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz

Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_SIZE = 28
#: Data-config key of a model trained on garments pasted on a larger canvas: its size in px.
CANVAS_KEY = "fashion_mnist_canvas"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array.

    Args:
        path: Path to a ``.idx*`` file or its ``.gz`` version.

    Returns:
        An array with the shape stored in the file header, in native byte order
        (``uint8`` for the Fashion-MNIST images and labels).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the header is malformed or the payload size does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"IDX file not found: {path}. Install Fashion-MNIST with `{INSTALL_HINT}`."
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path}: too short to be an IDX file")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: bad IDX magic number")
    header_len = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    count = int(np.prod(shape)) if ndim else 1
    if len(data) - header_len != count * dtype.itemsize:
        raise ValueError(
            f"{path}: payload has {len(data) - header_len} bytes, header says "
            f"{count * dtype.itemsize}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def load_arrays(
    root: str | Path = DEFAULT_ROOT, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split as ``(images, labels)`` arrays.

    Args:
        root: Folder holding the four IDX gzip files.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).

    Returns:
        ``images`` of shape (N, 28, 28) and ``labels`` of shape (N,), both ``uint8``.

    Raises:
        ValueError: If ``split`` is unknown.
        FileNotFoundError: If ``root`` or one of the files is missing, naming the file
            and the install command.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    paths = [root / name for name in _FILES[split]]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file not found: {p}. Install it with `{INSTALL_HINT}` "
                f"(puts the files in {DEFAULT_ROOT}) or name the folder that holds them "
                "(root=, or --data fashion-mnist:FOLDER on the command line)."
            )
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"unexpected Fashion-MNIST shapes: images {images.shape}, labels {labels.shape}"
        )
    return images, labels


class FashionMNIST(Dataset):
    """Fashion-MNIST as a torch ``Dataset`` of ``(PIL.Image, int)`` pairs.

    Images are 28x28 greyscale (mode ``"L"``); labels are ints in ``[0, 10)`` indexing
    :data:`CLASSES`.

    Args:
        root: Folder holding the IDX gzip files.
        split: ``"train"`` or ``"test"``.
        transform: Optional callable applied to the PIL image.
        target_transform: Optional callable applied to the int label.
        canvas: Paste each image at its fixed place on a black canvas this size
            (`place_at_fixed_offsets`) instead of returning it as is (for models trained
            that way).
    """

    classes: tuple[str, ...] = CLASSES

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        split: str = "train",
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        canvas: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.images, self.labels = load_arrays(self.root, split)
        if canvas is not None:
            self.images = place_at_fixed_offsets(torch.from_numpy(self.images), canvas).numpy()

    def __len__(self) -> int:
        """Number of images in the split."""
        return int(self.labels.shape[0])

    def identities(self, indices: Sequence[int]) -> Iterator[bytes]:
        """The content of the images (as served, canvas included) and labels at `indices`."""
        chosen = np.asarray(indices, dtype=np.int64)
        yield self.images[chosen].tobytes()
        yield self.labels[chosen].tobytes()

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """Return ``(image, label)`` for ``index``, transforms applied."""
        img: Any = Image.fromarray(self.images[index])
        target: Any = int(self.labels[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target


def fixed_offsets(count: int, canvas: int) -> torch.Tensor:
    """(count, 2) (row, column) offsets that keep a 28x28 image inside the canvas: the one
    place of each image of a split when evaluating (a seeded draw, so the training script,
    the harness and the probe agree)."""
    if canvas < IMAGE_SIZE:
        raise ValueError(f"canvas must be at least {IMAGE_SIZE} px, got {canvas}")
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, canvas - IMAGE_SIZE + 1, (count, 2), generator=generator)


def place_at_fixed_offsets(images: torch.Tensor, canvas: int) -> torch.Tensor:
    """(N, 28, 28) images of a split -> (N, canvas, canvas), each at its `fixed_offsets` place."""
    return place_on_canvas(images, fixed_offsets(len(images), canvas), canvas)


def place_on_canvas(images: torch.Tensor, offsets: torch.Tensor, canvas: int) -> torch.Tensor:
    """(B, 28, 28) images -> (B, canvas, canvas): each pasted at its (row, column) offset on
    a black (zero) background, like an object somewhere in a larger photo."""
    b, h, w = images.shape
    rows = (offsets[:, 0, None] + torch.arange(h))[:, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w))[:, None, :]
    out = images.new_zeros(b, canvas, canvas)
    out[torch.arange(b)[:, None, None], rows, cols] = images
    return out

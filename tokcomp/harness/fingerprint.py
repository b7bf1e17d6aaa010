"""What decides a result's numbers, in named parts (data, weights, preprocessing, limit, ...),
so that saved results and search states are reused only for the same inputs, and a refusal
can say which input changed.

Files are identified cheaply where there are many (path, size and modification time of each
image) and by content where there are few (checkpoints, config files); each file's content
hash is computed once per run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import tokcomp
from tokcomp.errors import StaleResultsError
from tokcomp.libraries import LIBRARIES, TORCH, installed


@dataclass(frozen=True)
class Fingerprint:
    """Named parts (JSON values), in the order a refusal names them."""

    parts: Mapping[str, Any]

    @classmethod
    def of(cls, **parts: Any) -> Fingerprint:
        """The fingerprint of `parts`, led by tokcomp's code and the libraries' releases."""
        return cls({"tokcomp": code_identity(), "libraries": library_releases(), **parts})

    def extended(self, **parts: Any) -> Fingerprint:
        """This fingerprint with more parts."""
        return Fingerprint({**self.parts, **parts})

    def as_json(self) -> dict[str, Any]:
        """The parts as saved (plain JSON values)."""
        return json.loads(json.dumps(dict(self.parts), default=str))

    def differences(self, saved: Mapping[str, Any]) -> list[str]:
        """'name: saved then, current now' for each part that differs from `saved`."""
        current, names = self.as_json(), dict.fromkeys([*self.parts, *saved])
        return [
            f"{name}: {_shown(saved.get(name))} then, {_shown(current.get(name))} now"
            for name in names
            if saved.get(name) != current.get(name)
        ]

    def check(self, saved: Any, what: str, fix: str) -> None:
        """Raise StaleResultsError unless `saved` (a saved fingerprint) equals this one; the
        message says that `what` ('the results in X were made') came from which other
        inputs, then `fix`."""
        if not isinstance(saved, Mapping):
            raise StaleResultsError(
                f"{what} without a fingerprint of the inputs (by an older tokcomp), so it "
                f"cannot be checked against this run; {fix}"
            )
        changed = self.differences(saved)
        if changed:
            raise StaleResultsError(f"{what} from other inputs ({'; '.join(changed)}); {fix}")


#: The folder of tokcomp's package: its sources and compiled extension.
PACKAGE = Path(tokcomp.__file__).parent


@functools.cache
def code_identity(package: Path = PACKAGE) -> str:
    """tokcomp's version and a short SHA-256 of the files of its `package` folder (sources and
    compiled extension; __pycache__ left out): the version alone stays the same while the code
    changes."""
    files = sorted(
        path for path in package.rglob("*") if path.is_file() and "__pycache__" not in path.parts
    )
    digest = _digest([path.relative_to(package).as_posix(), file_digest(path)] for path in files)
    return f"{tokcomp.__version__}, files {digest}"


def library_releases() -> str:
    """The installed releases of torch and the model libraries ('torch 2.14.1, timm 1.0.19, ...';
    a library that is not installed is left out)."""
    names = dict.fromkeys(library.distribution for library in (TORCH, *LIBRARIES))
    found = {name: installed(name) for name in names}
    return ", ".join(f"{name} {version}" for name, version in found.items() if version)


def _shown(value: Any) -> str:
    """A part's value in a one-line message (text with line breaks quoted)."""
    if value is None:
        return "none"
    text = str(value)
    return text if text.isprintable() else repr(text)


@functools.cache
def _content_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(functools.partial(handle.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    """A short SHA-256 of a file's content, computed once per run for each version of it."""
    path = Path(path).resolve()
    stat = path.stat()
    return _content_digest(path, stat.st_size, stat.st_mtime_ns)


def folder_digest(folder: Path) -> str:
    """A short SHA-256 over the names and contents of every file directly in `folder`
    (a Hugging Face model folder: weights, config, processor and tokenizer files)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    return _digest(json.dumps([p.name, file_digest(p)]) for p in files)


def weights_digest(model: nn.Module) -> str:
    """A short SHA-256 of a model's parameters and buffers (names, dtypes, shapes, values)."""

    def items() -> Iterable[bytes]:
        for name, tensor in model.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            yield f"{name} {tensor.dtype} {list(tensor.shape)}".encode()
            yield tensor.view(-1).view(torch.uint8).numpy().tobytes()

    return _digest(items())


def samples_digest(dataset: Dataset) -> str:
    """'N samples, sha256 X': the exact samples of a dataset (a Subset of one included) by
    each sample's identity, which the dataset's `identities(indices)` gives (file path,
    size and modification time, or the content read)."""
    base, indices = _base_and_indices(dataset)
    identities = getattr(base, "identities", None)
    if identities is None:
        raise TypeError(f"{type(base).__name__} has no identities(indices) to fingerprint")
    return f"{len(indices)} samples, sha256 {_digest(identities(indices))}"


def file_identity(path: Path, root: Path | None = None) -> list[Any]:
    """[path (relative to `root`), size, modification time in ns] of a file."""
    stat = os.stat(path)
    shown = Path(path).relative_to(root) if root is not None else Path(path).name
    return [str(shown), stat.st_size, stat.st_mtime_ns]


def _base_and_indices(dataset: Dataset) -> tuple[Dataset, list[int]]:
    if isinstance(dataset, Subset):
        base, indices = _base_and_indices(dataset.dataset)
        return base, [indices[i] for i in dataset.indices]
    return dataset, list(range(len(dataset)))


def _digest(items: Iterable[Any]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item if isinstance(item, bytes) else json.dumps(item).encode())
    return digest.hexdigest()[:16]

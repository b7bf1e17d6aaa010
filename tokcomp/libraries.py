"""The oldest release of torch and of each model library that tokcomp works with.

The one place these versions are written: `import tokcomp` checks torch's, the adapters check
their library's when they meet a model, and setup.py reads them (running this file with the
standard library alone) for its requirements and extras. Each is the oldest release the tests
pass on, found by running them against older releases (README, "Library versions").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Library:
    """A library: its import name, its pip name, the oldest release tokcomp supports and what
    tokcomp needs it for."""

    module: str
    distribution: str
    minimum: str
    serves: str

    def too_old(self) -> str | None:
        """One line naming the upgrade where the installed release is older than `minimum`;
        None where it is not (or where pip has no record of it)."""
        found = installed(self.distribution)
        if found is None or release(found) >= release(self.minimum):
            return None
        return (
            f"tokcomp needs {self.distribution}>={self.minimum} for {self.serves} "
            f"(found {found}): pip install -U '{self.distribution}>={self.minimum}'"
        )


def installed(distribution: str) -> str | None:
    """The installed release of `distribution` (None for a copy imported without pip's record)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string ('5.24.0.dev0' -> (5, 24, 0))."""
    match = re.match(r"\d+(\.\d+)*", version)
    if match is None:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


TORCH = Library("torch", "torch", "2.7.1", "its compiled ops and torch.compile")
TIMM = Library("timm", "timm", "0.9.16", "timm ViTs")
OPEN_CLIP = Library("open_clip", "open_clip_torch", "2.26.1", "open_clip CLIP models")
HF_VISION = Library("transformers", "transformers", "5.18.0", "Hugging Face vision encoders")
HF_VLM = Library("transformers", "transformers", "5.24.0", "Hugging Face VLMs")

#: The model libraries, each optional: setup.py's extras.
LIBRARIES = (TIMM, OPEN_CLIP, HF_VISION, HF_VLM)


def extras() -> dict[str, list[str]]:
    """setup.py's extras, one per library (tokcomp[timm], ...), at the newest of its minimums."""
    minimum: dict[str, Library] = {}
    for library in LIBRARIES:
        known = minimum.get(library.module)
        if known is None or release(library.minimum) > release(known.minimum):
            minimum[library.module] = library
    return {name: [f"{lib.distribution}>={lib.minimum}"] for name, lib in minimum.items()}


def library_too_old_for(model_module: str) -> str | None:
    """Before any adapter looks at a model from module `model_module`: the line refusing a
    release of its library older than every adapter of that library supports (None: fine)."""
    root = model_module.split(".")[0]
    own = [library for library in LIBRARIES if library.module == root]
    return min(own, key=lambda library: release(library.minimum)).too_old() if own else None

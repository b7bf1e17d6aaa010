"""The oldest version of each model library that tokcomp's adapters work with.

The one place these versions are written: the adapters check them when they meet a model, and
setup.py reads them (without importing tokcomp) for its extras. Each is the oldest release the
adapter's tests pass on, found by running them against older releases (README, "Library
versions").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Library:
    """A model library: its import name, its pip name and the oldest release tokcomp supports."""

    module: str
    distribution: str
    minimum: str
    models: str

    def require(self) -> None:
        """Refuse, in one line naming the upgrade, an installed release older than `minimum`."""
        found = installed(self.distribution)
        if found is not None and release(found) < release(self.minimum):
            # imported here: setup.py runs this file with the standard library alone
            from tokcomp.adapters.base import UnsupportedModelError

            raise UnsupportedModelError(
                f"tokcomp needs {self.distribution}>={self.minimum} for {self.models} "
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


TIMM = Library("timm", "timm", "0.9.16", "timm ViTs")
OPEN_CLIP = Library("open_clip", "open_clip_torch", "2.26.1", "open_clip CLIP models")
HF_VISION = Library("transformers", "transformers", "5.18.0", "Hugging Face vision encoders")
HF_VLM = Library("transformers", "transformers", "5.24.0", "Hugging Face VLMs")

LIBRARIES = (TIMM, OPEN_CLIP, HF_VISION, HF_VLM)


def extras() -> dict[str, list[str]]:
    """setup.py's extras, one per library (tokcomp[timm], ...), at the newest of its minimums."""
    minimum: dict[str, Library] = {}
    for library in LIBRARIES:
        known = minimum.get(library.module)
        if known is None or release(library.minimum) > release(known.minimum):
            minimum[library.module] = library
    return {name: [f"{lib.distribution}>={lib.minimum}"] for name, lib in minimum.items()}


def require_library_of(model_module: str) -> None:
    """Before any adapter looks at a model from module `model_module`: refuse a release of its
    library older than every adapter of that library supports."""
    root = model_module.split(".")[0]
    own = [library for library in LIBRARIES if library.module == root]
    if own:
        min(own, key=lambda library: release(library.minimum)).require()

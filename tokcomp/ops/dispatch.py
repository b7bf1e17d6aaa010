"""Pick the implementation of each op: the compiled extension when it is built for the device,
the pure-PyTorch reference otherwise (with one warning when the build is missing)."""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch

#: Set to "reference" to force the PyTorch reference ops (for comparisons and debugging).
BACKEND_ENV = "TOKCOMP_BACKEND"


@cache
def extension() -> ModuleType | None:
    """The compiled extension `tokcomp._C`, or None (warning once) when it is not built."""
    try:
        importlib.import_module("tokcomp.ops._fake")  # loads tokcomp._C, then its fake kernels
        return importlib.import_module("tokcomp._C")
    except ImportError as err:
        warnings.warn(
            f"tokcomp's compiled extension is not available ({err}); falling back to the "
            "PyTorch reference ops, which are slower. Build it with `pip install -e .` "
            "(or `make install`) from the tokcomp checkout.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _compiled_devices() -> frozenset[str]:
    if os.environ.get(BACKEND_ENV, "auto") == "reference":
        return frozenset()
    ext = extension()
    if ext is None:
        return frozenset()
    return frozenset({"cpu", "cuda"} if ext.WITH_CUDA else {"cpu"})


def backend(device: torch.device | str = "cpu") -> str:
    """Name of the implementation the ops run on `device`: "cpp", "cuda" or "reference"."""
    kind = torch.device(device).type
    if kind not in _compiled_devices():
        return "reference"
    return "cuda" if kind == "cuda" else "cpp"


def compiled_op(name: str, device: torch.device) -> Callable | None:
    """The compiled custom op `tokcomp::<name>` for `device`, or None to use the reference
    (also when the built extension predates the op)."""
    if backend(device) == "reference":
        return None
    return getattr(torch.ops.tokcomp, name, None)

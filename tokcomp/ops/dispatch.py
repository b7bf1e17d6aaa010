"""Pick the implementation of each op for a device ("route"), in this order:

- "cuda": the compiled CUDA kernels of `tokcomp._C` (built with nvcc, TOKCOMP_CUDA=1), on CUDA;
- "cupy": the same kernels compiled at run time by cupy (`tokcomp.ops.cupy_kernels`), on CUDA
  when the extension has no CUDA kernels and cupy is installed (`pip install tokcomp[cupy]`);
- "cpp": the C++/OpenMP kernels of `tokcomp._C`, on CPU;
- "reference": the pure-PyTorch reference, when none of the above is there (one warning).

Routes are resolved once per (op, device type) and cached in a module dict. Under torch.compile
the lookup runs as a constant (torch.compiler.assume_constant_result): traced code never reaches
importlib, cupy or os.environ, and the op it returns is a torch op either way.
"""

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

#: The torch library namespace of each route's ops.
NAMESPACES = {"cpp": "tokcomp", "cuda": "tokcomp", "cupy": "tokcomp_cupy"}

_ROUTES: dict[tuple[str, str, str], str] = {}


@cache
def extension() -> ModuleType | None:
    """The compiled extension `tokcomp._C` with its fake kernels registered, or None (warning
    once) when it is not built."""
    try:
        module = importlib.import_module("tokcomp._C")
    except ImportError as err:
        warnings.warn(
            f"tokcomp's compiled extension is not available ({err}); falling back to the "
            "PyTorch reference ops, which are slower. Build it with `pip install -e .` "
            "(or `make install`) from the tokcomp checkout.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    importlib.import_module("tokcomp.ops._fake")  # registers the fake kernels of tokcomp::*
    return module


@cache
def cupy_ready() -> bool:
    """Whether the cupy route can run here: a visible GPU, and cupy installed and able to compile
    tokcomp's kernels. Imports cupy only when a GPU is visible."""
    if not torch.cuda.is_available():
        return False
    return importlib.import_module("tokcomp.ops.cupy_kernels").available()


@cache
def _warn_no_cuda_kernels() -> None:
    warnings.warn(
        "tokcomp has no CUDA kernels here (tokcomp._C was built without CUDA and cupy is not "
        "installed or not usable): CUDA tensors use the slower PyTorch reference ops. Install "
        "cupy (`pip install tokcomp[cupy]`, i.e. cupy-cuda13x) or rebuild with TOKCOMP_CUDA=1.",
        RuntimeWarning,
        stacklevel=3,
    )


def backend(device: torch.device | str = "cpu") -> str:
    """Name of the implementation the ops run on `device`: "cuda", "cupy", "cpp" or
    "reference"."""
    kind = torch.device(device).type
    if os.environ.get(BACKEND_ENV, "auto") == "reference" or kind not in ("cpu", "cuda"):
        return "reference"
    ext = extension()
    if kind == "cpu":
        return "reference" if ext is None else "cpp"
    if ext is not None and ext.WITH_CUDA:
        return "cuda"
    if cupy_ready():
        return "cupy"
    if torch.cuda.is_available():
        _warn_no_cuda_kernels()
    return "reference"


@torch.compiler.assume_constant_result
def route(name: str, device_type: str) -> str:
    """The route of op `name` on devices of type `device_type`: `backend`'s, except that an
    extension built before the op existed passes it on to cupy (CUDA) or the reference."""
    key = (name, device_type, os.environ.get(BACKEND_ENV, "auto"))
    if key not in _ROUTES:
        chosen = backend(device_type)
        if chosen in ("cpp", "cuda") and not hasattr(torch.ops.tokcomp, name):
            chosen = "cupy" if device_type == "cuda" and cupy_ready() else "reference"
        _ROUTES[key] = chosen
    return _ROUTES[key]


def compiled_op(name: str, device: torch.device) -> Callable | None:
    """The torch op implementing `name` on `device` (`torch.ops.tokcomp.<name>` or
    `torch.ops.tokcomp_cupy.<name>`), or None to use the reference."""
    chosen = route(name, device.type)
    if chosen == "reference":
        return None
    return getattr(getattr(torch.ops, NAMESPACES[chosen]), name)


def clear_cache() -> None:
    """Forget resolved routes and given warnings, e.g. after building the extension or installing
    cupy in a running process (the extension and cupy are looked up again on next use)."""
    _ROUTES.clear()
    extension.cache_clear()
    cupy_ready.cache_clear()
    _warn_no_cuda_kernels.cache_clear()

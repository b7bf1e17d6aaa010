"""Pick the implementation of each op for a device ("route"), in this order:

- "cuda": the compiled CUDA kernels of `tokcomp._C` (built with nvcc, TOKCOMP_CUDA=1), on CUDA;
- "cupy": the same kernels compiled at run time by cupy (`tokcomp.ops.cupy_kernels`), on CUDA
  when the extension has no CUDA kernels and cupy is installed (`pip install tokcomp[cupy]`);
- "cpp": the C++/OpenMP kernels of `tokcomp._C`, on CPU;
- "reference": the pure-PyTorch reference, when none of the above is there (one warning).

Routes are resolved once per (op, device type) and cached in a module dict. The kernels take
float32, bfloat16 and float16 inputs: other dtypes (float64) use the reference, silently.

A compiled route is not trusted blindly: the first time it runs an op on a device for a dtype,
its kernel is checked against the PyTorch reference on small fixed inputs (`selfcheck`, a few
ms, once per process and thread-safe). On a mismatch that (op, device, dtype) uses the
reference from then on, with one warning naming the op and the device; `backend(device,
verbose=True)` reports every check. TOKCOMP_VERIFY=0 skips the checks (benchmarks).

Under torch.compile the lookup and the check run as constants while tracing
(torch.compiler.assume_constant_result): traced code never reaches importlib, cupy, os.environ
or the check, and the op it calls is a torch op either way.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import warnings
from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import Literal, overload

import torch

#: Set to "reference" to force the PyTorch reference ops (for comparisons and debugging).
BACKEND_ENV = "TOKCOMP_BACKEND"
#: Set to "0" to skip the first-call parity checks of the compiled routes (for benchmarks).
VERIFY_ENV = "TOKCOMP_VERIFY"

#: The torch library namespace of each route's ops.
NAMESPACES = {"cpp": "tokcomp", "cuda": "tokcomp", "cupy": "tokcomp_cupy"}

_ROUTES: dict[tuple[str, str, str], str] = {}
#: (route, op, device, dtype) -> "verified" or "failed": the first-call checks done so far.
_CHECKS: dict[tuple[str, str, str, str], str] = {}
_CHECK_LOCK = threading.RLock()
#: The input dtypes the compiled kernels take (csrc/ops.h, cupy_kernels.TYPE_NAMES).
KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


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


@overload
def backend(device: torch.device | str = ..., verbose: Literal[False] = ...) -> str: ...


@overload
def backend(device: torch.device | str = ..., *, verbose: Literal[True]) -> dict[str, str]: ...


def backend(device: torch.device | str = "cpu", verbose: bool = False) -> str | dict[str, str]:
    """Name of the implementation the ops run on `device`: "cuda", "cupy", "cpp" or
    "reference"; with `verbose`, each op's route and the outcome of its first-call checks."""
    if verbose:
        return {name: _report(name, torch.device(device)) for name in _check_cases()}
    return _device_route(torch.device(device).type)


def _device_route(kind: str) -> str:
    """The route of every op on devices of type `kind` (ops missing from an old build aside)."""
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


def float32_math(reference: Callable) -> Callable:
    """`reference` with autocast off on its first tensor's device: a reference computes in
    float32 (or float64) as the kernels do, not in autocast's bfloat16 or float16."""

    @functools.wraps(reference)
    def exact(*args, **kwargs):
        device = next(arg.device.type for arg in args if isinstance(arg, torch.Tensor))
        with torch.autocast(device, enabled=False):
            return reference(*args, **kwargs)

    return exact


@torch.compiler.assume_constant_result
def route(name: str, device_type: str) -> str:
    """The route of op `name` on devices of type `device_type`: `backend`'s, except that an
    extension built before the op existed passes it on to cupy (CUDA) or the reference."""
    key = (name, device_type, os.environ.get(BACKEND_ENV, "auto"))
    if key not in _ROUTES:
        chosen = _device_route(device_type)
        if chosen in ("cpp", "cuda") and not hasattr(torch.ops.tokcomp, name):
            chosen = "cupy" if device_type == "cuda" and cupy_ready() else "reference"
        _ROUTES[key] = chosen
    return _ROUTES[key]


@torch.compiler.assume_constant_result
def checked_route(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """`route(name, device.type)`, or "reference" for a dtype the kernels do not take or where
    that compiled route failed its first-call check for (name, device, dtype); runs the check
    on first use."""
    if dtype not in KERNEL_DTYPES:
        return "reference"
    chosen = route(name, device.type)
    if chosen == "reference":
        return chosen
    key = (chosen, name, str(device), _dtype_name(dtype))
    if _CHECKS.get(key) == "failed":  # stays replaced, checks on or off
        return "reference"
    if os.environ.get(VERIFY_ENV, "1") == "0":
        return chosen
    if key not in _CHECKS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return "reference"  # no check inside a CUDA graph capture: checked on a later call
        with _CHECK_LOCK:
            if key not in _CHECKS:
                _CHECKS[key] = _check(chosen, name, device, dtype)
    return chosen if _CHECKS[key] == "verified" else "reference"


def compiled_op(name: str, device: torch.device, dtype: torch.dtype) -> Callable | None:
    """The torch op implementing `name` on `device` for inputs of `dtype`
    (`torch.ops.tokcomp.<name>` or `torch.ops.tokcomp_cupy.<name>`), or None to use the
    reference."""
    chosen = checked_route(name, device, dtype)
    return None if chosen == "reference" else kernel(chosen, name)


def kernel(chosen: str, name: str) -> Callable:
    """The torch op of route `chosen` ("cpp", "cuda" or "cupy") for op `name`."""
    return getattr(getattr(torch.ops, NAMESPACES[chosen]), name)


def _check(chosen: str, name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Run the first-call check of route `chosen` for (name, device, dtype): "verified", or
    "failed" with one warning."""
    selfcheck = importlib.import_module("tokcomp.ops.selfcheck")
    problem = selfcheck.mismatch(name, kernel(chosen, name), device, dtype)
    if problem is None:
        return "verified"
    warnings.warn(
        f"tokcomp: the {chosen} kernel of {name} on {device} ({_dtype_name(dtype)}) disagrees "
        f"with the PyTorch reference ({problem}); {name} uses the reference there from now on. "
        f"Please report it; tokcomp.backend({str(device)!r}, verbose=True) lists every check.",
        RuntimeWarning,
        stacklevel=5,  # the caller of the public op
    )
    return "failed"


def _check_cases() -> dict:
    return importlib.import_module("tokcomp.ops.selfcheck").CASES


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _report(name: str, device: torch.device) -> str:
    """One op's route on `device` and its checks, e.g. "cpp: float32 on cpu verified"."""
    chosen = route(name, device.type)
    if chosen == "reference":
        return "reference"
    done = [
        f"{dtype} on {where} {status}"
        for (checked, op, where, dtype), status in sorted(_CHECKS.items())
        if (checked, op) == (chosen, name) and _same_device(torch.device(where), device)
    ]
    if os.environ.get(VERIFY_ENV, "1") == "0":
        failed = [check for check in done if check.endswith("failed")]
        return f"{chosen}: " + "; ".join([*failed, f"not checked ({VERIFY_ENV}=0)"])
    return f"{chosen}: " + ("; ".join(done) if done else "not checked yet (on first use)")


def _same_device(checked: torch.device, asked: torch.device) -> bool:
    return checked.type == asked.type and asked.index in (None, checked.index)


def clear_cache() -> None:
    """Forget resolved routes, checks and given warnings, e.g. after building the extension or
    installing cupy in a running process (the extension and cupy are looked up again on next
    use)."""
    _ROUTES.clear()
    _CHECKS.clear()
    extension.cache_clear()
    cupy_ready.cache_clear()
    _warn_no_cuda_kernels.cache_clear()

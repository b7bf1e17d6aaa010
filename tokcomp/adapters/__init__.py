"""Model-family adapters: one file per family. `find_adapter` picks the one for a model."""

from __future__ import annotations

from torch import nn

from tokcomp.adapters.base import Adapter, Compression, Patch, UnsupportedModelError
from tokcomp.adapters.hf_vision import HFVisionAdapter
from tokcomp.adapters.hf_vlm import HFVLMAdapter
from tokcomp.adapters.open_clip import OpenClipAdapter
from tokcomp.adapters.timm import TimmViTAdapter
from tokcomp.libraries import library_too_old_for

ADAPTERS: list[type[Adapter]] = [TimmViTAdapter, OpenClipAdapter, HFVisionAdapter, HFVLMAdapter]


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`; UnsupportedModelError listing what is supported otherwise."""
    _refuse_wrappers(model)
    _refuse_too_old(library_too_old_for(type(model).__module__))
    for adapter in ADAPTERS:
        if adapter.recognises(model):
            _refuse_too_old(adapter.library.too_old())
            return adapter(model)
    supported = "; ".join(adapter.supported for adapter in ADAPTERS)
    raise UnsupportedModelError(
        f"tokcomp cannot patch a {type(model).__module__}.{type(model).__name__}; "
        f"supported: {supported}"
    )


def _refuse_too_old(message: str | None) -> None:
    """Raise `message` (a library release too old for the model's adapter), if there is one."""
    if message is not None:
        raise UnsupportedModelError(message)


def _refuse_wrappers(model: nn.Module) -> None:
    """Name the fix for models wrapped by torch.compile, DataParallel or DDP."""
    if hasattr(model, "_orig_mod"):
        raise UnsupportedModelError(
            "this model is compiled (torch.compile); apply tokcomp to the model first, then "
            "compile it: tokcomp.apply(model, ...); model = torch.compile(model)"
        )
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise UnsupportedModelError(
            "this model is wrapped in DistributedDataParallel; apply tokcomp to the model "
            "before wrapping it: tokcomp.apply(model, ...); model = DistributedDataParallel(model)"
        )
    if isinstance(model, nn.DataParallel):
        raise UnsupportedModelError(
            "tokcomp cannot patch a DataParallel model (its replicas would call the original "
            "module's patch); run one process per GPU with DistributedDataParallel, applying "
            "tokcomp to the model before wrapping it"
        )


__all__ = ["ADAPTERS", "Adapter", "Compression", "Patch", "UnsupportedModelError", "find_adapter"]

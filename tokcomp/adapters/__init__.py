"""Model-family adapters: one file per family. `find_adapter` picks the one for a model."""

from __future__ import annotations

from torch import nn

from tokcomp.adapters.base import Adapter, Compression, Patch, UnsupportedModelError
from tokcomp.adapters.hf_vision import HFVisionAdapter
from tokcomp.adapters.hf_vlm import HFVLMAdapter
from tokcomp.adapters.open_clip import OpenClipAdapter
from tokcomp.adapters.timm import TimmViTAdapter

ADAPTERS: list[type[Adapter]] = [TimmViTAdapter, OpenClipAdapter, HFVisionAdapter, HFVLMAdapter]


def find_adapter(model: nn.Module) -> Adapter:
    """The adapter for `model`; UnsupportedModelError listing what is supported otherwise."""
    for adapter in ADAPTERS:
        if adapter.recognises(model):
            return adapter(model)
    supported = "; ".join(adapter.supported for adapter in ADAPTERS)
    raise UnsupportedModelError(
        f"tokcomp cannot patch a {type(model).__module__}.{type(model).__name__}; "
        f"supported: {supported}"
    )


__all__ = ["ADAPTERS", "Adapter", "Compression", "Patch", "UnsupportedModelError", "find_adapter"]

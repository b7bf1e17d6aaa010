"""The Hugging Face VLM families tokcomp supports, one module each. Every module in this
package is imported, so its families register the transformers classes they handle: adding a
family is adding a file."""

import importlib
import pkgutil

from tokcomp.adapters.hf_vlm.families.base import (
    ADAPTER_NAME,
    Images,
    Segment,
    VLMFamily,
    family_for,
    handled_classes,
    in_prompt_order,
    video_classes,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ADAPTER_NAME",
    "Images",
    "Segment",
    "VLMFamily",
    "family_for",
    "handled_classes",
    "in_prompt_order",
    "video_classes",
]

"""tokcomp: make pretrained vision transformers and VLMs faster by pruning and merging tokens.

>>> import timm, tokcomp
>>> model = tokcomp.apply(timm.create_model("deit_small_patch16_224"), "tome", r=13)
"""

from tokcomp.libraries import TORCH

# before the imports that an older torch would break with a less clear error
if message := TORCH.too_old():
    raise ImportError(message)

from tokcomp.adapters import UnsupportedModelError
from tokcomp.adapters.hf_vlm import visual_tokens_dropped
from tokcomp.api import (
    apply,
    config_of,
    forward_tokens,
    is_patched,
    macs,
    methods,
    model_defaults,
    remove,
)
from tokcomp.config import Config, ConfigError
from tokcomp.methods import create_method
from tokcomp.ops import backend

__version__ = "0.3.0"

__all__ = [
    "Config",
    "ConfigError",
    "UnsupportedModelError",
    "apply",
    "backend",
    "config_of",
    "create_method",
    "forward_tokens",
    "is_patched",
    "macs",
    "methods",
    "model_defaults",
    "remove",
    "visual_tokens_dropped",
]

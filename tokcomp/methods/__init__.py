"""Compression methods, one file each, of two kinds (methods/base.py): block methods reduce a
TokenState given the signals they declared (`needs`) and the block's budget; visual-token
methods choose a VLM's visual tokens. A method never touches model classes. Every module of
this package is imported, so the methods in it register themselves: adding a method is adding
a file."""

import importlib
import pkgutil

from tokcomp.methods.base import (
    AttentionStyle,
    BlockMethod,
    BlockPosition,
    Geometry,
    Method,
    option_names,
)
from tokcomp.methods.registry import create_method, method_class, method_names, register
from tokcomp.methods.state import Signal, Signals, TokenState
from tokcomp.methods.visual import LLMStageMethod, Stage, VisualMethod, VisualTokens

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "AttentionStyle",
    "BlockMethod",
    "BlockPosition",
    "Geometry",
    "LLMStageMethod",
    "Method",
    "Signal",
    "Signals",
    "Stage",
    "TokenState",
    "VisualMethod",
    "VisualTokens",
    "create_method",
    "method_class",
    "method_names",
    "option_names",
    "register",
]

"""Compression methods, one file each, of two kinds (methods/base.py): block methods reduce a
TokenState given the signals they declared (`needs`) and the block's budget; visual-token
methods choose a VLM's visual tokens. A method never touches model classes."""

from tokcomp.methods import (  # noqa: F401  (registers them)
    diffrate,
    divprune,
    evit,
    fastv,
    pitome,
    random,
    tome,
    visionzip,
    zero_tprune,
    zoo,
)
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

"""Compression methods, one file each. A method never touches model classes: it reduces a
TokenState given the signals it declared (`needs`) and this layer's budget."""

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
from tokcomp.methods.base import Layer, Layout, Method, option_names
from tokcomp.methods.registry import create_method, method_class, method_names, register
from tokcomp.methods.state import Signal, Signals, TokenState
from tokcomp.methods.visual import VisualMethod, VisualTokens

__all__ = [
    "Layer",
    "Layout",
    "Method",
    "Signal",
    "Signals",
    "TokenState",
    "VisualMethod",
    "VisualTokens",
    "create_method",
    "method_class",
    "method_names",
    "option_names",
    "register",
]
